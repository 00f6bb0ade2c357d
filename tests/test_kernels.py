"""The native CPU kernels against the MLX ops they replace, one by one and in the whole model.

Shapes come from the four presets (model dims 1280-3072, head dims 64/128, GQA 4:1, FFN widths up to
12288) plus odd sizes that leave SIMD tails; fp32 must agree within 1e-5 relative.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_openelm import kernels
from mlx_openelm.kernels import build

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels {kernels.status()}")

RTOL = 1e-5


def close(a: mx.array, b: mx.array, rtol: float = RTOL) -> None:
    """max |a - b| within rtol of b's largest magnitude."""
    assert a.shape == b.shape and a.dtype == b.dtype
    err, scale = mx.abs(a - b).max().item(), mx.abs(b).max().item()
    assert err <= rtol * max(scale, 1e-30), f"max abs diff {err:.3g} for max |ref| {scale:.3g}"


def both(fn, *args):
    """fn(*args) through the kernels and through MLX's ops."""
    fast = fn(*args)
    with kernels.disabled():
        ref = fn(*args)
    mx.eval(fast, ref)
    return fast, ref


def normal(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n", [(1280, 1920), (1536, 300), (2048, 77), (3072, 129), (12288, 40),
                                 (1283, 37), (5, 3)])  # fmt: skip
def test_linear_matches_matmul(rows, k, n):
    layer = nn.Linear(k, n, bias=False)
    layer.weight = normal(n, k, seed=1) * k**-0.5
    x = normal(1, rows, k)
    close(*both(kernels.linear, layer, x))


def test_linear_leaves_many_rows_and_biases_to_mlx():
    layer = nn.Linear(64, 32, bias=True)
    x = normal(1, 3, 64)
    fast, ref = both(kernels.linear, layer, x)
    assert mx.array_equal(fast, ref)  # the same op ran
    layer = nn.Linear(64, 32, bias=False)
    x = normal(2, 9, 64)
    assert mx.array_equal(*both(kernels.linear, layer, x))


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("rows", [2, 5, 7, 8])  # 4-bit rows go in fours
@pytest.mark.parametrize("n", [1000, 1003])  # 1003: fp32 weight rows left over from the blocks
def test_a_batch_of_rows_gives_each_row_what_it_gives_alone(bits, rows, n):
    # The server's decode step (kernels.batch_rows): past four rows the weights go in tiles
    # that serve every block of rows, and quantized rows take the one-row integer dots each
    # (4-bit ones four at a time, each as it would alone).
    k = 1280
    layer = nn.Linear(k, n, bias=False)
    layer.weight = normal(n, k, seed=3) * k**-0.5
    if bits:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits)
    norm = nn.RMSNorm(k, eps=1e-5)
    x, res = normal(1, rows, k, seed=4), normal(1, rows, n, seed=5)
    with kernels.batch_rows(rows):
        batch = kernels.linear(layer, x, norm=norm, residual=res)
    alone = [kernels.linear(layer, x[:, i : i + 1], norm=norm, residual=res[:, i : i + 1])
             for i in range(rows)]  # fmt: skip
    assert mx.array_equal(batch, mx.concatenate(alone, axis=1))
    with kernels.disabled():
        close(batch, layer(norm(x)) + res)


