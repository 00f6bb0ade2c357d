"""Prefill and decode timing of one implementation, in its own process.

Each implementation runs in a fresh interpreter (`python -m mlx_openelm.bench.bench worker SPEC`),
so that its peak memory is its own and torch and MLX never share a process (nor MLX's BLAS preload,
which would slow torch down). Protocol for every side: batch 1, greedy, KV cache. First an untimed
fp32 check run per prompt length (its tokens and top-2 margins are what `runner.check_agreement`
compares), then the weights are cast to the timed dtype, a warm-up, and `trials` timed runs per
prompt length whose median is reported. Prefill tok/s = prompt tokens / time to first token;
decode tok/s = (gen - 1) / time from the first token to the last.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_openelm.errors import MissingDependency, UserError

from .machine import cpu_name

MAX_CHECK_TOKENS = 32  # generated tokens compared between implementations
BLAS_ENV = "MLX_OPENELM_BLAS"  # see mlx_openelm/_blas.py


@dataclass
class Result:
    implementation: str
    backend: str
    device: str
    dtype: str
    prompt_tokens: int
    gen_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    ttft_s_trials: list[float]
    peak_memory_bytes: int
    peak_memory_kind: str
    peak_rss_bytes: int | None
    trials: int
    prefill_tps_trials: list[float]
    decode_tps_trials: list[float]
    check_tokens: list[int]  # greedy tokens of the fp32 check run (none when spec["check"] is off)
    check_margins: list[float]  # top-1 minus top-2 log-probability at each of them
    threads: int | None
    blas: str | None
    kernels: str | None = None  # mlx-openelm's native CPU kernels: "on (...)" or "off (why)"


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """The same pseudo-random prompt for every implementation (ids 3.. skip unk/bos/eos)."""
    import numpy as np

    return np.random.default_rng(seed + n).integers(3, vocab_size, n).tolist()


# ---- process memory: peak RSS over a window (Linux can reset the high-water mark) ---------------


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        return True
    except OSError:
        return False


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---- one implementation, inside a worker process -------------------------------------------------


class MLXRunner:
    """mlx-openelm (fused or naive RMSNorm) or mlx-lm's `openelm`, through its own generate_step."""

    def __init__(self, folder: str, impl: str):
        import mlx.core as mx  # noqa: I001

        import mlx_openelm  # before mlx.core: picks the BLAS
        from mlx_openelm import kernels

        self.mx = mx
        if impl == "mlx-lm":
            from mlx_lm.generate import generate_step
            from mlx_lm.utils import load_model

            self.model, _ = load_model(Path(folder))
        else:
            from mlx_openelm.generation import generate_step

            naive = impl.endswith("naive-rmsnorm")
            self.model, _, _ = mlx_openelm.load(folder, naive_rms_norm=naive)
        self.generate_step = generate_step
        self.model.set_dtype(mx.float32)  # the check runs in fp32 (a cast, exact from bf16)
        mx.eval(self.model.parameters())
        if mx.cuda.is_available():
            self.backend = "cuda"
        elif mx.metal.is_available():
            self.backend = "metal"
        else:
            self.backend = "cpu"
        self.device = mx.device_info().get("device_name", self.backend)
        self.threads = None
        self.blas = mlx_openelm._blas.loaded
        # mlx-lm's model never calls them; on a GPU they stand aside.
        on_cpu = self.backend == "cpu" and impl != "mlx-lm"
        self.kernels = kernels.status() if on_cpu else None

    def cast(self, dtype: str, q_bits: int | None) -> None:
        import mlx.nn as nn

        self.model.set_dtype(getattr(self.mx, dtype))
        if q_bits:
            nn.quantize(self.model, group_size=64, bits=q_bits)
        if self.kernels is not None:  # as `generate` loads it: 16-bit scales, float32 around them
            from mlx_openelm.loading import float32_on_cpu

            float32_on_cpu(self.model)
        self.mx.eval(self.model.parameters())

    def run(self, prompt: list[int], gen: int, check: bool = False):
        mx = self.mx
        tokens, margins, t0 = [], [], time.perf_counter()
        for token, logprobs in self.generate_step(mx.array(prompt), self.model, max_tokens=gen):
            tokens.append(int(token))
            if len(tokens) == 1:
                t1 = time.perf_counter()
            if check:
                top2 = mx.topk(logprobs.astype(mx.float32), 2)
                margins.append(abs((top2[1] - top2[0]).item()))
        return t1 - t0, time.perf_counter() - t1, tokens, margins

    def reset_peak(self) -> None:
        self.mx.reset_peak_memory()

    def peak(self) -> tuple[int, str]:
        return self.mx.get_peak_memory(), "mlx allocator peak"


