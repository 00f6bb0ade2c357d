"""`mlx-openelm serve` through the official `openai` client: both endpoints, streamed and not,
greedy replies equal to `generate`'s, batches equal to requests alone, prompt reuse, structured
output, a client that hangs up."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import pytest
from serving import running

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")

PROMPTS = ["It was a truth", "Anne Elliot was", "The weather", "Captain Wentworth said"]
SYSTEM = "You are a careful reader of Jane Austen. " * 12  # past one prompt-cache block
N = 12


@pytest.fixture(scope="module")
def expected(tiny_folder):
    """`generate`'s greedy outputs, computed before the server owns MLX."""
    from mlx_openelm.chat_template import ChatTemplate, encode_conversation
    from mlx_openelm.generation import generate
    from mlx_openelm.prepare import load_for_generation
    from mlx_openelm.tokenizer import CHAT_TEMPLATE

    model, tok = load_for_generation(str(tiny_folder))
    template = ChatTemplate(CHAT_TEMPLATE, tok)
    out = {p: generate(model, tok, p, max_tokens=N) for p in PROMPTS}
    for turns in ([("user", "Hello")], [("system", SYSTEM), ("user", "Who is Anne?")],
                  [("system", SYSTEM), ("user", "Who is Anne?"), ("assistant", "A sister."),
                   ("user", "And Mary?")]):  # fmt: skip
        messages = [{"role": r, "content": c} for r, c in turns]
        ids = encode_conversation(tok, template, messages)
        out[json.dumps(turns)] = generate(model, tok, ids, max_tokens=N, trim_space=True)
    return out


@pytest.fixture(scope="module")
def server(tiny_folder, expected):
    with running(str(tiny_folder), max_batch=4, max_queue=2) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def chat(client, turns, **kw):
    messages = [{"role": r, "content": c} for r, c in turns]
    return client.chat.completions.create(model="m", messages=messages, **kw)


def test_health_and_models(server, client, tiny_folder):
    assert httpx.get(server[0] + "/health").status_code == 200
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == str(tiny_folder) and "m" in ids
    assert client.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_generate(client, expected):
    r = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == expected[PROMPTS[0]]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == N and r.usage.prompt_tokens > 0


def test_streamed_completion_equals_generate(client, expected):
    stream = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=N,
                                       temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected[PROMPTS[1]]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_equals_generate_chat(client, expected):
    turns = [("user", "Hello")]
    r = chat(client, turns, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == expected[json.dumps(turns)]
    assert r.choices[0].message.role == "assistant"
    stream = chat(client, turns, max_completion_tokens=N, temperature=0, stream=True,
                  stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[json.dumps(turns)]
    assert chunks[-1].usage.completion_tokens == N and not chunks[-1].choices


def test_a_batch_equals_each_request_alone(client, expected):
    results = {}

    def one(p):
        r = client.completions.create(model="m", prompt=p, max_tokens=N, temperature=0)
        results[p] = r.choices[0].text

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {p: expected[p] for p in PROMPTS}
    # n choices at temperature 0 share the prompt's prefill and all equal the greedy reply
    r = client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=N, temperature=0, n=3)
    assert [c.text for c in r.choices] == [expected[PROMPTS[2]]] * 3


def test_a_next_turn_reuses_the_cached_prompt(client, expected):
    first = [("system", SYSTEM), ("user", "Who is Anne?")]
    r1 = chat(client, first, max_tokens=N, temperature=0)
    assert r1.choices[0].message.content == expected[json.dumps(first)]
    second = [*first, ("assistant", "A sister."), ("user", "And Mary?")]
    r2 = chat(client, second, max_tokens=N, temperature=0)
    assert r2.choices[0].message.content == expected[json.dumps(second)]
    assert r2.usage.prompt_tokens_details.cached_tokens >= 64


def test_top_p_0_and_nulls_are_what_openai_means(server, expected):
    # top_p 0 keeps only the likeliest token: greedy at any temperature. A null option is its
    # default, as OpenAI's API has it (apps send them).
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 1.5, "top_p": 0}
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected[PROMPTS[0]]
    nulls = dict.fromkeys(
        ["top_p", "n", "stop", "seed", "logprobs", "stream", "user", "presence_penalty",
         "logit_bias", "response_format", "top_k"]
    )  # fmt: skip
    body = {**body, "temperature": 0, **nulls}
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected[PROMPTS[0]]


def test_sampling_options_and_seed(client):
    kw = dict(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2})  # fmt: skip
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    assert client.completions.create(**{**kw, "n": 2}).choices[1].text == a


def test_stop_string_and_logprobs(client, expected):
    full = expected[PROMPTS[0]]
    stop = full[len(full) // 2 :][:3]
    r = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=N, temperature=0,
                                  stop=[stop], logprobs=3)  # fmt: skip
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs[0]) == 3 and all(x <= 0 for x in lp.token_logprobs)
    c = chat(client, [("user", "Hello")], max_tokens=3, temperature=0, logprobs=True,
             top_logprobs=2)  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy takes the top one


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def test_json_schema_output_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for temperature in (0, 1.0):
        r = chat(client, [("user", "Describe a person")], max_tokens=60,
                 temperature=temperature, seed=3, response_format=fmt)  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model="m", prompt="{", max_tokens=200, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")


def test_a_client_that_hangs_up_frees_its_place(server):
    url, engine = server
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 400, "stream": True,
            "temperature": 0}  # fmt: skip
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while engine.load["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load["running"] == 0


def test_more_requests_than_the_batch_and_queue_get_429(server):
    url, engine = server
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0}
    codes = []

    def one():
        codes.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in codes and codes.count(200) >= 4 and set(codes) <= {200, 429}


def test_structured_output_without_xgrammar_is_a_clear_400(tokenizer, monkeypatch):
    """xgrammar is an optional extra (it requires torch): without it only JSON output is off."""
    import sys

    from mlx_openelm.serve.grammar import Grammars
    from mlx_openelm.serve.protocol import APIError, ResponseFormat

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails
    grammars = Grammars(tokenizer)
    assert grammars.compile(ResponseFormat(type="text")) is None
    with pytest.raises(APIError) as e:
        grammars.compile(ResponseFormat(type="json_object"))
    assert e.value.status == 400 and e.value.code == "structured_output_unavailable"
    assert "mlx-openelm[structured]" in str(e.value)


def test_a_server_of_one_row_starts_and_serves(tiny_folder, expected):
    # --max-batch 1 (bench-serve's one client): the warm-up must fit the batch, or it never ends.
    with running(str(tiny_folder), max_batch=1) as (url, _):
        one = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = one.completions.create(model="m", prompt=PROMPTS[1], max_tokens=N, temperature=0)
        assert r.choices[0].text == expected[PROMPTS[1]]