@pytest.mark.parametrize("bits", [4, 8])
# 832 (13 heads of 64): the 4-bit one-row product's last 64 elements are not a whole block of 128
@pytest.mark.parametrize(
    "k, group_size", [(1280, 32), (1280, 64), (1280, 128), (832, 32), (832, 64)]
)
@pytest.mark.parametrize("rows", [1, 3, 7])  # 7 > MAX_ROWS: the tiled product
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])  # of the scales
def test_quantized_linear_matches_mlx(bits, k, group_size, rows, dtype):
    n = 300
    layer = nn.Linear(k, n, bias=False)
    layer.weight = (normal(n, k, seed=2) * k**-0.5).astype(dtype)
    layer = nn.QuantizedLinear.from_linear(layer, group_size=group_size, bits=bits)
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    x = normal(1, rows, k)
    close(*both(kernels.linear, layer, x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_one_row_keeps_float32_accuracy_on_awkward_activations(bits, group_size):
    # One quantized row takes integer dots on VNNI CPUs, with x split into int8 pieces per 32
    # elements: a block of zeros, an outlier beside tiny values and exact powers of two must
    # come out as float32 does.
    k, n = 1280, 256
    layer = nn.Linear(k, n, bias=False)
    layer.weight = normal(n, k, seed=5) * k**-0.5
    layer = nn.QuantizedLinear.from_linear(layer, group_size=group_size, bits=bits)
    x = normal(1, 1, k, seed=6) * 1e-3
    x[..., :32] = 0.0
    x[..., 40] = 1e4
    x[..., 64:96] = mx.array([2.0**i for i in range(-16, 16)])
    x[..., 96:128] = -x[..., 64:96]
    close(*both(kernels.linear, layer, x))
    x[..., 40] = 0.0  # the outlier dominates every output: the rest must be right without it too
    close(*both(kernels.linear, layer, x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x0F])
def test_quantized_one_row_at_the_extremes_of_the_integer_dots(bits, fill):
    # Every weight at the end of its range (or alternating ends) against x whose first piece is
    # +-127 everywhere: plain AVX2's maddubs sums two byte products in int16, which would saturate
    # here if the 8-bit weights went in as they are (255 * 127 * 2 > 32767).
    k, n = 1280, 64
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=64, bits=bits)
    layer.weight = mx.full(layer.weight.shape, fill * 0x01010101, dtype=mx.uint32)
    layer.scales = 0.01 + 0.01 * mx.abs(normal(*layer.scales.shape, seed=11))
    # Groups centred on zero, as trained weights are: the middle code is about 0.
    middle = 2 ** (bits - 1)
    layer.biases = -middle * layer.scales + 0.01 * normal(*layer.biases.shape, seed=12)
    w = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 64, bits), np.float64)
    signs = mx.where(mx.arange(k) % 3 == 0, -1.0, 1.0)
    for x in [mx.ones((1, 1, k)), signs.reshape(1, 1, k) * 3.0]:
        # Against float64: here MLX's own quantized product is ~1e-5 off, the kernel ~3e-7.
        truth = mx.array((w @ np.array(x, np.float64).reshape(k)).astype(np.float32))
        close(kernels.linear(layer, x).reshape(n), truth)


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("rows", [1, 3, 7])  # 7: the prefill path, the ops one by one
@pytest.mark.parametrize("pre", ["norm", "gate", None])
def test_linear_fuses_the_norm_or_gate_and_the_residual(bits, rows, pre):
    k, n = 256, 96
    layer = nn.Linear(k, n, bias=False)
    layer.weight = normal(n, k, seed=7) * k**-0.5
    if bits:
        layer = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits)
    norm = nn.RMSNorm(k, eps=1e-5)
    norm.weight = 1 + 0.1 * normal(k, seed=10)
    x = normal(1, rows, 2 * k if pre == "gate" else k, seed=8)
    res = normal(1, rows, n, seed=9)
    opts = {"norm": norm} if pre == "norm" else {"gate": True} if pre == "gate" else {}
    fast, ref = both(lambda x, res: kernels.linear(layer, x, residual=res, **opts), x, res)
    close(fast, ref)
    if rows == 1 and bits is None:  # what the kernel folds in, as separate ops
        parts = kernels.rms_norm(norm, x) if pre == "norm" else x
        parts = kernels.silu_gate(parts) if pre == "gate" else parts
        assert mx.array_equal(fast, kernels.linear(layer, parts) + res)
    # Training differentiates through the same call.
    loss = lambda x, res: (kernels.linear(layer, x, residual=res, **opts) ** 2).sum()
    for f, r in zip(*both(mx.grad(loss, argnums=(0, 1)), x, res)):
        close(f, r)


def test_fused_linear_rejects_what_does_not_match():
    x, w = normal(1, 2, 64), mx.zeros((32, 64))
    with pytest.raises(ValueError, match="residual"):
        kernels._ext.linear(x, w, residual=mx.zeros((1, 2, 33)))
    with pytest.raises(ValueError, match="norm's weight"):
        kernels._ext.linear(x, w, norm_weight=mx.ones((63,)), eps=1e-5)
    with pytest.raises(ValueError, match="2K"):
        kernels._ext.linear(x, w, gate=True)
    with pytest.raises(ValueError, match="not both"):
        kernels._ext.linear(normal(1, 2, 128), w, norm_weight=mx.ones((64,)), gate=True)


@pytest.mark.parametrize("shape", [(1, 32000), (3, 7), (2, 5, 1001)])
def test_log_softmax_matches_mlx(shape):
    x = normal(*shape, seed=11) * 4
    x[..., 1] = -float("inf")  # a masked logit
    fast, ref = both(kernels.log_softmax, x)
    assert mx.array_equal(mx.isinf(fast), mx.isinf(ref))
    finite = mx.isfinite(ref)
    close(mx.where(finite, fast, 0), mx.where(finite, ref, 0))
    loss = lambda x: (kernels.log_softmax(x) * mx.arange(shape[-1])).sum()
    close(*both(mx.grad(loss), normal(*shape, seed=12)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])  # of the scales
@pytest.mark.parametrize("rows", [5, 37])  # above MAX_ROWS: the tiled product
def test_quantized_product_gradient_matches_mlx(bits, group_size, dtype, rows):
    # The forward product and dx's take w in tiles (test_quantized_matmul_matches_mlx has one
    # left partial); here every group size and scale type, through mx.grad.
    k, n = 11 * group_size, 300
    layer = nn.Linear(k, n, bias=False)
    layer.weight = (normal(n, k, seed=7) * k**-0.5).astype(dtype)
    layer = nn.QuantizedLinear.from_linear(layer, group_size=group_size, bits=bits)
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    dy = normal(1, rows, n, seed=8)

    def loss(x, scales, biases):
        layer.scales, layer.biases = scales, biases
        return (kernels.linear(layer, x) * dy).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))
    (dx, ds, db), (dx_ref, ds_ref, db_ref) = both(grads, normal(1, rows, k), layer.scales,
                                                  layer.biases)  # fmt: skip
    close(dx, dx_ref)
    rtol = RTOL if dtype == mx.float32 else 1e-2  # 16-bit gradients, rounded in another order
    close(ds, ds_ref, rtol)
    close(db, db_ref, rtol)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])  # of the scales
