"""`mlx-openelm bench-serve`: N concurrent streaming clients against OpenAI-compatible servers on
the same weights, started here: ours (`mlx-openelm serve`), llama.cpp's `llama-server` on a GGUF of
the folder (`llama_cpp.export`: f32 beside fp32, q8_0/q4_0 beside 8-/4-bit) and, optionally,
`mlx_lm.server` on the same folder.

Each client sends `requests` completions one after another: a prompt of `prompt_tokens` token ids
(its own ids per request, so no server reuses a cached prompt), `max_tokens` out at temperature 0
with EOS ignored, streamed. Every client count runs every server in turn, in each round. Per server
and count: aggregate output tok/s (all tokens / wall time), time to first token and inter-token
latency p50/p95.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_openelm.errors import MissingDependency, UserError

from . import llama_cpp as llama
from .machine import machine_info

SERVERS = ("mlx-openelm", "llama.cpp", "mlx-lm")


# ---- one client count against one server --------------------------------------------------------


def one_request(url: str, model: str, prompt: Any, max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    tic = time.perf_counter()
    stamps, usage = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise UserError(f"{url} answered {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                # A token's chunk; a closing one with no text and a finish reason is none.
                if c.get("text") or not c.get("finish_reason"):
                    stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - tic if stamps else None, "stamps": stamps, "tokens": tokens}


def run_clients(url: str, model: str, prompts: list[Any], clients: int, max_tokens: int) -> dict:
    """`clients` threads share `prompts` (each takes the next one until none is left)."""
    results: list[dict] = []
    errors: list[Exception] = []
    queue = list(reversed(prompts))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                prompt = queue.pop()
            try:
                r = one_request(url, model, prompt, max_tokens)
            except Exception as e:  # noqa: BLE001 - reported below, after the others stop
                with lock:
                    errors.append(e)
                return
            with lock:
                results.append(r)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        raise errors[0]
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itl = sorted(b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:]))
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p95_ms": 1e3 * _pct(ttft, 95),
        "itl_p50_ms": 1e3 * _pct(itl, 50), "itl_p95_ms": 1e3 * _pct(itl, 95),
    }  # fmt: skip


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ---- the servers --------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(name: str, cmd: list[str], port: int, log_dir: Path, timeout: float = 600):
    """Start a server process, wait until it answers, yield its URL, stop it."""
    import httpx

    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text().strip().splitlines()[-5:]
                raise UserError(f"{name} exited ({proc.returncode}): " + " | ".join(tail))
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"{name} did not start in {timeout:.0f} s ({log_dir / name}.log)")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def quantized_folder(folder: Path, out: Path, bits: int, group_size: int = 64) -> Path:
    """`folder` quantised as `bench` quantises its MLX rows (nn.quantize, groups of 64), with
    its tokenizer: the served 4-/8-bit model."""
    import mlx.core as mx  # noqa: I001
    import mlx.nn as nn

    import mlx_openelm
    from mlx_openelm.loading import save_model

    model, _, args = mlx_openelm.load(folder)
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, args, quantization={"group_size": group_size, "bits": bits})
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    del model
    mx.clear_cache()
    return out


def _llama_server(path: str | Path) -> str:
    """llama-server beside the llama-bench that `llama_cpp.find_tools` finds."""
    binary = Path(llama.find_tools(path)["bench"]).parent / "llama-server"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(
            f"--llama-cpp {path}: no llama-server beside llama-bench; build it too "
            "(-DLLAMA_BUILD_SERVER=ON, target llama-server)"
        )
    return str(binary)


# ---- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    """What `bench_serve` was asked to do; constructing one checks it (the user's errors, one line
    each), before any model is quantised or server started."""

    model: str | Path
    q_bits: int | None = None
    llama_cpp: str | Path | None = None
    mlx_lm: bool = False
    clients: tuple[int, ...] = (1, 4, 8)  # sorted, each once
    requests: int = 2
    prompt_tokens: int = 128
    max_tokens: int = 64
    rounds: int = 1
    threads: int | None = None
    json_path: str | Path | None = None
    plot_path: str | Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from .report import require_matplotlib

        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} has no config.json: give an MLX model folder")
        if self.q_bits is not None and self.q_bits not in llama.GGUF_FOR_BITS:
            raise UserError(f"--q-bits must be 4 or 8 (llama.cpp's q4_0 / q8_0), got {self.q_bits}")
        if not self.clients or self.clients[0] < 1 or self.requests < 1 or self.rounds < 1:
            raise UserError("--clients, --requests and --rounds must be at least 1")
        if self.prompt_tokens < 2 or self.max_tokens < 2:
            raise UserError("--prompt-tokens and --max-tokens must be at least 2")
        if self.plot_path:
            require_matplotlib()
        if self.mlx_lm and shutil.which("mlx_lm.server") is None:
            raise MissingDependency("--mlx-lm needs mlx-lm's server: pip install mlx-lm")

    @property
    def folder(self) -> Path:
        return Path(self.model).expanduser()

    @property
    def slots(self) -> int:
        """Each server's concurrent sequences: enough for the most clients."""
        return max(self.clients)


