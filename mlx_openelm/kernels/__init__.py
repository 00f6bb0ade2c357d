"""Native CPU kernels for the OpenELM forward pass, running inside MLX's own graph.

MLX's CPU back end on x86 and Linux ARM is scalar (SIMD width 1 outside Apple's Accelerate), runs
RMSNorm, RoPE and attention as graphs of small ops, and quantized products as a scalar loop. These
kernels (C++ `Primitive`s with AVX2/FMA and OpenMP, `csrc/`) replace those pieces when the model
runs on a CPU stream: few-row products for decoding (fp32 and MLX's affine 4/8-bit), a tiled
4/8-bit product for prefill and training, RMSNorm, the SiLU gate, the attention inputs (split,
q/k-norm, RoPE), attention, the training loss (cross-entropy) and the log-softmax that decoding
samples from.

Each op here takes what the model has and returns what MLX's own ops would: the kernel when it
applies (CPU stream, float32, a shape it handles), else the MLX op, so Metal, CUDA, a Mac (which
builds nothing) and a machine where the build failed run exactly as before. Each kernel's vjp is
that of the MLX ops it replaces (set in C++), so training through the kernels stays exact;
attention and cross-entropy, where the backward pass is the cost, have backward kernels.

`MLX_OPENELM_KERNELS=0` turns them off (A/B runs); `status()` says whether they are on and why not.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

from ..kv_cache import KVCache, RowCaches

log = logging.getLogger(__name__)

# Decoding multiplies one row (a few with batching); above this many rows MKL's sgemm is faster.
MAX_ROWS = 4
_max_rows = MAX_ROWS  # raised inside `batch_rows`

_ext: Any = None
_why_off: str | None = None
_loaded = False
_disabled = 0  # depth of `disabled()` blocks


def _load() -> None:
    global _ext, _why_off, _loaded
    _loaded = True
    if os.environ.get("MLX_OPENELM_KERNELS", "1") == "0":
        _why_off = "off (MLX_OPENELM_KERNELS=0)"
        return
    if not sys.platform.startswith("linux"):
        _why_off = "off (built on Linux only; MLX's Metal and Accelerate paths need none)"
        return
    from .build import MODULE, BuildError, build

    try:
        spec = importlib.util.spec_from_file_location(MODULE, build())
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        # A nanobind other than mlx's own shows here as a TypeError on mlx.core.array.
        x = ext.rms_norm(mx.ones((1, 8)), mx.ones((8,)), 1e-6, stream=mx.cpu)
        mx.eval(x)
    except BuildError as e:
        _why_off = f"off ({e})"
    except Exception as e:  # a broken build or ABI mismatch must never stop the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _why_off = f"off (the built kernels do not load with this mlx: {first})"
    else:
        _ext = ext
    if _why_off and not _why_off.startswith("off (MLX_OPENELM"):
        log.warning("mlx-openelm: CPU kernels %s; running MLX's own ops", _why_off)


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    if not _loaded:
        _load()
    return _ext is not None


def status() -> str:
    """One line for reports: 'on (AVX2/FMA + VNNI, 2 threads)' or 'off (why)'."""
    if not available():
        return _why_off or "off"
    simd = "AVX2/FMA" if _ext.avx2 else "portable C++"
    if _ext.vnni:
        simd += " + AVX-512 VNNI" if _ext.vnni512 else " + VNNI"
    return f"on ({simd}, {_ext.threads()} threads)"


@contextmanager
def disabled() -> Iterator[None]:
    """MLX's own ops inside the block: A/B comparisons in one process."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


@contextmanager
def batch_rows(rows: int) -> Iterator[None]:
    """Products of up to `rows` rows go through the few-row kernels inside the block: a batched
    decode step (the server's) takes each row exactly as a one-row step would, so a sequence's
    tokens do not depend on its batch (sgemm sums in another order)."""
    global _max_rows
    previous, _max_rows = _max_rows, max(rows, MAX_ROWS)
    try:
        yield
    finally:
        _max_rows = previous