@pytest.mark.parametrize("transpose", [True, False])  # x @ w.T (forward), dy @ w (its dx)
def test_quantized_matmul_matches_mlx(bits, dtype, transpose):
    # w goes in tiles of 5 MB of floats, 2048 rows at K = 640: 2100 leaves a partial one.
    k, n = 640, 2100
    q = nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=False), 64, bits)
    q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
    x = normal(3, 11, k if transpose else n, seed=11)
    args = (q.weight, q.scales, q.biases, transpose, 64, bits)
    # MLX's own (mx.dequantize rounds to the scales' type, as the kernel does not need to)
    close(kernels._ext.quantized_matmul(x, *args), mx.quantized_matmul(x, *args))


def test_lora_base_products_go_through_the_kernels():
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    q = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=False), 64, 4)
    lora = LoRALinear.from_base(q, r=8, scale=2.0)
    lora.lora_b = normal(8, 96, seed=9) * 0.1
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(500, 256), 64, 4)
    head = LoRAEmbedding.from_base(emb, r=8, scale=2.0)
    head.lora_b = normal(8, 256, seed=10) * 0.1
    x = normal(1, 9, 256)
    close(*both(kernels.linear, lora, x))
    close(*both(kernels.embedding_as_linear, head, x))
    for layer, fn in ((lora, kernels.linear), (head, kernels.embedding_as_linear)):
        grad = nn.value_and_grad(layer, lambda x, layer=layer, fn=fn: fn(layer, x).sum())
        (fast, g), (ref, g_ref) = both(grad, x)
        close(fast, ref)
        close(g["lora_a"], g_ref["lora_a"])
        close(g["lora_b"], g_ref["lora_b"])


def test_quantized_tied_head_matches_mlx():
    emb = nn.Embedding(1000, 256)
    emb.weight = normal(1000, 256, seed=3) * 0.1
    q = nn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=4)
    for rows in (1, 6):
        close(*both(kernels.embedding_as_linear, q, normal(1, rows, 256)))
    close(*both(kernels.embedding_as_linear, emb, normal(1, 1, 256)))


@pytest.mark.parametrize("dims", [64, 128, 1280, 1536, 2048, 3072, 1283, 5])
def test_rms_norm_matches_fast_rms_norm(dims):
    norm = nn.RMSNorm(dims, eps=1e-6)
    norm.weight = 1 + 0.1 * normal(dims, seed=4)
    close(*both(kernels.rms_norm, norm, normal(2, 3, dims) * 3))


@pytest.mark.parametrize("dims", [64, 192, 1280, 1283, 5])
def test_rms_norm_gradient_kernel_matches_mlx(dims):
    norm = nn.RMSNorm(dims, eps=1e-6)
    x, w = normal(3, 37, dims) * 3, normal(3, 37, dims, seed=1)  # w: a cotangent, not all ones

    def loss(x, weight):
        norm.weight = weight
        return (kernels.rms_norm(norm, x) * w).sum()

    grad = mx.grad(loss, argnums=(0, 1))
    weight = 1 + 0.1 * normal(dims, seed=4)
    for fast, ref in zip(*both(grad, x, weight)):
        close(fast, ref)
    # The backward kernel's own gradient (second order) is MLX's, through its reference. (Not
    # against x itself: RMSNorm's gradient is orthogonal to x, which leaves rounding noise.)
    v = normal(3, 37, dims, seed=2)
    close(*both(mx.grad(lambda x: (grad(x, weight)[0] * v).sum()), x))


@pytest.mark.parametrize("ffn", [768, 5120, 12288, 771, 3])
def test_silu_gate_matches_silu_times_up(ffn):
    close(*both(kernels.silu_gate, normal(1, 5, 2 * ffn) * 4))


ATTN_SHAPES = [(12, 3, 64), (20, 5, 64), (32, 8, 64), (24, 6, 128), (2, 2, 16)]


@pytest.mark.parametrize("nq,nkv,hd", ATTN_SHAPES)
@pytest.mark.parametrize("length,offset", [(1, 0), (1, 517), (7, 0), (7, 1000), (64, 3)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_inputs_match_norm_and_rope(nq, nkv, hd, length, offset, qk_norm):
    norms = []
    if qk_norm:
        norms = [nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)]
        for i, n in enumerate(norms):
            n.weight = 1 + 0.1 * normal(hd, seed=5 + i)
    rope = nn.RoPE(hd, traditional=False, base=10000)
    qkv = normal(2, length, nq + 2 * nkv, hd)
    fast, ref = both(kernels.attention_inputs, qkv, nq, nkv, *(norms or [None, None]), rope, offset)
    for f, r in zip(fast, ref):
        close(f, r)


@pytest.mark.parametrize("nq,nkv,hd", [(12, 3, 64), (8, 2, 32), (2, 2, 16)])
@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_inputs_gradient_kernel_matches_mlx(nq, nkv, hd, offset, qk_norm):
    norms = [None, None]
    if qk_norm:
        norms = [nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)]
        for i, n in enumerate(norms):
            n.weight = 1 + 0.1 * normal(hd, seed=5 + i)
    rope = nn.RoPE(hd, traditional=False, base=10000)
    qkv = 2 * normal(2, 19, nq + 2 * nkv, hd)
    cots = [normal(2, h, 19, hd, seed=11 + i) for i, h in enumerate([nq, nkv, nkv])]

    def loss(qkv, qw, kw):
        if qk_norm:
            norms[0].weight, norms[1].weight = qw, kw
        outs = kernels.attention_inputs(qkv, nq, nkv, *norms, rope, offset)
        return sum((o * c).sum() for o, c in zip(outs, cots))

    weights = [n.weight for n in norms] if qk_norm else [mx.zeros(1), mx.zeros(1)]
    argnums = (0, 1, 2) if qk_norm else (0,)
    for fast, ref in zip(*both(mx.grad(loss, argnums=argnums), qkv, *weights)):
        close(fast, ref)


