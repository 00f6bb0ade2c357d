"""Bad requests get OpenAI error bodies and a 4xx, never a traceback; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import make_model_folder
from serving import running

LONG = "It was a truth universally acknowledged. " * 120  # past the tiny model's 512 tokens


@pytest.fixture(scope="module")
def url(tiny_folder):
    with running(str(tiny_folder), max_batch=4) as (url, _):
        yield url


def ok(**kw):
    return {"model": "m", "prompt": "Anne", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def schema(s):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}


BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b"", 400, None),
    ("completions", b'{"model": "m", "prompt": "\xff\xfe"}', 400, None),
    ("completions", b'{"model": "m", "prompt": "\\ud800"}', 400, None),
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("completions", b'{"model": "m", "prompt": "a", "temperature": NaN}', 400, None),
    ("completions", b'{"model": "m", "model": "m", "prompt": "a"}', 400, None),
    ("completions", b'{"model": "m", "prompt": "a", "n": ' + b"9" * 5000 + b"}", 400, None),
    ("completions", {"model": "m"}, 400, None),
    ("completions", {"prompt": "Anne"}, 400, None),
    ("completions", ok(prompt=5), 400, None),
    ("completions", ok(prompt=[]), 400, None),
    ("completions", ok(prompt=""), 400, None),
    ("completions", ok(prompt=[1, 99999]), 400, None),
    ("completions", ok(prompt=[1, -3]), 400, None),
    ("completions", ok(prompt=LONG), 400, "context_length_exceeded"),
    ("completions", ok(max_tokens=0), 400, None),
    ("completions", ok(max_tokens=-5), 400, None),
    ("completions", ok(max_tokens=True), 400, None),
    ("completions", ok(max_tokens="ten"), 400, None),
    ("completions", ok(max_tokens=100_000), 400, "context_length_exceeded"),
    ("completions", ok(model="gpt-4"), 404, "model_not_found"),
    ("completions", ok(temperature=2.5), 400, None),
    ("completions", ok(temperature=-1), 400, None),
    ("completions", ok(temperature="hot"), 400, None),
    ("completions", ok(top_p=1.5), 400, None),
    ("completions", ok(top_k=-7), 400, None),
    ("completions", ok(min_p=2), 400, None),
    ("completions", ok(repetition_penalty=0), 400, None),
    ("completions", ok(n=0), 400, None),
    ("completions", ok(n=5), 400, None),  # past --max-batch 4
    ("completions", ok(seed=-1), 400, None),
    ("completions", ok(logprobs=9), 400, None),
    ("completions", ok(stop=["x"] * 5000), 400, None),
    ("completions", ok(stop=["x" * 10_000]), 400, None),
    ("completions", ok(logit_bias={"999999": 5}), 400, None),
    ("completions", ok(logit_bias={"abc": 5}), 400, None),
    ("completions", ok(stream="yes"), 400, None),
    ("completions", ok(response_format={"type": "xml"}), 400, None),
    ("completions", ok(response_format=schema({"type": "nonsense"})), 400, None),
    ("completions", ok(response_format=schema({"$ref": "#/nowhere"})), 400, None),
    ("completions", ok(response_format=schema([1, 2])), 400, None),
    ("completions", ok(response_format={"type": "json_schema"}), 400, None),
    ("completions", ok(response_format=schema({"type": "string", "pattern": "(("})), 400, None),
    ("completions", ok(suffix="x"), 400, None),
    ("chat/completions", chat(messages=[]), 400, None),
    ("chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
    ("chat/completions", chat(messages=[{"content": "hi"}]), 400, None),
    ("chat/completions", chat(messages="hello"), 400, None),
    ("chat/completions", chat(messages=[{"role": "user", "content": 7}]), 400, None),
    ("chat/completions", chat(messages=[{"role": "user", "content": LONG}]), 400,
     "context_length_exceeded"),  # fmt: skip
    ("chat/completions", chat(max_completion_tokens=0), 400, None),
    ("chat/completions", chat(top_logprobs=3), 400, None),
    ("chat/completions", chat(logprobs=True, top_logprobs=50), 400, None),
    ("chat/completions", chat(presence_penalty=1.0), 400, None),
    ("chat/completions", chat(stream_options={"include_usage": "x"}), 400, None),
]


@pytest.mark.parametrize("path, body, status, code", BAD)
def test_bad_requests_get_openai_errors(url, path, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/{path}", content=content,
                   headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text and ".cc:" not in r.text  # nor a C++ source line
    if code:
        assert error["code"] == code
    # and the server still serves
    assert httpx.post(f"{url}/v1/completions", json=ok(), timeout=30).status_code == 200


def test_oversized_body_and_unknown_routes(url):
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, spm_model):
    from mlx_openelm.tokenizer import write_tokenizer_files

    folder = make_model_folder(tmp_path_factory.mktemp("base") / "base", None, never_eos=True)
    write_tokenizer_files(folder, spm_model, 512, chat_template=None)
    with running(str(folder), api_key="sesame") as (url, _):
        yield url


def test_api_key_and_a_base_model(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json=ok(model="base"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{base_url}/v1/models", headers=wrong).status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == 200  # health needs no key
    key = {"Authorization": "Bearer sesame"}
    # Greedy, so that no sampled EOS ends it early (the default temperature is 1); two tokens may
    # still decode to no text (byte pieces, whitespace), so count the tokens.
    r = httpx.post(f"{base_url}/v1/completions", json=ok(model="base", temperature=0), headers=key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{base_url}/v1/chat/completions", json=chat(model="base"), headers=key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_slow_and_idle_clients_are_timed_out(url, monkeypatch):
    # Each holds a socket; without deadlines enough of them lock everyone else out (uvicorn's
    # limit_concurrency answers 503 to all newcomers). Deadlines of a second here.
    import socket
    import time

    from mlx_openelm.serve import app, http

    monkeypatch.setattr(http, "HEADER_SECONDS", 1.0)
    monkeypatch.setattr(app, "BODY_SECONDS", 1.0)
    host, port = url.removeprefix("http://").split(":")
    partial = {
        "idle": b"",
        "headers": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{\"model\": ",
    }
    socks = {}
    for kind, data in partial.items():
        socks[kind] = [socket.create_connection((host, int(port))) for _ in range(5)]
        for s in socks[kind]:
            s.sendall(data)
            s.settimeout(10)
    # while they wait, others are served
    assert httpx.post(f"{url}/v1/completions", json=ok(), timeout=30).status_code == 200
    time.sleep(0.5)
    for s in socks["headers"]:  # a header line now and then does not keep it open
        s.sendall(b"X-Slow: 1\r\n")
    start = time.monotonic()
    for kind, group in socks.items():
        for s in group:
            reply = b""  # the server answers, or closes the connection without a word
            while chunk := s.recv(4096):
                reply += chunk
            if kind == "body":
                assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
            else:
                assert reply == b""
            s.close()
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_stream_stops_the_server_cleanly(sig):
    # The reply in flight ends at once with a 503 event, and the process exits with the signal's
    # code. Before, the reply ran on past uvicorn's grace period and was cut (a traceback in the
    # log), and interpreter teardown could abort ("terminate called without an active
    # exception", exit 134).
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from serving import free_port

    demo = Path(__file__).parent.parent / "demo" / "OpenELM-austen"
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_openelm.cli", "serve", "--model", str(demo), "--port",
           str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        body = {"model": "OpenELM-austen", "prompt": "Anne", "max_tokens": 1900, "stream": True,
                "ignore_eos": True}  # fmt: skip
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                if len(events) == 5:
                    proc.send_signal(getattr(signal, sig))
        assert events[-1] == "data: [DONE]" and "shutting down" in events[-2], events[-2:]
        assert len(events) < 1000  # it did not run on to its 1900 tokens
        stderr = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), stderr[-2000:]
    assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-4000:]
