"""Where MLX spends a prefill and a decode step, by kind of operation.

`mlx-openelm bench` says how fast; this says why. It times each operation kind inside the real
forward pass (matmuls, attention, RMSNorm, RoPE, SiLU gate) by evaluating around it, and puts the
results next to two machine facts that bound them: the bandwidth of one-row products over all the
model's weights (what a decode step must stream), and the cost of `exp` per element in MLX, numpy
and (when installed) PyTorch, since attention's softmax and the SiLU gate are exp-bound.

    python -m mlx_openelm.bench.profile --preset 270M --prompt-tokens 512

Evaluating around every operation stops MLX from overlapping them, so the kinds add up to more than
the plain pass; the plain pass is printed too. In a decode step the RMSNorm before a product, the
SiLU gate and the skip connections run inside the product kernels, so they count as matmul; over
the KV cache, the q/k-norm and RoPE run inside the attention's kernels, so they count as
attention. Run it on a quiet machine: the figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx  # this module's package, imported first, has picked the BLAS

import mlx_openelm
from mlx_openelm import kernels

from .machine import median_time

EXP_ELEMENTS = 2**22


@contextmanager
def timed_ops(totals: dict[str, float]) -> Iterator[None]:
    """Patch the model's building blocks so each call is evaluated and timed into `totals`."""

    depth = 0  # a block that calls another (MLX's ops in place of a kernel) is timed once

    def wrap(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            nonlocal depth
            if depth:
                return fn(*args, **kwargs)
            mx.eval([a for a in args if isinstance(a, mx.array)])
            t = time.perf_counter()
            depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                depth -= 1
            if out is not None:  # None: the kernels do not apply, the caller takes other ops
                mx.eval(out)
                totals[name] += time.perf_counter() - t
            return out

        return run

    # The model calls its layers through `kernels`, native kernel or MLX op alike.
    patches = [
        (kernels, "linear", "matmul"),
        (kernels, "embedding_as_linear", "matmul"),  # the tied output head
        (kernels, "rms_norm", "RMSNorm"),
        (kernels, "attention_inputs", "RoPE"),  # with the q/k-norm and the head split
        (kernels, "attention", "attention"),
        # Over the model's KV cache on a CPU, the q/k-norm, RoPE and the cache write run inside
        # the attention's two kernels (or it returns None and the three above run).
        (kernels, "cached_attention", "attention"),
        (kernels, "silu_gate", "SiLU gate"),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, wrap(name, getattr(owner, attr)))
        product = kernels.linear

        def linear(layer, x, *, norm=None, gate=False, residual=None):
            # A decoding product runs the norm or gate before it in its own kernel (timed as the
            # matmul); elsewhere they run first, timed as what they are.
            if x.size // x.shape[-1] > kernels.MAX_ROWS:
                if norm is not None:
                    x, norm = kernels.rms_norm(norm, x), None
                if gate:
                    x, gate = kernels.silu_gate(x), False
            return product(layer, x, norm=norm, gate=gate, residual=residual)

        kernels.linear = linear
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _prefill(model: Any, ids: mx.array) -> Callable[[], None]:
    from mlx_openelm.generation import make_prompt_cache

    def run() -> None:
        cache = make_prompt_cache(model)
        model(ids[None], cache=cache)
        mx.eval([c.state for c in cache])

    return run


def _decode(model: Any, context: int, vocab: int) -> Callable[[], None]:
    """One decode step after `context` tokens (the cache is rebuilt, untimed, once)."""
    from mlx_openelm.generation import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.arange(context)[None] % vocab, cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.array([[1]])

    def run() -> None:
        # Trim back to `context` so every timed step sees the same cache length.
        for c in cache:
            c.offset = context
        logits = model(token, cache=cache)[:, -1]
        mx.eval(mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1))

    return run


def breakdown(run: Callable[[], None], trials: int) -> dict[str, float]:
    """Seconds per pass: `total` plain, and each operation kind with `other` the rest."""
    plain = median_time(run, trials)
    per_trial: list[dict[str, float]] = []
    for _ in range(trials + 1):  # the first is a warm-up
        totals: dict[str, float] = defaultdict(float)
        with timed_ops(totals):
            t = time.perf_counter()
            run()
            totals["synced total"] = time.perf_counter() - t
        per_trial.append(totals)
    keys = per_trial[-1].keys()
    out = {k: statistics.median(t[k] for t in per_trial[1:]) for k in keys}
    out["other"] = out["synced total"] - sum(v for k, v in out.items() if k != "synced total")
    out["total"] = plain
    return out