@pytest.mark.parametrize("nq,nkv,hd", ATTN_SHAPES)
@pytest.mark.parametrize("length,past", [(1, 0), (1, 600), (9, 0), (67, 0), (5, 130)])
def test_attention_matches_sdpa_through_a_kv_cache(nq, nkv, hd, length, past):
    """Keys and values come from mlx-lm's KVCache (strided views), causal past the offset."""
    cache = KVCache()
    if past:
        cache.update_and_fetch(normal(1, nkv, past, hd, seed=7), normal(1, nkv, past, hd, seed=8))
    k, v = cache.update_and_fetch(
        normal(1, nkv, length, hd, seed=9), normal(1, nkv, length, hd, seed=10)
    )  # noqa: E501
    q = normal(1, nq, length, hd, seed=11)
    mask = "causal" if length > 1 else None
    close(*both(lambda: kernels.attention(q, k, v, scale=hd**-0.5, mask=mask, cache=cache)))


def _heads(nq: int, nkv: int, hd: int, qk_norm: bool):
    norms = [None, None]
    if qk_norm:
        norms = [nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)]
        for i, n in enumerate(norms):
            n.weight = 1 + 0.1 * normal(hd, seed=5 + i)
    return norms, nn.RoPE(hd, traditional=False, base=10000)


def _cached_layer(nq, nkv, hd, norms, rope):
    """One layer's attention over our KV cache, as the model runs it: the two kernels, or (with
    the kernels off) the attention inputs, the cache's update_and_fetch and MLX's attention."""
    from mlx_openelm.kv_cache import KVCache

    cache = KVCache()

    def step(qkv):
        out = kernels.cached_attention(qkv, cache, nq, nkv, *norms, rope, hd**-0.5)
        if out is None:
            q, k, v = kernels.attention_inputs(qkv, nq, nkv, *norms, rope, cache.offset)
            k, v = cache.update_and_fetch(k, v)
            mask = "causal" if qkv.shape[1] > 1 else None
            out = kernels.attention(q, k, v, scale=hd**-0.5, mask=mask, cache=cache)
        return out

    return cache, step


@pytest.mark.parametrize("nq,nkv,hd", ATTN_SHAPES + [(3, 3, 12)])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_attention_matches_the_ops_it_replaces(nq, nkv, hd, qk_norm, batch):
    """Prefill in chunks (past the 256-position capacity step), then decode steps: each output,
    and the cache's keys and values, as the separate ops give them."""
    norms, rope = _heads(nq, nkv, hd, qk_norm)
    fast_cache, fast = _cached_layer(nq, nkv, hd, norms, rope)
    ref_cache, ref = _cached_layer(nq, nkv, hd, norms, rope)
    for i, length in enumerate([200, 1, 67, 1, 1]):
        qkv = normal(batch, length, nq + 2 * nkv, hd, seed=20 + i)
        out = fast(qkv)
        with kernels.disabled():
            expected = ref(qkv)
        close(out, expected)
        assert fast_cache.offset == ref_cache.offset
        n = fast_cache.offset
        close(fast_cache.kv[..., :n, :], ref_cache.kv[..., :n, :])


def test_gradients_through_the_cached_attention_match_mlx():
    # Nothing trains through the cache, but the kernels' vjps (their references') must still be
    # right: d loss / d qkv over a prefill then a decode step, against the separate ops.
    norms, rope = _heads(12, 3, 64, True)
    qkv0, qkv1 = normal(1, 9, 18, 64, seed=1), normal(1, 1, 18, 64, seed=2)
    w0, w1 = normal(1, 9, 12 * 64, seed=3), normal(1, 1, 12 * 64, seed=4)

    def loss(qkv0, qkv1):
        _, step = _cached_layer(12, 3, 64, norms, rope)
        return (step(qkv0) * w0).sum() + (step(qkv1) * w1).sum()

    for fast, ref in zip(*both(mx.grad(loss, argnums=(0, 1)), qkv0, qkv1)):
        close(fast, ref)


