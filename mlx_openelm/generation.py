"""Text generation in three layers, as in mlx-lm: `generate_step` (token ids) -> `stream_generate`
(text pieces, timing, stop conditions) -> `generate` (the whole text). `run` is the CLI command.

Sampling, repetition penalty and the streaming detokenizer are mlx-lm's; the KV cache is the
model's own (`kv_cache.py`, made through mlx-lm's `make_prompt_cache`). The step is our own
because `chat` reuses one KV cache across turns: ours also feeds the last token to the model, so
the cache holds the prompt and every token yielded, where mlx-lm's stops one short at
`max_tokens` (a reply cut at the length limit would then lose its last token).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import wired_limit
from mlx_lm.models.cache import make_prompt_cache

from . import kernels
from .chat_template import encode_conversation
from .errors import UserError, check_utf8
from .prepare import LogitsProcessor, Sampler, prepare
from .tokenizer import Tokenizer


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    `text` is the new printable text (may be ""); the tps figures are tokens per second;
    `peak_memory` is in GB; `finish_reason` is None until the last response, then "stop" (EOS or
    a stop string) or "length".
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None


def generate_step(
    prompt: mx.array | Sequence[int],
    model: nn.Module,
    *,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    max_tokens: int = 256,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 512,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield generated token ids and their log-probabilities, one at a time.

    Args:
        prompt: the prompt ids (1-D); with `prompt_cache`, only the ids not yet in it.
        model: the model.
        sampler: log-probabilities (1, vocab) -> token (1,); greedy (argmax) by default.
        logits_processors: functions (tokens, logits) -> logits, e.g. a repetition penalty.
        max_tokens: how many tokens to generate at most.
        prompt_cache: a KV cache (`make_prompt_cache(model)`) updated in place, so a caller can
          continue the same sequence later; a fresh one by default.
        prefill_step_size: prompt tokens per forward pass while prefilling (bounds memory).

    Yields:
        (token id, log-probabilities of shape (vocab,)). When a token is yielded the model has
        already read it, so the cache holds the prompt and every token yielded so far.
    """
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.size == 0:
        raise UserError("The prompt is empty: give at least one token")
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    tokens = None  # what the logits processors see: the prompt and the tokens so far

    def _step(ids: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = model(ids[None], cache=cache)[:, -1, :]
        if logits_processors:
            tokens = ids if tokens is None else mx.concatenate([tokens, ids])
            for processor in logits_processors:
                logits = processor(tokens, logits)
        logprobs = kernels.log_softmax(logits)
        return sampler(logprobs), logprobs.squeeze(0)

    # Prefill all but the last token in chunks, evaluating each so the graph stays small.
    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        model(prompt[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        if logits_processors:
            tokens = prompt[:n] if tokens is None else mx.concatenate([tokens, prompt[:n]])
        prompt = prompt[n:]
        mx.clear_cache()

    y, logprobs = _step(prompt)
    mx.async_eval(y, logprobs)
    n = 0
    while n < max_tokens:
        # Queue the next step before reading this token, so the device never waits on Python.
        if n + 1 < max_tokens:
            next_y, next_logprobs = _step(y)
            mx.async_eval(next_y, next_logprobs)
        else:
            # The last token still goes into the cache, so a caller can continue after it.
            model(y[None], cache=cache)
        yield y.item(), logprobs
        if n % 256 == 255:
            mx.clear_cache()
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs
        n += 1


def _split_stop(text: str, stop: Sequence[str]) -> tuple[str, str, bool]:
    """(text to emit now, text held back, whether a stop string was found)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    # Hold back the longest tail that could be the start of a stop string.
    for k in range(min(len(text), max(map(len, stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return text[:-k], text[-k:], False
    return text, "", False


class TextStream:
    """Generated ids -> text pieces, ending at EOS or a stop string: what `stream_generate` does
    with each token (the server runs one per sequence).

    Args:
        tokenizer: the tokenizer.
        stop: strings that end generation; the stop string itself is not returned.
        trim_space: drop the leading space of the first word (a reply, not a continuation).
        eos: the ids that end generation (default the tokenizer's EOS; empty to ignore EOS).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Iterable[str] = (),
        trim_space: bool = False,
        eos: Iterable[int] | None = None,
    ):
        self.eos = set(tokenizer.eos_token_ids if eos is None else eos)
        self.stop = [s for s in stop if s]
        self.detokenizer = tokenizer.detokenizer(trim_space=trim_space)
        self.pending = ""  # text held back: it may be the start of a stop string

    def add(self, token: int, last: bool = False) -> tuple[str, str | None]:
        """The new printable text and the finish reason: "stop" (EOS or a stop string), "length"
        when `last` (the token limit), else None."""
        if token in self.eos:
            self.detokenizer.finalize()
            return self.pending + self.detokenizer.last_segment, "stop"
        self.detokenizer.add_token(token)
        if last:
            self.detokenizer.finalize()
        text, self.pending, hit = _split_stop(
            self.pending + self.detokenizer.last_segment, self.stop
        )
        if hit:
            return text, "stop"
        if last:
            return text + self.pending, "length"
        return text, None


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    stop: Iterable[str] = (),
    trim_space: bool = False,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """Generate text piece by piece; stops at EOS, a stop string, or `max_tokens`.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        prompt: text (BOS is prepended) or token ids (used as they are).
        max_tokens: how many tokens to generate at most.
        stop: strings that end generation; the stop string itself is not returned.
        trim_space: drop the leading space of the first word (for a reply, not a continuation).
        kwargs: passed to `generate_step` (sampler, logits_processors, prompt_cache, ...).

    Yields:
        A `GenerationResponse` per generated token; the last has `finish_reason` set.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids or (isinstance(prompt, str) and not prompt):
        raise UserError("The prompt is empty: give some text to continue")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    cache = kwargs.get("prompt_cache")
    cached = cache[0].offset if cache else 0
    context = model.args.max_context_length
    if cached + len(ids) + max_tokens > context:
        raise UserError(
            f"{cached + len(ids)} prompt tokens + {max_tokens} new tokens exceed the model's "
            f"context window of {context} tokens: shorten the prompt or lower --max-tokens"
        )
    if model.args.vocab_size > tokenizer.vocab_size:
        # Padding rows (CoreNet has 32128 for 32000 pieces) are not tokens: never sample them.
        v = tokenizer.vocab_size
        cut = lambda tokens, logits: logits[:, :v]
        kwargs["logits_processors"] = [*(kwargs.get("logits_processors") or []), cut]
    text_stream = TextStream(tokenizer, stop, trim_space)

    def response(text: str, token: int, logprobs: mx.array, n: int, reason: str | None = None):
        gen_time = time.perf_counter() - first_token_at
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=len(ids),
            prompt_tps=len(ids) / prompt_time,
            generation_tokens=n,
            # The first token comes with the prefill; the decode rate counts the rest.
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
        )

    # On Metal, keep the weights wired; the stream is synced before the limit is restored.
    with wired_limit(model, [mx.default_stream(mx.default_device())]):
        if mx.default_device() == mx.cpu:
            kernels.available()  # a first run builds them (~40 s): not the prompt's time
        tic = time.perf_counter()
        steps = generate_step(ids, model, max_tokens=max_tokens, **kwargs)
        for n, (token, logprobs) in enumerate(steps, start=1):
            if n == 1:
                first_token_at = time.perf_counter()
                prompt_time = max(first_token_at - tic, 1e-9)
            text, reason = text_stream.add(token, last=n == max_tokens)
            yield response(text, token, logprobs, n, reason)
            if reason is not None:
                return


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate and return the whole text (see `stream_generate` for the options).

    With `verbose`, print the text as it streams and the speed report afterwards.
    """
    text = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(report(last), file=sys.stderr)
    return "".join(text)


def report(r: GenerationResponse) -> str:
    from . import kernels

    lines = [
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s",
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s",
        f"peak memory: {r.peak_memory:.3f} GB",
    ]
    if mx.default_device() == mx.cpu:
        lines.append(f"CPU kernels: {kernels.status()}")
    return "\n".join(lines)


def run(
    model: str,
    prompt: str,
    *,
    stop: Sequence[str] = (),
    chat: bool = False,
    system: str | None = None,
    chat_template: str | None = None,
    **options: Any,
) -> GenerationResponse:
    """`mlx-openelm generate`: continue `prompt`, streaming to stdout; the report goes to stderr.

    With `chat`, `prompt` is a user message (after `system`, if given) formatted with the chat
    template (`chat_template`, else the folder's, as `mlx-openelm chat` does) and only the reply
    is printed. `options` are `prepare`'s (max_tokens, sampling, seed, adapter_path).
    """
    if not prompt:
        raise UserError("The prompt is empty: pass some text with --prompt")
    if not chat and (system is not None or chat_template is not None):
        raise UserError("--system and --chat-template format a chat: add --chat")
    for text, what in [(prompt, "--prompt"), *((s, "--stop") for s in stop)]:
        check_utf8(text, what)
    p = prepare(model, system=system, chat=chat, chat_template=chat_template, **options)
    ids: str | list[int] = prompt
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        ids = encode_conversation(p.tokenizer, p.template, messages)
    mx.reset_peak_memory()
    stream = stream_generate(
        p.model,
        p.tokenizer,
        ids,
        max_tokens=p.max_tokens,
        stop=stop,
        trim_space=chat,
        sampler=p.sampler,
        logits_processors=p.processors,
    )
    first = next(stream)  # raises the prompt/context errors before anything is printed
    print(("" if chat else prompt) + first.text, end="", flush=True)
    last = first
    try:
        for last in stream:
            print(last.text, end="", flush=True)
    finally:  # Ctrl-C too: report what was generated before the CLI exits with 130
        print()
        print("=" * 10, file=sys.stderr)
        print(report(last), file=sys.stderr)
    return last
