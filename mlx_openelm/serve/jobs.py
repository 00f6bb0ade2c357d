"""A checked API request -> an engine job: the prompt's token ids (the chat template for chat,
as `generate --chat` renders it), the limits of the context and the batch, the sampling options.

Runs in a worker thread of the web layer: tokenizing and compiling a grammar never block the
event loop, and nothing here touches MLX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat_template import encode_conversation
from ..errors import UserError, check_utf8
from .protocol import APIError, ChatRequest, CompletionRequest, Sampling
from .sequence import Params


@dataclass
class Served:
    """What the web layer knows of the served model once the engine has loaded it."""

    model_ids: set[str]
    tokenizer: Any
    template: Any  # chat_template.ChatTemplate, or None for a base model
    grammars: Any  # grammar.Grammars
    context: int
    max_batch: int


def _utf8(text: str | None, param: str) -> None:
    try:
        check_utf8(text or "", param)
    except UserError as e:
        raise APIError(400, str(e), param=param) from None


def check_model(served: Served, model: str) -> None:
    if model not in served.model_ids:
        raise APIError(404, f"The model '{model:.200}' does not exist: this server serves "
                       f"{sorted(served.model_ids)[0]!r}", param="model",
                       code="model_not_found")  # fmt: skip


def chat_prompt(served: Served, req: ChatRequest) -> list[int]:
    if served.template is None:
        raise APIError(400, "This model has no chat template (a base model): use "
                       "/v1/completions, or serve an Instruct model", param="messages",
                       code="no_chat_template")  # fmt: skip
    messages = []
    for i, m in enumerate(req.messages):
        text = m.text()
        _utf8(text, f"messages.{i}.content")
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": text})
    try:
        return encode_conversation(served.tokenizer, served.template, messages)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None


def completion_prompts(served: Served, req: CompletionRequest) -> list[list[int]]:
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    vocab = served.tokenizer.vocab_size
    prompts = []
    for p in req.prompts():
        if isinstance(p, str):
            _utf8(p, "prompt")
            if not p:
                raise APIError(400, "The prompt is empty", param="prompt")
            prompts.append(served.tokenizer.encode(p))
        else:
            if not all(0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompts.append(list(p))
    return prompts


def params(served: Served, req: Sampling, prompts: list[list[int]], chat: bool) -> Params:
    """The sampling options and limits shared by both endpoints."""
    if req.n * len(prompts) > served.max_batch:
        raise APIError(400, f"n x prompts must be at most {served.max_batch} (--max-batch)",
                       param="n")  # fmt: skip
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported: use "
                       "repetition_penalty", param="presence_penalty")  # fmt: skip
    longest = max(len(p) for p in prompts)
    room = served.context - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens; "
                       f"the prompt has {longest}", param="messages" if chat else "prompt",
                       code="context_length_exceeded")  # fmt: skip
    max_tokens, name = req.max_tokens, "max_tokens"
    if getattr(req, "max_completion_tokens", None) is not None:
        max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{name} must be at least 1", param=name, code="invalid_value")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens; "
                       f"the prompt has {longest} and {name} asks {max_tokens} more", param=name,
                       code="context_length_exceeded")  # fmt: skip
    stop = req.stop_strings()
    for s in stop:
        _utf8(s, "stop")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not (key.isdigit() and int(key) < served.tokenizer.vocab_size):
            raise APIError(400, f"logit_bias: {key[:20]!r} is not a token id of this model",
                           param="logit_bias")  # fmt: skip
        bias[int(key)] = value
    grammar = served.grammars.compile(req.response_format) if req.response_format else None
    # OpenAI's top_p 0 keeps only the likeliest token: greedy (mlx-lm's sampler reads 0 as off).
    greedy = req.top_p == 0
    params = Params(
        max_tokens=room if max_tokens is None else max_tokens,
        temperature=0.0 if greedy else req.temperature,
        top_p=1.0 if greedy else req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
        logprobs=_logprobs(req),
        logit_bias=bias,
        grammar=grammar,
        trim_space=chat,
    )
    try:  # the engine builds the sampler from these: a bad option fails here, as a 400
        params.sampling().check()
    except UserError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return params


def _logprobs(req: Sampling) -> int | None:
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)
