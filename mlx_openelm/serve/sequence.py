"""One sequence of the running batch: its KV cache, where its prompt stands, how it samples, and
the text it has produced. A request with `n` choices over `p` prompts runs `n * p` of them.

Sampling is `prepare.SamplingOptions`' (mlx-lm's samplers and repetition penalty), text is
`generate.TextStream`'s, so a sequence's tokens and text are `generate`'s for the same options.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..generation import TextStream
from ..kv_cache import KVCache
from ..prepare import SamplingOptions
from ..tokenizer import Tokenizer


@dataclass
class Params:
    """What a request asks of each of its sequences (checked by the web layer)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many alternatives to return per token; None: no logprobs
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: Any = None  # a compiled grammar (grammar.py) the reply must follow
    trim_space: bool = False  # a chat reply: drop the first word's leading space

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty
        )


@dataclass
class Piece:
    """What one step of one sequence gives the client."""

    index: int
    text: str
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Job:
    """One API request: prompts (token ids) x n choices, and where its events go.

    `emit` is called from the engine thread with ("piece", Piece), ("done", Usage) or
    ("error", exception); the web layer makes it thread-safe. `cancel()` (a client that hung up)
    frees the job's places at the engine's next step.
    """

    prompts: list[list[int]]
    n: int
    params: Params
    emit: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)

    def cancel(self) -> None:
        self.cancelled.set()


class Sequence:
    def __init__(self, job: Job, index: int, prompt: list[int], tokenizer: Tokenizer, layers: int):
        p = job.params
        self.job, self.index, self.prompt = job, index, prompt
        self.cache = [KVCache() for _ in range(layers)]
        self.pos = 0  # prompt tokens in the cache
        self.history = list(prompt)  # the prompt and every token sampled
        self.generated = 0  # tokens read back
        self.sampled = 0  # tokens sampled (one ahead of `generated` while a step computes)
        self.finished = False
        self.leader: Sequence | None = None  # a sibling choice that prefills the shared prompt
        self.sampler, self.processors = p.sampling().build(tokenizer.vocab_size)
        eos = () if p.ignore_eos else None
        self.text = TextStream(tokenizer, p.stop, p.trim_space, eos=eos)
        self.matcher = p.grammar.matcher() if p.grammar is not None else None
        self.bias = _bias(p.logit_bias, tokenizer.vocab_size)
        self.greedy = p.temperature == 0
        self.plain = not (self.processors or self.matcher or self.bias is not None)
        # Its next step can be built before its last token is read (see Engine._decode).
        self.pipelined = not (self.processors or self.matcher)

    @property
    def ready(self) -> bool:
        """Prefilled: the next decode step feeds its last token."""
        return self.pos >= len(self.prompt) - 1

    def adopt(self, cache: list[KVCache], length: int) -> None:
        """Start from a copy of another cache's first `length` positions."""
        self.cache = [_copy(c, length) for c in cache]
        self.pos = length

    def sample(self, logits: mx.array, logprobs: mx.array | None) -> tuple[mx.array, mx.array]:
        """This row's logits (1, vocab) -> (token (1,), log-probabilities (1, vocab)); `logprobs`
        is the batch's log-softmax of the same row when nothing here changes the logits."""
        if not self.plain:
            if self.processors:
                tokens = mx.array(self.history)
                for processor in self.processors:
                    logits = processor(tokens, logits)
            if self.bias is not None:
                logits = logits + self.bias
            if self.matcher is not None:
                logits = self.matcher.mask(logits)
            from .. import kernels

            logprobs = kernels.log_softmax(logits)
        if self.greedy:
            return mx.argmax(logprobs, axis=-1), logprobs
        if self.job.params.seed is not None:
            # A seeded request draws from its own seed at each step, whatever runs beside it.
            mx.random.seed((self.job.params.seed + 7919 * self.sampled) % (1 << 32))
        return self.sampler(logprobs), logprobs

    def advance(self, token: int, logprobs: np.ndarray | None) -> Piece:
        """Take the sampled token: its text, logprobs and whether this sequence ends here."""
        self.generated += 1
        last = self.generated >= self.job.params.max_tokens
        text, reason = self.text.add(token, last=last)
        if self.matcher is not None:
            self.matcher.consume(token)
            if reason is None and self.matcher.done():
                text, reason = text + self.text.pending, "stop"
        piece = Piece(self.index, text, token, finish_reason=reason)
        if logprobs is not None:
            piece.logprob = float(logprobs[token])
            k = self.job.params.logprobs or 0
            if k:
                top = np.argpartition(-logprobs, k)[:k]
                top = top[np.argsort(-logprobs[top], kind="stable")]
                piece.top = [(int(i), float(logprobs[i])) for i in top]
        if reason is None:
            self.history.append(token)
        return piece


def _bias(logit_bias: dict[int, float], vocab: int) -> mx.array | None:
    if not logit_bias:
        return None
    bias = np.zeros(vocab, np.float32)
    for token, value in logit_bias.items():
        bias[token] = value
    return mx.array(bias)


def _copy(cache: KVCache, length: int) -> KVCache:
    """A cache of its own (writes never reach `cache`) holding the first `length` positions."""
    c = KVCache()
    if cache.kv is not None and length:
        c.kv = mx.array(cache.kv[..., :length, :])
    c.offset = length
    return c
