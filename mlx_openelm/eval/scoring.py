"""Batched log-likelihood scoring: the engine under the lm-eval backend and `perplexity`.

A request is (context ids, continuation ids); its score is the sum of log p(continuation token |
everything before it) and whether greedy decoding would have produced the continuation. Requests
with the same context (the choices of one multiple-choice item) share one context pass: contexts
are left-padded into mlx-lm's `BatchKVCache`, the cache rows are repeated per continuation, and the
continuations run right-padded in one more forward pass. Causal attention makes this exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache
from rich.console import Console
from rich.progress import Progress

from ..errors import UserError

Tokens = Sequence[int]


@dataclass
class ScoreStats:
    """What `score` did: requests, context groups, forward passes, tokens run, seconds."""

    requests: int = 0
    groups: int = 0
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, other: ScoreStats) -> None:
        for k in ("requests", "groups", "batches", "tokens", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            "requests": self.requests,
            "groups": self.groups,
            "batches": self.batches,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.requests / s, 2),
            "tokens_per_s": round(self.tokens / s, 1),
        }


def _head(model: nn.Module, h: mx.array) -> mx.array:
    # The output layer alone (as Model.__call__ applies it), so a context pass only pays for the
    # vocabulary projection at its last position.
    if model.args.share_input_output_layers:
        return model.transformer.token_embeddings.as_linear(h)
    return model.lm_head(h)


def _pad(rows: list[Tokens], left: bool) -> tuple[mx.array, list[int]]:
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return mx.array(out), [width - len(r) for r in rows]


def _score_batch(
    model: nn.Module, contexts: list[Tokens], conts: list[list[Tokens]]
) -> tuple[mx.array, mx.array]:
    """Sum of log-probs and all-greedy flags for every continuation of a batch of contexts."""
    ids, left_pad = _pad(contexts, left=True)
    cache = [BatchKVCache(left_pad) for _ in model.layers]
    last = _head(model, model.transformer(ids, cache)[:, -1:, :])[:, 0].astype(mx.float32)
    rows = [i for i, cs in enumerate(conts) for _ in cs]  # context index of each continuation
    flat = [c for cs in conts for c in cs]
    rows_a = mx.array(rows)
    first = mx.array([c[0] for c in flat])
    lse = mx.logsumexp(last, axis=-1)
    logp = mx.take_along_axis(last[rows_a], first[:, None], axis=-1)[:, 0] - lse[rows_a]
    greedy = mx.argmax(last, axis=-1)[rows_a] == first
    if max(len(c) for c in flat) > 1:
        # Each continuation row reads its own copy of its context's cache.
        for c in cache:
            c.filter(rows_a)
        inputs, _ = _pad([c[:-1] for c in flat], left=False)
        targets, _ = _pad([c[1:] for c in flat], left=False)
        logits = model(inputs, cache=cache).astype(mx.float32)  # (rows, L, vocab)
        tok = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        tok = tok - mx.logsumexp(logits, axis=-1)
        valid = mx.arange(targets.shape[1])[None] < mx.array([len(c) - 1 for c in flat])[:, None]
        logp = logp + mx.where(valid, tok, 0.0).sum(axis=-1)
        hit = (mx.argmax(logits, axis=-1) == targets) | ~valid
        greedy = greedy & mx.all(hit, axis=-1)
    return logp, greedy


def score(
    model: nn.Module,
    requests: Sequence[tuple[Tokens, Tokens]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    stats: ScoreStats | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, batched.

    Args:
        model: an OpenELM `Model`.
        requests: (context ids, continuation ids) pairs; the context holds at least one token
          (BOS for an empty text).
        batch_size: continuations per forward pass (a multiple-choice item is never split).
        max_length: the most tokens one pass may see (default: the model's context window);
          longer requests lose context tokens from the left, as lm-eval's HF backend does.
        stats: a `ScoreStats` to add this call's counts and time to.
        progress: show a progress bar.

    Returns:
        (sum of log-probabilities, whether greedy decoding gives the continuation), in order.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    max_length = max_length or model.args.max_context_length
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = tuple(ctx), tuple(cont)
        if not cont:
            continue  # an empty continuation has probability 1
        if len(cont) > max_length:
            raise UserError(
                f"A continuation of {len(cont)} tokens does not fit a window of {max_length} "
                "tokens: raise max_length (up to the model's context) or shorten the text"
            )
        if not ctx:
            raise UserError("Every context needs at least one token: prepend BOS")
        if len(ctx) + len(cont) - 1 > max_length:
            ctx = (ctx + cont)[-(max_length + 1) : -len(cont)]
        groups.setdefault(ctx, []).append((i, cont))

    # Longest first: padding stays small and any out-of-memory shows up at once.
    items = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(c) for _, c in kv[1])))
    batches, cur, n = [], [], 0
    for item in items:
        if cur and n + len(item[1]) > batch_size:
            batches.append(cur)
            cur, n = [], 0
        cur.append(item)
        n += len(item[1])
    if cur:
        batches.append(cur)

    local = ScoreStats(requests=len(requests), groups=len(items), batches=len(batches))
    tic = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("Scoring", total=len(requests))
        for batch in batches:
            logp, greedy = _score_batch(
                model, [ctx for ctx, _ in batch], [[c for _, c in v] for _, v in batch]
            )
            mx.eval(logp, greedy)
            idx = [i for _, v in batch for i, _ in v]
            for i, lp, g in zip(idx, logp.tolist(), greedy.tolist(), strict=True):
                out[i] = (lp, bool(g))
            local.tokens += sum(len(ctx) + sum(len(c) - 1 for _, c in v) for ctx, v in batch)
            bar.advance(task, len(idx))
            mx.clear_cache()
    local.seconds = time.perf_counter() - tic
    if stats is not None:
        stats.add(local)
    return out


def _progress(enabled: bool) -> Progress:
    """A bar on stderr (stdout may carry the report), as lm-eval's own bars are."""
    return Progress(console=Console(stderr=True), disable=not enabled)