def test_cached_attention_writes_the_cache_in_place_and_copies_a_cache_still_read():
    import numpy as np

    norms, rope = _heads(8, 2, 64, True)
    cache, step = _cached_layer(8, 2, 64, norms, rope)
    address = lambda a: np.array(a, copy=False).__array_interface__["data"][0]  # noqa: E731
    mx.eval(step(normal(1, 30, 12, 64)), cache.kv)
    before = address(cache.kv)
    for i in range(3):  # decode: the buffer is MLX's to give, so the keys go into it in place
        mx.eval(step(normal(1, 1, 12, 64, seed=i)), cache.kv)
        assert address(cache.kv) == before
    held = cache.kv  # still read here: the kernel must write a copy, and leave this one as it was
    kept = mx.array(np.array(held))
    mx.eval(step(normal(1, 1, 12, 64, seed=9)), cache.kv)
    assert address(cache.kv) != address(held) and mx.array_equal(held, kept)
    assert not mx.array_equal(cache.kv, held)


def _row_caches(nq, nkv, hd, norms, rope, lengths):
    """A cache per row, prefilled to its own length through the cached-attention kernels."""
    caches = []
    for i, n in enumerate(lengths):
        cache, step = _cached_layer(nq, nkv, hd, norms, rope)
        if n:  # else a cache with no buffer yet (a one-token prompt)
            mx.eval(step(normal(1, n, nq + 2 * nkv, hd, seed=40 + i)), cache.kv)
        caches.append(cache)
    return caches


@pytest.mark.parametrize("nq,nkv,hd,qk_norm", [(12, 3, 64, True), (5, 5, 12, False)])
def test_rows_attention_gives_each_row_the_bits_it_gets_alone(nq, nkv, hd, qk_norm):
    """The server's step: rows of lengths on both sides of a key span (256) and of the cache's
    capacity step, in one kernel, each equal to the bit to its own step alone, its keys and values
    too, and close to MLX's ops."""
    from mlx_openelm.kv_cache import RowCaches
    from mlx_openelm.serve.sequence import _copy

    norms, rope = _heads(nq, nkv, hd, qk_norm)
    lengths = [3, 255, 0, 300, 64]
    together = RowCaches(_row_caches(nq, nkv, hd, norms, rope, lengths))
    alone = [_copy(c, c.offset) for c in together]
    for i in range(3):
        qkv = normal(len(lengths), 1, nq + 2 * nkv, hd, seed=60 + i)
        out = kernels.cached_attention(qkv, together, nq, nkv, *norms, rope, hd**-0.5)
        mx.eval(out, [c.kv for c in together])
        for b, cache in enumerate(alone):
            row = kernels.cached_attention(qkv[b : b + 1], cache, nq, nkv, *norms, rope, hd**-0.5)
            assert mx.array_equal(out[b : b + 1], row)
            n = cache.offset
            assert together[b].offset == n
            assert mx.array_equal(together[b].kv[..., :n, :], cache.kv[..., :n, :])
        with kernels.disabled():  # the per-row ops of MLX
            ref = mx.concatenate([_ref_step(c, qkv[b : b + 1], nq, nkv, hd, norms, rope)
                                  for b, c in enumerate(alone)])  # fmt: skip
        close(out, ref)


def _ref_step(cache, qkv, nq, nkv, hd, norms, rope):
    """Attention of qkv's one row over a copy of `cache` (positions past its offset dropped) by
    MLX's ops: the step just taken, again."""
    from mlx_openelm.serve.sequence import _copy

    c = _copy(cache, cache.offset - 1)
    q, k, v = kernels.attention_inputs(qkv, nq, nkv, *norms, rope, c.offset)
    k, v = c.update_and_fetch(k, v)
    return kernels.attention(q, k, v, scale=hd**-0.5, mask=None, cache=c)


def test_a_batched_step_over_row_caches_matches_mlx_row_by_row():
    """The model's step over rows of their own lengths: the kernels (one attention kernel for the
    rows) against MLX's ops, where attention goes one row at a time."""
    from conftest import tiny_model

    from mlx_openelm.kv_cache import RowCaches

    model = tiny_model()
    lengths = [2, 40, 17]

    def step():
        caches = []
        for i, n in enumerate(lengths):
            c = model.make_cache()
            model(mx.arange(3, 3 + n)[None] + i, cache=c)
            caches.append(c)
        rows = [RowCaches(c[i] for c in caches) for i in range(len(model.layers))]
        with kernels.batch_rows(len(lengths)):
            return model(mx.array([[5], [6], [7]]), cache=rows)

    close(*both(step))


def test_gradients_through_the_rows_attention_match_one_row_at_a_time():
    # The kernel's vjp is its reference's (MLX's ops row by row): check it against the rows alone.
    norms, rope = _heads(8, 2, 64, True)
    qkv = normal(3, 1, 12, 64, seed=7)
    w = normal(3, 1, 8 * 64, seed=8)
    lengths = [5, 70, 20]

    def loss_rows(qkv):
        from mlx_openelm.kv_cache import RowCaches

        caches = RowCaches(_row_caches(8, 2, 64, norms, rope, lengths))
        return (kernels.cached_attention(qkv, caches, 8, 2, *norms, rope, 0.125) * w).sum()

    def loss_alone(qkv):
        caches = _row_caches(8, 2, 64, norms, rope, lengths)
        outs = [kernels.cached_attention(qkv[b : b + 1], c, 8, 2, *norms, rope, 0.125)
                for b, c in enumerate(caches)]  # fmt: skip
        return (mx.concatenate(outs) * w).sum()

    close(mx.grad(loss_rows)(qkv), mx.grad(loss_alone)(qkv))