def _on_cpu(*arrays: mx.array) -> bool:
    return (
        not _disabled
        and available()
        and mx.default_device() == mx.cpu
        and all(a.dtype == mx.float32 for a in arrays)
    )


def _quantized_args(layer: nn.Module) -> tuple:
    return (layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)


def _quantized(x: mx.array, layer: nn.Module) -> mx.array:
    args = _quantized_args(layer)
    if x.size // x.shape[-1] <= _max_rows:
        return _ext.quantized_linear(x, *args)
    return _tiled_product(*args[3:])(x, *args[:3])


@functools.cache
def _tiled_product(group_size: int, bits: int) -> Any:
    """x @ dequantize(w).T for many rows (prefill, training), w dequantized a tile at a time and
    each tile through sgemm (csrc/quantized_matmul.cpp), and its vjp's dx the same kernel
    untransposed, where MLX's own quantized_matmul and its vjp are scalar loops (QLoRA on a CPU
    ran 30x slower than LoRA). Nor does the backward pass keep float32 weights, as matmul's vjp
    would: a quantized model's training would then peak at a float one's."""

    @mx.custom_function
    def product(x, w, scales, biases):
        return _ext.quantized_matmul(x, w, scales, biases, True, group_size, bits)

    @product.vjp
    def product_vjp(primals, dy, _):
        x, w, scales, biases = primals
        K = x.shape[-1]
        dx = _ext.quantized_matmul(dy, w, scales, biases, False, group_size, bits)
        # The scales' and biases' gradients, lazy: a LoRA step never evaluates them.
        dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, K)
        _, (ds, db) = mx.vjp(
            lambda s, b: [mx.dequantize(w, s, b, group_size, bits)], [scales, biases], [dw]
        )
        return dx, mx.zeros_like(w), ds, db

    return product


def _quantized_ok(layer: nn.Module, x: mx.array) -> bool:
    return (
        getattr(layer, "mode", "affine") == "affine"
        and layer.bits in (4, 8)
        and layer.group_size % 16 == 0
        and "biases" in layer
        and _on_cpu(x)
    )


def _product(layer: nn.Module, x: mx.array) -> mx.array:
    if type(layer) is LoRALinear:  # mlx-lm's __call__, the base product through the kernels
        z = (layer.dropout(x) @ layer.lora_a) @ layer.lora_b
        return _product(layer.linear, x) + (layer.scale * z).astype(x.dtype)
    if "bias" not in layer:
        if type(layer) is nn.Linear and x.size // x.shape[-1] <= _max_rows:
            if _on_cpu(x, layer.weight):
                return _ext.linear(x, layer.weight)
        elif type(layer) is nn.QuantizedLinear and _quantized_ok(layer, x):
            return _quantized(x, layer)
    return layer(x)


def linear(
    layer: nn.Module,
    x: mx.array,
    *,
    norm: nn.Module | None = None,
    gate: bool = False,
    residual: mx.array | None = None,
) -> mx.array:
    """`residual + layer(pre(x))` for an `nn.Linear` or `nn.QuantizedLinear` without bias, through
    the kernels, where `pre` is `norm` (an `nn.RMSNorm`), the SiLU gate (`gate`: x = [gate, value])
    or nothing, and `residual` (a skip connection shaped like the output) is optional. A decoding
    product runs all of it in one kernel: in a decode step, MLX's scheduling of each small op costs
    more than its arithmetic."""
    fusable = (
        x.size // x.shape[-1] <= _max_rows
        and "bias" not in layer
        and (norm is None or (type(norm) is nn.RMSNorm and norm.weight.dtype == mx.float32))
        and (residual is None or residual.dtype == mx.float32)
    )
    if fusable:
        fused: dict[str, Any] = {"gate": gate, "residual": residual}
        if norm is not None:
            fused.update(norm_weight=norm.weight, eps=norm.eps)
        if type(layer) is nn.Linear and _on_cpu(x, layer.weight):
            return _ext.linear(x, layer.weight, **fused)
        if type(layer) is nn.QuantizedLinear and _quantized_ok(layer, x):
            return _ext.quantized_linear(x, *_quantized_args(layer), **fused)
    if norm is not None:
        x = rms_norm(norm, x)
    if gate:
        x = silu_gate(x)
    out = _product(layer, x)
    return out if residual is None else residual + out