class TorchRunner:
    """The PyTorch reference (`reference.OpenELM`), with its own greedy loop and KV cache."""

    def __init__(self, folder: str, device: str):
        import torch
        from mlx_openelm.bench.reference import OpenELM

        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--reference-device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("PyTorch sees no CUDA GPU here: use --reference-device cpu (or auto)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch, self.dev = torch, device
        self.model = OpenELM.from_pretrained(folder, dtype=torch.float32, device=device)
        self.cuda = device == "cuda"
        blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        self.blas = f"torch {blas.group(1)}" if blas else None
        self.backend = device
        if self.cuda:
            self.device = torch.cuda.get_device_name()
            self.threads = None
        else:
            self.device = cpu_name()
            self.threads = torch.get_num_threads()

    def cast(self, dtype: str, q_bits: int | None) -> None:
        self.model.to(getattr(self.torch, dtype))

    def run(self, prompt: list[int], gen: int, check: bool = False):
        from mlx_openelm.bench.reference import KVCache

        torch = self.torch
        with torch.inference_mode():
            cache, tokens, margins = KVCache(), [], []

            def pick(logits):
                if check:
                    top2 = logits.float().topk(2).values
                    margins.append(float(top2[0] - top2[1]))
                return logits.argmax()

            t0 = time.perf_counter()
            ids = torch.tensor([prompt], device=self.dev)
            token = pick(self.model(ids, cache=cache, logits_to_keep=1)[0, -1])
            tokens.append(int(token))  # int() waits for the device
            t1 = time.perf_counter()
            for _ in range(gen - 1):
                token = pick(self.model(token.view(1, 1), cache=cache)[0, -1])
                tokens.append(int(token))
        return t1 - t0, time.perf_counter() - t1, tokens, margins

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> tuple[int, str]:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(), "torch cuda allocator peak"
        return peak_rss(), "process peak RSS"


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Check, then time, one implementation on every prompt length of `spec`."""
    impl = spec["implementation"]
    if impl == "torch-reference":
        runner: MLXRunner | TorchRunner = TorchRunner(spec["folder"], spec["device"])
    else:
        runner = MLXRunner(spec["folder"], impl)
    gen, vocab = spec["gen_tokens"], spec["vocab_size"]
    lengths = spec["prompt_tokens"]
    runner.run(prompt_ids(16, vocab), 4)  # warm-up
    checks = {}
    if spec.get("check", True):
        n_check = min(gen, MAX_CHECK_TOKENS)
        checks = {n: runner.run(prompt_ids(n, vocab), n_check, True) for n in lengths}
    cast = spec["dtype"] != "float32" or bool(spec.get("q_bits"))
    if cast:
        runner.cast(spec["dtype"], spec.get("q_bits"))
        runner.run(prompt_ids(16, vocab), 4)
    if cast or not checks:  # else the fp32 check runs have warmed every length
        for n in lengths:
            runner.run(prompt_ids(n, vocab), 4)
    results = []
    for n in lengths:
        prompt = prompt_ids(n, vocab)
        runner.reset_peak()
        rss_ok = reset_peak_rss()
        trials = [runner.run(prompt, gen) for _ in range(spec["trials"])]
        mem, kind = runner.peak()
        prefill = [n / t for t, _, _, _ in trials]
        decode = [(gen - 1) / d for _, d, _, _ in trials]
        _, _, check_tokens, margins = checks.get(n, (0, 0, [], []))
        result = Result(
            implementation=impl,
            backend=runner.backend,
            device=runner.device,
            dtype=spec["dtype_name"],
            prompt_tokens=n,
            gen_tokens=gen,
            prefill_tps=statistics.median(prefill),
            decode_tps=statistics.median(decode),
            ttft_s=statistics.median(t for t, _, _, _ in trials),
            ttft_s_trials=[t for t, _, _, _ in trials],
            peak_memory_bytes=int(mem),
            peak_memory_kind=kind,
            peak_rss_bytes=peak_rss() if rss_ok else None,
            trials=spec["trials"],
            prefill_tps_trials=prefill,
            decode_tps_trials=decode,
            check_tokens=check_tokens,
            check_margins=[round(m, 6) for m in margins],
            threads=runner.threads,
            blas=runner.blas,
            kernels=getattr(runner, "kernels", None),
        )
        results.append(asdict(result))
        print(
            f"  {impl} prompt {n}: prefill {result.prefill_tps:.1f} tok/s, "
            f"decode {result.decode_tps:.2f} tok/s",
            file=sys.stderr,
            flush=True,
        )
    return results


# Errors a user can fix travel back from the worker as themselves, not as a crash (a missing
# package there, torch for the reference, is the user's to install).
_USER_ERRORS = {e.__name__: e for e in (UserError, FileNotFoundError, ImportError)}
_RAISED_AS = {"ImportError": MissingDependency}


def run_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one implementation in a fresh interpreter, echoing its progress lines to stderr."""
    env = {**os.environ, **spec.get("env", {})}
    if spec["implementation"] == "torch-reference":
        # Importing mlx_openelm preloads a BLAS globally and torch's own BLAS calls then bind to
        # it, which slowed torch (docs/performance.md), so the reference process never does.
        env[BLAS_ENV] = "none"
    # The worker starts in a folder of its own: `python -m` puts its working directory first on
    # sys.path, and from a clone of this repository (non-editable install) the source tree's
    # `mlx_openelm/`, which lacks `bench`, would shadow the installed package.
    spec = {**spec, "folder": str(Path(spec["folder"]).resolve())}
    with tempfile.TemporaryDirectory(prefix="mlx-openelm-worker-") as tmp:
        answer_path = Path(tmp) / "answer.json"
        cmd = [sys.executable, "-m", "mlx_openelm.bench.bench", "worker", json.dumps(spec)]
        proc = subprocess.Popen(
            [*cmd, str(answer_path)], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp
        )
        tail: list[str] = []
        for line in proc.stderr:
            if line.startswith("  "):
                sys.stderr.write(line)
            tail = [*tail[-9:], line.rstrip()]
        proc.wait()
        answer = json.loads(answer_path.read_text()) if answer_path.exists() else {}
    if proc.returncode == 0 and "results" in answer:
        return answer["results"]
    if "error" in answer:
        raise _RAISED_AS.get(answer["type"], _USER_ERRORS[answer["type"]])(answer["error"])
    raise RuntimeError(
        f"the {spec['implementation']} worker failed:\n" + ("\n".join(tail) or "(no output)")
    )


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    # argv: worker SPEC_JSON ANSWER_PATH; the answer is a file, so stdout stays free for libraries.
    try:
        answer = {"results": worker(json.loads(sys.argv[2]))}
    except tuple(_USER_ERRORS.values()) as e:
        kind = next(k for k, cls in _USER_ERRORS.items() if isinstance(e, cls))
        answer = {"error": str(e), "type": kind}
    Path(sys.argv[3]).write_text(json.dumps(answer))
    sys.exit(2 if "error" in answer else 0)