@pytest.mark.parametrize("nq,nkv,hd", [(6, 2, 64), (40, 1, 24), (5, 5, 12), (9, 3, 72)])
@pytest.mark.parametrize("length,past,causal", [(33, 0, True), (70, 9, True), (2, 200, True),
                                                (17, 5, False)])  # fmt: skip
def test_prefill_tiles_cover_every_grouping_and_mask_edge(nq, nkv, hd, length, past, causal):
    """Prefill attends in tiles of query rows times the heads of a GQA group: groups of 3, 1 and
    40 heads leave partial tiles, head dims leave SIMD tails, and rows past a tile or key-block
    boundary, with and without an offset, see exactly the keys the mask allows."""
    q = normal(2, nq, length, hd)
    k, v = normal(2, nkv, past + length, hd, seed=1), normal(2, nkv, past + length, hd, seed=2)
    mask = "causal" if causal else None
    close(*both(lambda: kernels.attention(q, k, v, scale=hd**-0.5, mask=mask, cache=None)))


@pytest.mark.parametrize("length,keys", [(5, 11), (1, 300)])  # one row: keys in spans, merged
def test_attention_without_mask_sees_every_key(length, keys):
    q = normal(2, 8, length, 64)
    k, v = normal(2, 2, keys, 64, seed=1), normal(2, 2, keys, 64, seed=2)
    close(*both(lambda: kernels.attention(q, k, v, scale=0.125, mask=None, cache=None)))


@pytest.mark.parametrize("nq,nkv,hd", ATTN_SHAPES[:3] + [(8, 2, 32), (3, 3, 12), (6, 2, 64),
                                                          (40, 1, 24)])  # fmt: skip
@pytest.mark.parametrize("length,past,causal", [(1, 0, True), (9, 0, True), (67, 0, True),
                                                (5, 130, True), (6, 11, False),
                                                (70, 9, True)])  # fmt: skip
def test_attention_gradient_kernel_matches_mlx(nq, nkv, hd, length, past, causal):
    """The backward kernel works in the forward's tiles: these shapes leave partial tiles, key
    blocks and SIMD tails, and a row that sees a single key has a gradient of exactly 0 in q."""
    q, k, v = (
        normal(2, nq, length, hd),
        normal(2, nkv, past + length, hd, seed=1),
        normal(2, nkv, past + length, hd, seed=2),
    )
    w = normal(2, length, nq * hd, seed=3)  # a cotangent that is not all ones
    mask = "causal" if causal else None

    def loss(q, k, v):
        return (kernels.attention(q, k, v, scale=hd**-0.5, mask=mask, cache=None) * w).sum()

    for fast, ref in zip(*both(mx.grad(loss, argnums=(0, 1, 2)), q, k, v)):
        close(fast, ref)


@pytest.mark.parametrize("shape", [(2, 7, 4096), (5, 13), (1, 3, 32000), (4, 9)])
def test_cross_entropy_and_its_gradient_match_float64(shape):
    """Against float64, not MLX: over 32000 logits MLX's own float32 loss is 2e-5 off (the
    kernel's is 7x closer), so a 1e-5 bound against MLX would test MLX's summation order."""
    logits = 4 * normal(*shape)
    targets = mx.random.randint(0, shape[-1], shape[:-1], key=mx.random.key(1))
    w = normal(*shape[:-1], seed=2)
    x, t, w64 = (np.array(a).astype(np.float64) for a in (logits, targets, w))
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    picked = np.take_along_axis(x, t.astype(int)[..., None], -1)[..., 0]
    onehot = np.arange(shape[-1]) == t[..., None]
    grad64 = (np.exp(x - lse[..., None]) - onehot) * w64[..., None]

    def grad(x):
        return mx.grad(lambda x: (kernels.cross_entropy(x, targets) * w).sum())(x)

    (loss, loss_mlx), (g, g_mlx) = both(kernels.cross_entropy, logits, targets), both(grad, logits)
    for fast, ref, exact in [(loss, loss_mlx, lse - picked), (g, g_mlx, grad64)]:
        err, err_mlx = (np.abs(np.array(a) - exact).max() for a in (fast, ref))
        assert err <= max(RTOL * np.abs(exact).max(), err_mlx), (err, err_mlx)
    assert kernels.cross_entropy(logits, targets.astype(mx.int64)).shape == targets.shape


@pytest.mark.parametrize("ffn", [768, 771, 3])
def test_silu_gate_gradient_kernel_matches_mlx(ffn):
    x, w = 3 * normal(2, 5, 2 * ffn), normal(2, 5, ffn, seed=1)
    grad = mx.grad(lambda x: (kernels.silu_gate(x) * w).sum())
    close(*both(grad, x))
    # The backward kernel's own gradient (second order) is MLX's, through its reference.
    close(*both(mx.grad(lambda x: (grad(x) * x).sum()), x))


