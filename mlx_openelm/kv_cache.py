"""The KV cache: one layer's keys and values in one buffer.

mlx-lm's `KVCache` keeps keys and values in two buffers and updates them with two slice updates a
step, then slices both to hand them to attention: with the attention inputs, six graph nodes around
each layer's attention. On a CPU, where MLX schedules each node one by one, two kernels do it with
one buffer (`kernels.cached_attention`): one writes the step's keys and values into it in place,
one attends over it. Elsewhere (Metal, CUDA, kernels off) this cache serves MLX's own ops through
`update_and_fetch`, as mlx-lm's does, so one cache works on every path.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one layer, `kv` (B, 2, kv_heads, capacity, head_dim): keys at [:, 0],
    values at [:, 1], the first `offset` positions filled. The capacity grows 256 positions at a
    time. Setting `offset` back trims the cache (the positions past it get overwritten)."""

    step = 256

    def __init__(self) -> None:
        self.kv: mx.array | None = None
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        """What to evaluate to have the cache computed."""
        return [] if self.kv is None else [self.kv]

    def reserve(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype: mx.Dtype):
        """Make room for `length` more positions, keeping the first `offset`."""
        kv = self.kv
        if kv is not None and self.offset + length <= kv.shape[3]:
            return
        capacity = -(-(self.offset + length) // self.step) * self.step
        grown = mx.zeros((batch, 2, kv_heads, capacity, head_dim), dtype)
        if kv is not None and self.offset:
            grown[..., : self.offset, :] = kv[..., : self.offset, :]
        self.kv = grown

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys and values (B, kv_heads, L, head_dim) with MLX's ops; all so far back."""
        B, H, L, D = keys.shape
        self.reserve(B, H, L, D, keys.dtype)
        start, self.offset = self.offset, self.offset + L
        self.kv[:, 0, :, start : self.offset, :] = keys
        self.kv[:, 1, :, start : self.offset, :] = values
        return self.kv[:, 0, :, : self.offset, :], self.kv[:, 1, :, : self.offset, :]


class RowCaches(list):
    """One layer's caches (`KVCache`) for a batch of sequences of their own lengths, one per row:
    the model runs the products on all rows at once and attention over each row's own cache (the
    server's batched decode step; on a CPU, one kernel for all rows:
    `kernels.cached_attention`)."""
