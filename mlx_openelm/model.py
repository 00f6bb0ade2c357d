"""The OpenELM decoder in MLX.

Parameter names are the Hugging Face checkpoint's own (`transformer.layers.N.attn.qkv_proj`...),
so a converted state dict loads as is, and a folder we write loads in mlx-lm's `openelm` model too.
Layers are called through `kernels`, which runs native CPU kernels on a CPU stream and the layers
themselves (MLX's ops) everywhere else.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from . import kernels
from .config import ModelArgs
from .kv_cache import KVCache, RowCaches


class NaiveRMSNorm(nn.Module):
    """RMSNorm from separate ops, like the PyTorch reference: the paper's slow path (benchmarks)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        xf = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return xf.astype(x.dtype) * self.weight


def rms_norm(args: ModelArgs, dims: int) -> nn.Module:
    # nn.RMSNorm runs mx.fast.rms_norm: one kernel, fp32 accumulation.
    cls = NaiveRMSNorm if args.naive_rms_norm else nn.RMSNorm
    return cls(dims, eps=args.rms_norm_eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.head_dim = hd = args.head_dim
        self.n_heads = args.num_query_heads[layer_id]
        self.n_kv_heads = args.num_kv_heads[layer_id]
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(
            args.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False
        )
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = rms_norm(args, hd)
            self.k_norm = rms_norm(args, hd)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_freq_constant)

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, norm: nn.Module | None = None
    ) -> mx.array:
        """x + attention(norm(x)): the pre-norm sublayer with its skip connection."""
        B, L, D = x.shape
        qkv = kernels.linear(self.qkv_proj, x, norm=norm).reshape(B, L, -1, self.head_dim)
        return kernels.linear(self.out_proj, self._attend(qkv, mask, cache), residual=x)

    def _attend(self, qkv: mx.array, mask: Any, cache: Any) -> mx.array:
        """qkv (B, L, heads, head_dim) -> attention's output (B, L, n_heads * head_dim)."""
        if cache is not None:  # on a CPU, kernels: one writes k and v (a row's), one attends
            out = kernels.cached_attention(
                qkv, cache, self.n_heads, self.n_kv_heads, self.get("q_norm"),
                self.get("k_norm"), self.rope, self.scale,
            )  # fmt: skip
            if out is not None:
                return out
        if isinstance(cache, RowCaches):  # a batch of sequences, each over its own cache
            rows = [self._attend(qkv[b : b + 1], None, c) for b, c in enumerate(cache)]
            return mx.concatenate(rows)
        offset = cache.offset if cache is not None else 0
        # q/k-norm before RoPE, as the reference does; q, k, v: (B, heads, L, head_dim)
        q, k, v = kernels.attention_inputs(
            qkv,
            self.n_heads,
            self.n_kv_heads,
            self.get("q_norm"),
            self.get("k_norm"),
            self.rope,
            offset,
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: each kv head serves n_heads / n_kv_heads query heads.
        return kernels.attention(q, k, v, scale=self.scale, mask=mask, cache=cache)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        ffn_dim = args.ffn_dims[layer_id]
        self.glu = args.ffn_with_glu
        self.proj_1 = nn.Linear(args.model_dim, (2 if self.glu else 1) * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array, norm: nn.Module | None = None) -> mx.array:
        """x + ffn(norm(x)): the pre-norm sublayer with its skip connection."""
        h = kernels.linear(self.proj_1, x, norm=norm)
        if self.glu:  # SwiGLU, the first half the gate
            return kernels.linear(self.proj_2, h, gate=True, residual=x)
        return kernels.linear(self.proj_2, nn.silu(h), residual=x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = rms_norm(args, args.model_dim)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = rms_norm(args, args.model_dim)
        self.ffn = MLP(args, layer_id)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        # The norms and skip connections go into the sublayers' products: a decoding step runs
        # them inside the product kernels (see kernels.linear).
        h = self.attn(x, mask, cache, norm=self.attn_norm)
        return self.ffn(h, norm=self.ffn_norm)


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = rms_norm(args, args.model_dim)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.token_embeddings(inputs)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return kernels.rms_norm(self.norm, h)


class Model(nn.Module):
    """OpenELM for causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.transformer(inputs, cache)
        if self.args.share_input_output_layers:
            return kernels.embedding_as_linear(self.transformer.token_embeddings, h)
        return kernels.linear(self.lm_head, h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.transformer.layers

    def make_cache(self) -> list[KVCache]:
        """The KV cache for generation (mlx-lm's `make_prompt_cache` calls this)."""
        return [KVCache() for _ in self.layers]