def bench_serve(
    model: str | Path,
    *,
    q_bits: int | None = None,
    llama_cpp: str | Path | None = None,
    mlx_lm: bool = False,
    clients: Sequence[int] = (1, 4, 8),
    requests: int = 2,
    prompt_tokens: int = 128,
    max_tokens: int = 64,
    rounds: int = 1,
    threads: int | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Serve one model folder from each server and time concurrent streaming clients.

    Args:
        model: an MLX model folder with its tokenizer (float weights; `q_bits` quantises them).
        q_bits: serve the folder quantised to 4 or 8 bits (llama.cpp: q4_0 / q8_0).
        llama_cpp: llama.cpp's build/bin folder (or its llama-server): add llama-server.
        mlx_lm: add `mlx_lm.server` on the same folder (slow on a CPU).
        clients: the concurrent client counts; each server gets `max(clients)` slots.
        requests: completions per client at each count.
        prompt_tokens, max_tokens: each request's prompt and output lengths (EOS ignored).
        rounds: how many times every count runs every server in turn (the median is reported).
        threads: llama-server's threads (default: the cores this process may run on).
        json_path, plot_path: write the report as JSON and a PNG plot.
    """
    # First: locals() holds the arguments only.
    opts = ServeOptions(**{**locals(), "clients": tuple(sorted(set(clients)))})
    from .report import print_serve_report, save, serve_plot

    binary = _llama_server(opts.llama_cpp) if opts.llama_cpp else None
    threads = opts.threads or llama.threads()
    info = machine_info()
    config = json.loads((opts.folder / "config.json").read_text())
    batches, warm = _draw_prompts(opts, min(config["vocab_size"], _tokenizer_size(opts.folder)))
    with tempfile.TemporaryDirectory(prefix="mlx-openelm-serve-bench-") as tmp, ExitStack() as st:
        tmp = Path(tmp)
        served = opts.folder
        if opts.q_bits:
            print(f"quantising {served} to {opts.q_bits} bits", file=sys.stderr, flush=True)
            served = quantized_folder(served, tmp / f"q{opts.q_bits}", opts.q_bits)
        urls, prompt_of = _start_servers(st, opts, served, binary, threads, tmp)
        rows = _time_servers(opts, urls, prompt_of, batches, warm)
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = list(os.getloadavg())
    report = {
        "model": str(opts.model),
        "dtype": f"{opts.q_bits}-bit" if opts.q_bits else config.get("torch_dtype", "float32"),
        "settings": {"clients": list(opts.clients), "requests_per_client": opts.requests,
                     "rounds": opts.rounds, "prompt_tokens": opts.prompt_tokens,
                     "max_tokens": opts.max_tokens, "slots": opts.slots,
                     "llama_server_threads": threads, "seed": opts.seed},
        "command": " ".join(sys.argv), "machine": info, "rounds": rows,
        "results": summarize(rows),
    }  # fmt: skip
    report["ratios"] = ratios(report["results"])
    print_serve_report(report)
    save(report, opts.json_path, opts.plot_path, serve_plot)
    return report


def _draw_prompts(
    opts: ServeOptions, vocab: int
) -> tuple[dict[tuple[int, int], list[list[int]]], list[int]]:
    """Each request's prompt ids by (round, client count), and a warm-up prompt none shares.

    Its own ids per request in every round, so that no prompt cache serves one (the servers of a
    round get the same ones); ids from 3: no unk/bos/eos.
    """
    import numpy as np

    rng = np.random.default_rng(opts.seed)
    draw = lambda: rng.integers(3, vocab, opts.prompt_tokens).tolist()  # noqa: E731
    batches = {
        (r, n): [draw() for _ in range(n * opts.requests)]
        for r in range(opts.rounds)
        for n in opts.clients
    }
    return batches, draw()


def _start_servers(
    stack: ExitStack, opts: ServeOptions, served: Path, binary: str | None, threads: int, tmp: Path
) -> tuple[dict[str, str], dict[str, Callable[[list[int]], Any]]]:
    """Start each server asked for on `served` (stopped when `stack` closes): its URL, and how it
    takes a prompt (token ids, or text for mlx_lm.server)."""
    urls, prompt_of = {}, {}
    port = _free_port()
    cmd = [sys.executable, "-m", "mlx_openelm.cli", "serve", "--model", str(served),
           "--port", str(port), "--max-batch", str(opts.slots)]  # fmt: skip
    urls[SERVERS[0]] = stack.enter_context(server(SERVERS[0], cmd, port, tmp))
    prompt_of[SERVERS[0]] = lambda ids: ids
    if binary:
        gtype = llama.gguf_type("float32", opts.q_bits)
        print(f"exporting {served} to GGUF {gtype}", file=sys.stderr, flush=True)
        gguf = llama.export(served, tmp / f"model-{gtype}.gguf", gtype)
        port = _free_port()
        context = opts.slots * (opts.prompt_tokens + opts.max_tokens + 64)  # split among slots
        cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(opts.slots), "-c", str(context),
               "-t", str(threads), "-tb", str(threads)]  # fmt: skip
        urls[SERVERS[1]] = stack.enter_context(server(SERVERS[1], cmd, port, tmp))
        prompt_of[SERVERS[1]] = lambda ids: ids
    if opts.mlx_lm:
        from mlx_openelm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(served)
        port = _free_port()
        cmd = ["mlx_lm.server", "--model", str(served), "--port", str(port)]
        urls[SERVERS[2]] = stack.enter_context(server(SERVERS[2], cmd, port, tmp))
        prompt_of[SERVERS[2]] = tokenizer.decode  # it takes text only
    return urls, prompt_of


def _time_servers(
    opts: ServeOptions,
    urls: dict[str, str],
    prompt_of: dict[str, Callable[[list[int]], Any]],
    batches: dict[tuple[int, int], list[list[int]]],
    warm: list[int],
) -> list[dict[str, Any]]:
    """Warm every server up, then per round and client count run each server in turn, so that a
    busy spell on the machine hits every server alike: one row per run."""
    ids = {name: _model_id(url) for name, url in urls.items()}
    for name, url in urls.items():  # warm up: first requests build and allocate
        one_request(url, ids[name], prompt_of[name](warm), 4)
    rows = []
    for r in range(opts.rounds):
        for n in opts.clients:
            for name, url in urls.items():
                prompts = [prompt_of[name](p) for p in batches[r, n]]
                row = {"server": name, "round": r,
                       **run_clients(url, ids[name], prompts, n, opts.max_tokens)}  # fmt: skip
                print(f"  round {r + 1}: {name}, {n} clients: {row['aggregate_tok_s']:.1f} "
                      f"tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p50 "
                      f"{row['itl_p50_ms']:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
                rows.append(row)
    return rows


def _tokenizer_size(folder: Path) -> int:
    from mlx_openelm.tokenizer import load_tokenizer, require_tokenizer

    return require_tokenizer(load_tokenizer(folder), folder).vocab_size


def _model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


METRICS = ("aggregate_tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per server and client count: each metric's median over the rounds."""
    out = []
    for key in dict.fromkeys((r["server"], r["clients"]) for r in rows):
        mine = [r for r in rows if (r["server"], r["clients"]) == key]
        row = {"server": key[0], "clients": key[1], "rounds": len(mine)}
        for m in METRICS:
            row[m] = statistics.median(r[m] for r in mine)
        row["aggregate_tok_s_rounds"] = [r["aggregate_tok_s"] for r in mine]
        out.append(row)
    return out


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours against each other server at each count, and ours at the most clients against one."""
    by = {(r["server"], r["clients"]): r for r in results}
    out = []
    for (name, n), r in by.items():
        ours = by.get((SERVERS[0], n))
        if name != SERVERS[0] and ours:
            out.append({"of": SERVERS[0], "to": name, "clients": n,
                        "aggregate": ours["aggregate_tok_s"] / r["aggregate_tok_s"],
                        "ttft_p50": ours["ttft_p50_ms"] / r["ttft_p50_ms"]})  # fmt: skip
    counts = sorted({n for _, n in by})
    for name in dict.fromkeys(s for s, _ in by):
        if len(counts) > 1 and (name, counts[0]) in by and (name, counts[-1]) in by:
            out.append({"of": name, "scaling": f"{counts[-1]} vs {counts[0]} clients",
                        "aggregate": by[name, counts[-1]]["aggregate_tok_s"]
                        / by[name, counts[0]]["aggregate_tok_s"]})  # fmt: skip
    return out