def embedding_as_linear(embedding: nn.Module, x: mx.array) -> mx.array:
    """The tied output head, `embedding.as_linear(x)`, through the kernels."""
    if type(embedding) is LoRAEmbedding:  # mlx-lm's as_linear, the base product as below
        z = (embedding.dropout(x) @ embedding.lora_b.T) @ embedding.lora_a.T
        return embedding_as_linear(embedding.embedding, x) + (embedding.scale * z).astype(x.dtype)
    if type(embedding) is nn.Embedding and x.size // x.shape[-1] <= _max_rows:
        if _on_cpu(x, embedding.weight):
            return _ext.linear(x, embedding.weight)
    elif type(embedding) is nn.QuantizedEmbedding and _quantized_ok(embedding, x):
        return _quantized(x, embedding)
    return embedding.as_linear(x)


# ---- normalisation, gate, attention -------------------------------------------------------------


def rms_norm(norm: nn.Module, x: mx.array) -> mx.array:
    """`norm(x)` for an `nn.RMSNorm`, through the kernel."""
    if type(norm) is nn.RMSNorm and _on_cpu(x, norm.weight):
        return _ext.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


def _silu_gate_reference(x: mx.array) -> mx.array:
    gate, x = mx.split(x, 2, axis=-1)  # the first half is the gate
    return nn.silu(gate) * x


def silu_gate(x: mx.array) -> mx.array:
    """silu(x[..., :F]) * x[..., F:] (OpenELM's SwiGLU, the gate first)."""
    if _on_cpu(x):
        return _ext.silu_gate(x)
    return _silu_gate_reference(x)


def attention_inputs(
    qkv: mx.array,
    n_heads: int,
    n_kv_heads: int,
    q_norm: nn.Module | None,
    k_norm: nn.Module | None,
    rope: nn.RoPE,
    offset: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """qkv (B, L, n_heads + 2 n_kv_heads, head_dim) -> q, k, v (B, heads, L, head_dim), with q/k
    RMS-normed (when the norms are given) and rotated from position `offset`."""
    if isinstance(offset, int) and _heads_ok(qkv, q_norm, k_norm, rope):
        qw, kw, eps, freqs = _head_args(q_norm, k_norm, rope)
        return tuple(
            _ext.attention_inputs(qkv, n_heads, n_kv_heads, qw, kw, eps, freqs, rope.base, offset)
        )
    q, k, v = mx.split(qkv.transpose(0, 2, 1, 3), [n_heads, n_heads + n_kv_heads], axis=1)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)  # before RoPE, as the reference does
    return rope(q, offset=offset), rope(k, offset=offset), v


def _heads_ok(qkv: mx.array, q_norm: Any, k_norm: Any, rope: nn.RoPE) -> bool:
    """Whether the kernels can split, norm and rotate qkv's heads as these layers would."""
    norms = [q_norm, k_norm] if q_norm is not None else []
    return (
        all(type(n) is nn.RMSNorm for n in norms)
        and (not norms or q_norm.eps == k_norm.eps)
        and type(rope) is nn.RoPE
        and not rope.traditional
        and rope.dims == qkv.shape[-1]
        and rope.scale == 1.0
        and _on_cpu(qkv, *(n.weight for n in norms))
    )


def _head_args(q_norm: Any, k_norm: Any, rope: nn.RoPE) -> tuple:
    if q_norm is None:
        return None, None, 0.0, _inv_freqs(float(rope.base), rope.dims)
    return q_norm.weight, k_norm.weight, q_norm.eps, _inv_freqs(float(rope.base), rope.dims)


