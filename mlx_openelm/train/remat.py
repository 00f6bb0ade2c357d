"""Gradient checkpointing whose recomputation sees the same dropout noise as the forward pass.

`mx.checkpoint` recomputes a block during the backward pass, and MLX's global RNG then draws new
dropout masks, so the gradients would belong to another network than the loss (mlx-lm's
`grad_checkpoint` has this flaw). Here each block call draws one key and hands it to the
(checkpointed) call as an input; dropout inside takes its masks from that key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

_KEY: list[mx.array | None] = [None]  # the key of the block call in progress


def _keyed_dropout(self: nn.Dropout, x: mx.array) -> mx.array:
    if self._p_1 == 1 or not self.training:
        return x
    if _KEY[0] is None:  # outside a block (the embedding adapter): the global RNG
        mask = mx.random.bernoulli(self._p_1, x.shape)
    else:
        _KEY[0], sub = mx.random.split(_KEY[0])
        mask = mx.random.bernoulli(self._p_1, x.shape, key=sub)
    return (mask * x) * (1 / self._p_1)


@contextlib.contextmanager
def keyed_blocks(block_cls: type[nn.Module], checkpoint: bool = False) -> Iterator[None]:
    """While inside, calls of `block_cls` in training mode take dropout noise from one key each,
    and with `checkpoint` are recomputed in the backward pass instead of keeping activations.

    The same noise either way, so checkpointing changes memory, never results.
    """
    call, dropout_call = block_cls.__call__, nn.Dropout.__call__

    def keyed_call(block, key, *args, **kwargs):
        previous, _KEY[0] = _KEY[0], key
        try:
            return call(block, *args, **kwargs)
        finally:
            _KEY[0] = previous

    def patched(block, *args, **kwargs):
        if not block.training:
            return call(block, *args, **kwargs)
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)  # from the global stream
        if not checkpoint:
            return keyed_call(block, key, *args, **kwargs)

        def inner(params, key, *args, **kwargs):
            block.update(params)
            # Cut the key from autodiff: random ops have no vjp, and the noise is a constant.
            return keyed_call(block, mx.stop_gradient(key), *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), key, *args, **kwargs)

    block_cls.__call__, nn.Dropout.__call__ = patched, _keyed_dropout
    try:
        yield
    finally:
        block_cls.__call__, nn.Dropout.__call__ = call, dropout_call
