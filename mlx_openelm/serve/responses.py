"""The engine's pieces and usage -> OpenAI response objects and stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .sequence import Piece, Usage


def usage_body(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class Builder:
    """One request's responses: chat (`chat.completion`) or text (`text_completion`)."""

    def __init__(self, tokenizer: Any, model: str, chat: bool, choices: int, echo: list[str]):
        self.tokenizer, self.model, self.chat = tokenizer, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.echo = echo  # completions with echo: each prompt's text, before its first piece
        self.started = [False] * choices
        self.offsets = [0] * choices  # completions' text_offset

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def token(self, i: int) -> tuple[str, list[int]]:
        """A token's text and bytes, as OpenAI's logprobs give them."""
        piece = self.tokenizer.pieces[i]
        if isinstance(piece, bytes):
            return piece.decode("utf-8", errors="replace"), list(piece)
        text = piece if piece is not None else self.tokenizer.sp.id_to_piece(i)
        return text, list(text.encode("utf-8"))

    def _chat_logprobs(self, p: Piece) -> dict[str, Any]:
        text, raw = self.token(p.token)
        top = []
        for t, lp in p.top or []:
            tt, tb = self.token(t)
            top.append({"token": tt, "logprob": lp, "bytes": tb})
        return {"token": text, "logprob": p.logprob, "bytes": raw, "top_logprobs": top}

    def _text_logprobs(self, p: Piece, offset: int) -> dict[str, Any]:
        top = {self.token(t)[0]: lp for t, lp in p.top or []}
        return {"tokens": [self.token(p.token)[0]], "token_logprobs": [p.logprob],
                "top_logprobs": [top], "text_offset": [offset]}  # fmt: skip

    def chunk(self, p: Piece) -> dict[str, Any]:
        """One stream chunk for one piece."""
        first, self.started[p.index] = not self.started[p.index], True
        lp = None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": p.text} if first else {
                "content": p.text}  # fmt: skip
            if p.logprob is not None:
                lp = {"content": [self._chat_logprobs(p)]}
            choice = {"index": p.index, "delta": delta, "logprobs": lp,
                      "finish_reason": p.finish_reason}  # fmt: skip
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        text = (self.echo[p.index] if first and self.echo else "") + p.text
        if p.logprob is not None:
            lp = self._text_logprobs(p, self.offsets[p.index])
        self.offsets[p.index] += len(text)
        choice = {"index": p.index, "text": text, "logprobs": lp, "finish_reason": p.finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, u: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_body(u)}

    def whole(self, pieces: list[list[Piece]], u: Usage) -> dict[str, Any]:
        """The response of a request that did not stream."""
        choices = []
        for i, ps in enumerate(pieces):
            text = "".join(p.text for p in ps)
            reason = ps[-1].finish_reason if ps else "stop"
            if self.chat:
                lp = {"content": [self._chat_logprobs(p) for p in ps]} if ps and ps[
                    0].logprob is not None else None  # fmt: skip
                message = {"role": "assistant", "content": text}
                choices.append({"index": i, "message": message, "logprobs": lp,
                                "finish_reason": reason})  # fmt: skip
            else:
                lp = self._whole_text_logprobs(ps, i) if ps and ps[0].logprob is not None else None
                echo = self.echo[i] if self.echo else ""
                choices.append({"index": i, "text": echo + text, "logprobs": lp,
                                "finish_reason": reason})  # fmt: skip
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage_body(u)}

    def _whole_text_logprobs(self, ps: list[Piece], i: int) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}  # fmt: skip
        offset = len(self.echo[i]) if self.echo else 0
        for p in ps:
            one = self._text_logprobs(p, offset)
            for k in out:
                out[k] += one[k]
            offset += len(p.text)
        return out