def cached_attention(
    qkv: mx.array,
    cache: Any,
    n_heads: int,
    n_kv_heads: int,
    q_norm: nn.Module | None,
    k_norm: nn.Module | None,
    rope: nn.RoPE,
    scale: float,
) -> mx.array | None:
    """The attention of one layer over `cache` (an `mlx_openelm.kv_cache.KVCache`), this step's
    keys and values written into it: (B, L, n_heads * head_dim) from qkv (B, L, n_heads + 2
    n_kv_heads, head_dim), by two kernels (kv_cache.py says why). `cache` may be a `RowCaches`
    too (the server's batch): a decoding row of qkv per cache, of any lengths. None where the
    kernels do not apply; the caller then takes `attention_inputs`, `cache.update_and_fetch` and
    `attention`."""
    if not _heads_ok(qkv, q_norm, k_norm, rope):
        return None
    if isinstance(cache, RowCaches):
        return _rows_attention(qkv, cache, n_heads, n_kv_heads, q_norm, k_norm, rope, scale)
    if type(cache) is not KVCache:
        return None
    B, L, _, hd = qkv.shape
    cache.reserve(B, n_kv_heads, L, hd, qkv.dtype)
    qw, kw, eps, freqs = _head_args(q_norm, k_norm, rope)
    offset = cache.offset
    cache.kv = _ext.kv_write(cache.kv, qkv, n_heads, n_kv_heads, kw, eps, freqs, rope.base, offset)
    cache.offset += L
    return _ext.cached_attention(
        qkv, cache.kv, n_heads, n_kv_heads, qw, eps, freqs, rope.base, offset, scale
    )


def _rows_attention(qkv, caches, n_heads, n_kv_heads, q_norm, k_norm, rope, scale):
    """Each row's keys and values written into its own cache, then one kernel attends all rows,
    each to the same bits as alone: B + 1 graph nodes a layer where a row at a time took 3B + 1
    (each row's slice, write and attention, and the concatenation)."""
    if qkv.shape[1] != 1 or not all(type(c) is KVCache for c in caches):
        return None
    qw, kw, eps, freqs = _head_args(q_norm, k_norm, rope)
    offsets = []
    for b, cache in enumerate(caches):
        cache.reserve(1, n_kv_heads, 1, qkv.shape[-1], qkv.dtype)
        offsets.append(cache.offset)
        cache.kv = _ext.kv_write(
            cache.kv, qkv, n_heads, n_kv_heads, kw, eps, freqs, rope.base, cache.offset, row=b
        )
        cache.offset += 1
    kvs = [c.kv for c in caches]
    return _ext.rows_attention(
        qkv, kvs, offsets, n_heads, n_kv_heads, qw, eps, freqs, rope.base, scale
    )


@functools.cache
def _inv_freqs(base: float, dims: int) -> mx.array:
    # As MLX's RoPE makes them (fast.cpp's fallback), so the angles match to the bit.
    half = dims // 2
    freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
    mx.eval(freqs)
    return freqs


def attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: Any, cache: Any
) -> mx.array:
    """Attention of q (B, nq, L, hd) over k, v (B, nkv, S, hd) -> (B, L, nq * hd)."""
    B, _, L, _ = q.shape
    plain_cache = cache is None or not hasattr(cache, "bits")  # not a quantized KV cache
    if plain_cache and (mask is None or isinstance(mask, str) and mask == "causal"):
        if _on_cpu(q, k, v):
            return _ext.attention(q, k, v, scale, mask is not None).reshape(B, L, -1)
    return _attention_reference(q, k, v, scale=scale, mask=mask, cache=cache).reshape(B, L, -1)


def _attention_reference(q, k, v, *, scale, mask, cache) -> mx.array:
    from mlx_lm.models.base import scaled_dot_product_attention

    out = scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3)


# ---- the loss --------------------------------------------------------------------------------


def log_softmax(logits: mx.array) -> mx.array:
    """`logits - logsumexp(logits)` over the last axis: what decoding samples from, every token."""
    if _on_cpu(logits):
        return _ext.log_softmax(logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """`nn.losses.cross_entropy(logits, targets)` (per position, no reduction), through the
    kernel: the vocabulary's logsumexp and its gradient are most of a small model's step."""
    if targets.dtype in (mx.int32, mx.int64, mx.uint32) and _on_cpu(logits):
        return _ext.cross_entropy(logits, targets.astype(mx.int32))
    return nn.losses.cross_entropy(logits, targets)