def test_training_loss_and_gradients_match_with_kernels_off():
    """The trainer's loss through the kernels (forward and backward) equals MLX's own."""
    from conftest import tiny_args
    from mlx.utils import tree_flatten

    from mlx_openelm.model import Model
    from mlx_openelm.train.trainer import masked_loss

    model = Model(tiny_args(num_transformer_layers=3))
    ids = mx.random.randint(0, model.args.vocab_size, (2, 33), key=mx.random.key(3))
    mask = mx.ones((2, 32)).at[1, :5].multiply(0)
    grad_fn = nn.value_and_grad(model, lambda m, *a: masked_loss(m, *a)[0])
    (loss, grads), (loss_ref, grads_ref) = both(grad_fn, model, ids[:, :-1], ids[:, 1:], mask)
    close(loss, loss_ref)
    for (_, g), (_, r) in zip(tree_flatten(grads), tree_flatten(grads_ref)):
        close(g, r, rtol=1e-4)


def test_gradients_are_mlx_own():
    """Training through the kernels, every one in a chain: gradients match MLX's ops'."""
    hd, nq, nkv = 64, 8, 2
    norm = nn.RMSNorm(256)
    qn, kn = nn.RMSNorm(hd), nn.RMSNorm(hd)
    rope = nn.RoPE(hd, traditional=False, base=10000)
    lin = nn.Linear(256, (nq + 2 * nkv) * hd, bias=False)
    w2 = normal(1, 1, 2 * 96, seed=3)

    def loss(x, nw, qw, kw, lw):
        norm.weight, qn.weight, kn.weight, lin.weight = nw, qw, kw, lw
        h = kernels.linear(lin, kernels.rms_norm(norm, x)).reshape(1, x.shape[1], -1, hd)
        q, k, v = kernels.attention_inputs(h, nq, nkv, qn, kn, rope, 3)
        out = kernels.attention(q, k, v, scale=hd**-0.5, mask="causal", cache=None)
        return (out * out).sum() + kernels.silu_gate(out[..., : 2 * 96] * w2).sum()

    for rows in (1, 6):  # one row: the few-row product kernel too
        args = [normal(1, rows, 256), 1 + 0.1 * normal(256), mx.ones(hd), mx.ones(hd),
                normal((nq + 2 * nkv) * hd, 256, seed=4) * 0.06]  # fmt: skip
        grad = mx.grad(loss, argnums=list(range(5)))
        fast, ref = both(grad, *args)
        for f, r in zip(fast, ref):
            close(f, r, rtol=1e-4)


def test_kernels_called_from_several_threads_at_once_give_what_they_give_alone():
    # The thread pool serves one job at a time; a job that finds it busy (another thread's
    # stream) runs on its caller alone, with the same result.
    import threading

    layer = nn.QuantizedLinear.from_linear(nn.Linear(1280, 1000, bias=False), 64, 4)
    q, k, v = normal(1, 8, 1, 64, seed=2), normal(1, 2, 700, 64, seed=3), normal(1, 2, 700, 64)
    jobs = [
        lambda x: kernels.linear(layer, x),
        lambda x: kernels.attention(q * x[0, 0, 0], k, v, scale=0.125, mask=None, cache=None),
    ]
    inputs = [normal(1, 1, 1280, seed=10 + i) for i in range(4)]
    alone = [job(x) for job in jobs for x in inputs]
    mx.eval(alone)
    results: dict[int, list] = {}

    def worker(t: int) -> None:
        with mx.stream(mx.new_stream(mx.cpu)):
            out = []
            for _ in range(5):
                step = [job(x) for job in jobs for x in inputs]
                mx.eval(step)
                out.append(step)
            results[t] = out

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2]
    for out in results.values():
        for step in out:
            for got, want in zip(step, alone):
                assert mx.array_equal(got, want).item()


def test_the_whole_model_matches_with_kernels_off_and_under_compile():
    from conftest import tiny_args

    from mlx_openelm.model import Model

    model = Model(tiny_args(num_transformer_layers=3))
    ids = mx.array([[1, 5, 9, 200, 17, 3, 4]])
    close(*both(model, ids))
    compiled = mx.compile(model)
    close(compiled(ids), model(ids))


@pytest.fixture(scope="module")
def weights_270m():
    """OpenELM-270M's shape with the benchmark's varied random weights (made once: ~10 s)."""
    from mlx_openelm.bench.weights import random_weights

    from mlx_openelm.config import preset
    from mlx_openelm.model import Model

    model = Model(preset("270M"))
    random_weights(model)
    return model.parameters()


