"""Prefill and decode throughput: mlx-openelm against mlx-lm and the PyTorch reference, in one run.

Each implementation runs in its own subprocess (`python -m mlx_openelm.bench.bench worker ...`), so
that peak memory is its own, torch and MLX never share a process, and BLAS set-up is the same for
every run. Protocol for every side: batch 1, greedy, KV cache; warm-up, then `trials` runs per prompt
length and the median. Prefill tok/s = prompt tokens / time to first token; decode tok/s = (gen - 1)
/ time from the first token to the last.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHECK_TOKENS = 8  # generated tokens that must agree between implementations (fp32)


@dataclass
class Result:
    implementation: str
    backend: str
    dtype: str
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    trials: int
    prefill_tps_trials: list[float]
    decode_tps_trials: list[float]
    tokens: list[int]


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """The same pseudo-random prompt for every implementation (ids 3.. skip unk/bos/eos)."""
    import numpy as np

    return np.random.default_rng(seed + n).integers(3, vocab_size, n).tolist()


# ---- one implementation, inside a worker process -------------------------------------------------


def _mlx_runner(folder: str, impl: str, dtype: str, naive: bool, q_bits: int | None):
    import mlx_openelm  # before mlx.core: picks the BLAS
    import mlx.core as mx  # noqa: I001
    import mlx.nn as nn

    if impl == "mlx-lm":
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(folder))
    else:
        from mlx_openelm.generate import generate_step

        model, _, _ = mlx_openelm.load(folder, naive_rms_norm=naive)
    model.set_dtype(getattr(mx, dtype))
    if q_bits:
        nn.quantize(model, group_size=64, bits=q_bits)
    mx.eval(model.parameters())

    def run(prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        tokens, t0 = [], time.perf_counter()
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=gen):
            tokens.append(int(token))
            if len(tokens) == 1:
                t1 = time.perf_counter()
        return t1 - t0, time.perf_counter() - t1, tokens

    def peak() -> tuple[int, str]:
        return mx.get_peak_memory(), "mlx allocator peak"

    backend = "cuda" if mx.cuda.is_available() else ("metal" if mx.metal.is_available() else "cpu")
    return run, peak, mx.reset_peak_memory, backend


def _torch_runner(folder: str, dtype: str, device: str):
    import torch

    from mlx_openelm.bench.reference import KVCache, OpenELM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = OpenELM.from_pretrained(folder, dtype=getattr(torch, dtype), device=device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    @torch.inference_mode()
    def run(prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        cache = KVCache()
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt], device=device), cache=cache)
        token = logits[0, -1].argmax()
        tokens = [int(token)]  # .item() syncs
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            token = model(token.view(1, 1), cache=cache)[0, -1].argmax()
            tokens.append(int(token))
        sync()
        return t1 - t0, time.perf_counter() - t1, tokens

    def peak() -> tuple[int, str]:
        if cuda:
            return torch.cuda.max_memory_allocated(), "torch cuda allocator peak"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"

    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    return run, peak, reset, device.split(":")[0]


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    impl = spec["implementation"]
    if impl == "torch-reference":
        run, peak, reset, backend = _torch_runner(spec["folder"], spec["dtype"], spec["device"])
    else:
        naive = impl.endswith("naive-rmsnorm")
        run, peak, reset, backend = _mlx_runner(
            spec["folder"], impl, spec["dtype"], naive, spec.get("q_bits")
        )
    gen = spec["gen_tokens"]
    run(prompt_ids(16, spec["vocab_size"]), 4)  # warm-up
    results = []
    for n in spec["prompt_tokens"]:
        prompt = prompt_ids(n, spec["vocab_size"])
        run(prompt, min(gen, 8))  # warm this length's kernels
        reset()
        trials = [run(prompt, gen) for _ in range(spec["trials"])]
        prefill = [n / t for t, _, _ in trials]
        decode = [(gen - 1) / d for _, d, _ in trials]
        mem, kind = peak()
        results.append(
            asdict(
                Result(
                    implementation=spec.get("label", impl),
                    backend=backend,
                    dtype=spec["dtype_name"],
                    prompt_tokens=n,
                    gen_tokens=gen,
                    prefill_tps=statistics.median(prefill),
                    decode_tps=statistics.median(decode),
                    ttft_s=statistics.median(t for t, _, _ in trials),
                    peak_memory_bytes=int(mem),
                    peak_memory_kind=kind,
                    trials=spec["trials"],
                    prefill_tps_trials=prefill,
                    decode_tps_trials=decode,
                    tokens=trials[0][2][:CHECK_TOKENS],
                )
            )
        )
    return results


def run_worker(spec: dict[str, Any], timeout: float | None = None) -> list[dict[str, Any]]:
    """Run one implementation in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.bench.bench", "worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{spec['implementation']} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- machine facts ---------------------------------------------------------------------------------


def measure_bandwidth(gib: float = 0.5, trials: int = 5) -> float:
    """Bytes/s that MLX reads from memory here: the median of summing a `gib` GiB fp32 array."""
    import mlx_openelm  # noqa: F401
    import mlx.core as mx  # noqa: I001

    x = mx.ones((int(gib * 2**30) // 4,), dtype=mx.float32)
    mx.eval(x)
    mx.eval(x.sum())
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(x.sum())
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times)


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import mlx_openelm._blas as blas

    versions = {}
    for pkg in ("mlx", "mlx-lm", "torch", "numpy", "mlx-openelm"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "blas": blas.loaded,
        "versions": versions,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    print(json.dumps(worker(json.loads(sys.argv[2]))))