def weight_stream(model: Any, trials: int) -> dict[str, float]:
    """Seconds for one-row products with every weight matrix, all in one graph (a decode step's
    matmuls with nothing else), through MLX's own op (the BLAS, or its quantized matmul) and
    through the kernels."""
    import mlx.nn as nn

    heads = (nn.Embedding, nn.QuantizedEmbedding)
    kinds = (nn.Linear, nn.QuantizedLinear, *heads)
    layers = [m for _, m in model.named_modules() if isinstance(m, kinds)]
    width = lambda m: m.weight.shape[1] * (32 // m.bits if hasattr(m, "bits") else 1)
    rows = {width(m): mx.random.normal((1, width(m))) for m in layers}
    mx.eval(list(rows.values()))

    def products(fast: bool) -> list[mx.array]:
        out = []
        for m in layers:
            x = rows[width(m)]
            if isinstance(m, heads):
                out.append(kernels.embedding_as_linear(m, x) if fast else m.as_linear(x))
            else:
                out.append(kernels.linear(m, x) if fast else m(x))
        return out

    name = "MLX quantized" if any(hasattr(m, "bits") for m in layers) else "BLAS"
    out = {name: median_time(lambda: mx.eval(products(False)), trials)}
    if kernels.available():
        out["kernels"] = median_time(lambda: mx.eval(products(True)), trials)
    return out


def exp_cost(trials: int) -> dict[str, float]:
    """Nanoseconds per element of exp on 4M fp32 values: MLX, numpy, PyTorch (if installed)."""
    import numpy as np

    x = mx.random.normal((EXP_ELEMENTS,))
    mx.eval(x)
    out = {"mlx": median_time(lambda: mx.eval(mx.exp(x)), trials)}
    xn = np.asarray(x)
    out["numpy"] = median_time(lambda: np.exp(xn), trials)
    try:
        import torch
    except ImportError:
        pass
    else:
        xt = torch.from_numpy(xn)
        name = f"torch ({torch.get_num_threads()} threads)"
        out[name] = median_time(lambda: torch.exp(xt), trials)
    return {k: v / EXP_ELEMENTS * 1e9 for k, v in out.items()}


def profile(
    args: Any, prompt_tokens: int = 512, trials: int = 3, q_bits: int | None = None
) -> dict[str, Any]:
    """Profile a model of shape `args` (random weights: the timing does not depend on them),
    quantized to `q_bits` in groups of 64 as `mlx-openelm bench -q` does."""
    import mlx.nn as nn

    model = mlx_openelm.Model(args)
    if q_bits:
        nn.quantize(model, group_size=64, bits=q_bits)
    mx.eval(model.parameters())
    ids = mx.arange(prompt_tokens) % args.vocab_size
    from mlx.utils import tree_flatten

    nbytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()) if p.ndim == 2)
    stream = weight_stream(model, trials)
    return {
        "prefill": breakdown(_prefill(model, ids), trials),
        "decode": breakdown(_decode(model, prompt_tokens, args.vocab_size), trials),
        "weight_stream": {
            "bytes": nbytes,
            "seconds": stream,
            "bytes_per_s": {k: nbytes / v for k, v in stream.items()},
        },  # fmt: skip
        "exp_ns_per_element": exp_cost(trials),
        "prompt_tokens": prompt_tokens,
        "blas": mlx_openelm._blas.loaded,
        "kernels": kernels.status(),
        "device": str(mx.default_device()),
    }


def print_profile(report: dict[str, Any]) -> None:
    n = report["prompt_tokens"]
    print(f"device {report['device']}, BLAS {report['blas']}, CPU kernels {report['kernels']}")
    for phase, label in (("prefill", f"prefill of {n} tokens"), ("decode", f"decode step at {n}")):
        r = report[phase]
        synced = r["synced total"]
        print(f"\n{label}: {r['total'] * 1e3:.1f} ms plain, {synced * 1e3:.1f} ms evaluated per op")
        for k, v in sorted(r.items(), key=lambda kv: -kv[1]):
            if k not in ("total", "synced total"):
                print(f"  {k:<10} {v * 1e3:8.1f} ms  {100 * v / synced:5.1f}%")
    w = report["weight_stream"]
    print(f"\none-row products over all {w['bytes'] / 1e9:.2f} GB of weights, nothing else:")
    for k, seconds in w["seconds"].items():
        print(f"  {k:<10} {seconds * 1e3:8.1f} ms  ({w['bytes_per_s'][k] / 1e9:.1f} GB/s)")
    costs = ", ".join(f"{k} {v:.2f}" for k, v in report["exp_ns_per_element"].items())
    print(f"exp, ns per fp32 element: {costs}")


def main(argv: list[str] | None = None) -> None:
    from mlx_openelm.config import ModelArgs, preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="270M", help="270M, 450M, 1_1B or 3B")
    g.add_argument("--config", help="a config.json of your own shape")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--q-bits", type=int, choices=(4, 8), help="quantize the weights (groups of 64)")
    a = p.parse_args(argv)
    args = ModelArgs.from_file(a.config) if a.config else preset(a.preset)
    print_profile(profile(args, a.prompt_tokens, a.trials, a.q_bits))


if __name__ == "__main__":
    main()