@pytest.mark.slow
@pytest.mark.parametrize("q_bits, dtype", [(None, None), (8, None), (4, None), (4, mx.bfloat16)])
def test_270m_greedy_tokens_equal_mlx_own_path(q_bits, dtype, weights_270m):
    """OpenELM-270M: 32 greedy tokens equal with kernels on and off (fp32, and MLX's own 8/4-bit
    path); fp32 logits as exact as MLX's own. With `dtype`, quantized from bfloat16 (as `convert
    -q` on a Mac, and mlx-community, write it) and loaded to run on a CPU: bfloat16 scales."""
    from mlx_openelm.config import preset
    from mlx_openelm.generation import generate_step
    from mlx_openelm.loading import float32_on_cpu
    from mlx_openelm.model import Model

    model = Model(preset("270M"))
    model.update(weights_270m)
    if dtype:
        model.set_dtype(dtype)
    if q_bits:
        nn.quantize(model, group_size=64, bits=q_bits)
    if dtype:
        assert float32_on_cpu(model) > 0
        scales = model.layers[0].attn.qkv_proj.scales
        assert scales.dtype == dtype and model.transformer.norm.weight.dtype == mx.float32
    mx.eval(model.parameters())
    prompt = mx.array([(7 * i + 3) % 32000 for i in range(16)])
    assert model(prompt[None, :2]).dtype == mx.float32  # what the kernels take, all along
    steps = 32

    def tokens():
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=steps)]

    fast = tokens()
    with kernels.disabled():
        ref = tokens()
    assert fast == ref
    assert len(set(ref)) > 8  # the check means something: varied tokens
    if q_bits is None:
        # fp32 logits after a prefill and a decode step. Against float64, MLX's own fp32 path is
        # off by ~4e-5 here (summation order), so 1e-5 absolute would test rounding, not kernels:
        # ask for 1e-5 relative, and no further from float64 than MLX's own ops are.
        def logits(m):
            cache = make_prompt_cache(m)
            first = m(prompt[None, :8], cache=cache)  # short: float64 runs without BLAS
            return mx.concatenate([first, m(mx.array([[11]]), cache=cache)], axis=1)

        fast = logits(model)
        with kernels.disabled():
            ref = logits(model)
            model.set_dtype(mx.float64)
            exact = logits(model)
        scale = mx.abs(exact).max().item()
        assert mx.abs(fast - ref).max().item() <= 1e-5 * scale
        ours, mlx_own = (mx.abs(x - exact).max().item() for x in (fast, ref))
        assert ours <= 1.5 * mlx_own, (ours, mlx_own)


# ---- when the kernels cannot run -----------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)  # fmt: skip


GENERATE = """
import mlx_openelm, mlx.core as mx
from mlx_openelm import kernels
from mlx_openelm.kernels import build
from mlx_openelm.config import ModelArgs
from mlx_openelm.model import Model
print(kernels.status())
args = ModelArgs(num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=512,
                 ffn_dim_divisor=32)
print(Model(args)(mx.array([[1, 2, 3]])).shape)
"""


def test_off_switch_runs_mlx_ops_silently():
    out = run_python(GENERATE, MLX_OPENELM_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["off (MLX_OPENELM_KERNELS=0)", "(1, 3, 512)"]
    assert out.stderr == ""


def test_failed_build_says_one_line_and_runs_mlx_ops(tmp_path):
    out = run_python(GENERATE, CXX="false", MLX_OPENELM_KERNEL_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    status, shape = out.stdout.splitlines()
    assert status.startswith("off (compiling") and shape == "(1, 3, 512)"
    lines = [ln for ln in out.stderr.splitlines() if "CPU kernels off" in ln]
    assert len(lines) == 1 and "running MLX's own ops" in lines[0]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("*/*.so"))  # nothing half-built left as a module


def passes_the_parity_tests(tmp_path, flags: str, simd: str) -> None:
    """The kernels built with these compiler flags say `simd` in their status and pass the parity
    tests of the kernels that the flags change (the products, attention forward and backward, the
    270M model against MLX's own path and float64)."""
    env = {**os.environ, "MLX_OPENELM_KERNEL_FLAGS": flags,
           "MLX_OPENELM_KERNEL_CACHE": str(tmp_path)}  # fmt: skip
    status = run_python("from mlx_openelm import kernels; print(kernels.status())", **env)
    assert status.stdout.startswith(f"on ({simd}"), status.stdout + status.stderr
    chosen = "linear_matches or quantized or attention or prefill or 270m"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          __file__, "-k", f"({chosen}) and not build_passes"],
                         capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-500:]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="elsewhere the default build is it")
def test_the_portable_build_passes_the_parity_tests(tmp_path):
    """A CPU without AVX2 (ARM Linux, older x86) runs the kernels' portable path: here built with
    AVX2 and FMA turned off."""
    passes_the_parity_tests(tmp_path, "-mno-avx2 -mno-fma", "portable C++")


@pytest.mark.slow
@pytest.mark.skipif(not {"avx512f", "avx_vnni"} & set(build._cpu_features().split()),
                    reason="without AVX-512 or AVX-VNNI the default build is it")  # fmt: skip
def test_the_avx2_build_passes_the_parity_tests(tmp_path):
    """Many x86 CPUs have AVX2 but neither AVX-512 nor VNNI, and run the 8-float paths (the one-row
    4-bit product with maddubs for its integer dots): on a CPU with more, build them alone."""
    passes_the_parity_tests(tmp_path, "-mno-avx512f -mno-avxvnni", "AVX2/FMA")


def test_a_binary_that_does_not_load_turns_kernels_off(tmp_path, monkeypatch, caplog):
    bogus = tmp_path / "_openelm_kernels.so"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setattr(build, "build", lambda: bogus)
    for name, value in [("_ext", None), ("_why_off", None), ("_loaded", False)]:
        monkeypatch.setattr(kernels, name, value)
    assert not kernels.available()
    assert kernels.status().startswith("off (the built kernels do not load")
    assert "CPU kernels off" in caplog.text  # a warning: shown unless logging is silenced
