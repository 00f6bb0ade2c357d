"""Serving benchmark: N concurrent streaming clients against OpenAI-compatible servers (ours,
llama.cpp's llama-server, mlx_lm.server), alternating servers at each client count.

Each client sends `--requests` completions one after another (a fixed prompt of `--prompt-len`
tokens' worth of text, `--max-tokens` out, temperature 0, ignore_eos so every reply is full
length), streamed. Reported per server and client count: aggregate output tokens/s (all tokens /
wall time), time to first token and inter-token latency p50/p95. Start the servers first:

    mlx-openelm serve --model M --port 8080 --max-batch 8
    llama-server -m M.gguf --port 8081 -np 8 -c 16384
    mlx_lm.server --model M --port 8082
    python -m mlx_openelm.bench.serve_bench ours=http://127.0.0.1:8080 \\
        llama.cpp=http://127.0.0.1:8081 mlx_lm=http://127.0.0.1:8082 --clients 1 4 8 \\
        --out bench/results/serve-270M-fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

WORDS = "It was a truth universally acknowledged that a single man in possession of a good fortune"


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    tic = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - tic if stamps else None, "stamps": stamps, "tokens": len(stamps)}


def run(url: str, model: str, clients: int, requests: int, prompt: str, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests):
            r = one_request(url, model, prompt, max_tokens)
            with lock:
                results.append(r)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itl = sorted(b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:]))
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * _pct(ttft, 50),
        "ttft_p95_ms": 1e3 * _pct(ttft, 95),
        "itl_p50_ms": 1e3 * _pct(itl, 50),
        "itl_p95_ms": 1e3 * _pct(itl, 95),
    }


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def model_id(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def table(rows: list[dict]) -> str:
    head = "| server | clients | agg tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['aggregate_tok_s']:.1f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | "
            f"{r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Concurrent streaming clients against servers")
    ap.add_argument("servers", nargs="+", help="NAME=URL, e.g. ours=http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt words (about tokens)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.txt")
    args = ap.parse_args(argv)
    servers = dict(s.split("=", 1) for s in args.servers)
    words = WORDS.split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_len))
    ids = {name: model_id(url) for name, url in servers.items()}
    rows = []
    for n in args.clients:
        for name, url in servers.items():  # alternating: each count runs every server in turn
            one_request(url, ids[name], prompt, 4)  # warm
            r = {"server": name, **run(url, ids[name], n, args.requests, prompt, args.max_tokens)}
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    text = table(rows)
    print(text)
    if args.out:
        meta = {"command": " ".join(sys.argv), "prompt_words": args.prompt_len,
                "max_tokens": args.max_tokens, "requests_per_client": args.requests}  # fmt: skip
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        args.out.with_suffix(".txt").write_text(meta["command"] + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