def rolling_windows(
    tokens: Tokens, prefix: int, context: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Split a token sequence into (context, continuation) windows that score each token once.

    The first window reads `prefix` (BOS) and predicts up to `context` tokens; each next one
    predicts the following `stride` tokens with a full window of `context` tokens before them, the
    last one right-aligned. With `stride == context` these are exactly lm-eval's
    `loglikelihood_rolling` windows (`get_rolling_token_windows` with `context_len=1`, made
    disjoint); a smaller stride gives each prediction more context and costs more passes.
    """
    stride = stride or context
    if not 1 <= stride <= context:
        raise UserError(f"stride must be between 1 and the context ({context}), got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(context, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        windows.append((tokens[end - context - 1 : end - n], tokens[end - n : end]))
        done = end
    return windows


def score_rolling(
    model: nn.Module,
    documents: Sequence[Tokens],
    *,
    prefix: int,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    stats: ScoreStats | None = None,
    progress: bool = False,
) -> list[float]:
    """Total log-likelihood of each token sequence (BOS-free) under sliding windows.

    Args:
        model: an OpenELM `Model`.
        documents: token ids of each document, without BOS; each is scored on its own.
        prefix: the token the first window conditions on (BOS).
        context: tokens per window (default: the model's context window).
        stride: new tokens predicted per window after the first (default: `context`).
        batch_size, stats, progress: as in `score`.
    """
    context = context or model.args.max_context_length
    if context > model.args.max_context_length:
        raise UserError(
            f"context {context} exceeds the model's window of {model.args.max_context_length}"
        )
    windows, owner = [], []
    for d, tokens in enumerate(documents):
        for w in rolling_windows(tokens, prefix, context, stride):
            windows.append(w)
            owner.append(d)
    totals = [0.0] * len(documents)
    scores = score(
        model, windows, batch_size=batch_size, max_length=context, stats=stats, progress=progress
    )
    for d, (lp, _) in zip(owner, scores, strict=True):
        totals[d] += lp
    return totals
