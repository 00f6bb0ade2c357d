"""Structured output: `response_format` json_object / json_schema as a grammar that masks the
logits at every step, so the reply always parses (and validates), with no retries.

The engine is llguidance (Microsoft's, Rust, the one vLLM and llama.cpp also ship): on a 32000-
token vocabulary its mask cost the least per token of the three we could install (llguidance,
xgrammar, outlines-core); docs/serve.md has the figures and `bench/grammar_overhead.py` the
measurement.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from ..tokenizer import Tokenizer
from .protocol import APIError, ResponseFormat

# A small grammar keeps a hostile schema from costing the engine thread much per token.
MAX_SCHEMA_BYTES = 64 * 1024


class _SPTokens:
    """What llguidance's TokenizerWrapper reads: each id's bytes and a bytes -> ids encoder."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i, piece in enumerate(tokenizer.pieces):
            if piece is None or i in tokenizer.unknown:
                self.special_token_ids.append(i)
                self.tokens.append(sp.id_to_piece(i).encode())
            else:
                self.tokens.append(piece if isinstance(piece, bytes) else piece.encode())
        self._sp = sp
        self._newline = sp.encode("\n")

    def __call__(self, text: bytes) -> list[int]:
        # Without SentencePiece's dummy "▁" in front (llguidance tokenizes pieces of the reply):
        # after a newline, which Llama-2's vocabulary spells as one byte piece, text starts anew.
        ids = self._sp.encode("\n" + text.decode("utf-8", errors="replace"))
        n = len(self._newline)
        return (
            ids[n:]
            if ids[:n] == self._newline
            else self._sp.encode(text.decode("utf-8", "replace"))
        )


class Grammars:
    """Compiles response formats against one tokenizer (the vocabulary is read once)."""

    def __init__(self, tokenizer: Tokenizer):
        import llguidance

        self._ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SPTokens(tokenizer)))
        self.vocab = tokenizer.vocab_size
        self.eos = tokenizer.eos_id

    def compile(self, fmt: ResponseFormat | None) -> CompiledGrammar | None:
        """The grammar for `response_format`, or None for plain text; a bad schema is a 400."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            spec = fmt.json_schema or {}
            schema = spec.get("schema", {}) if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise APIError(400, "json_schema.schema must be a JSON schema object",
                               param="response_format.json_schema")  # fmt: skip
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise APIError(400, f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes",
                           param="response_format")  # fmt: skip
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False}
            )
            failed, messages = self._ll.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer
            )
        except Exception as e:  # llguidance reports a bad schema as a ValueError/RuntimeError
            raise APIError(400, f"invalid JSON schema: {e}", param="response_format") from None
        if failed:
            message = messages[0] if messages else "unsupported"
            raise APIError(400, f"invalid JSON schema: {message:.500}", param="response_format")
        return CompiledGrammar(self, grammar)


class CompiledGrammar:
    def __init__(self, grammars: Grammars, grammar: str):
        self.grammars, self.grammar = grammars, grammar

    def matcher(self) -> Matcher:
        return Matcher(self.grammars, self.grammar)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str):
        ll = grammars._ll
        self._m = ll.LLMatcher(grammars.tokenizer, grammar)
        self._mask = np.zeros((1, (grammars.vocab + 31) // 32), np.int32)
        self._vocab = grammars.vocab
        self._eos = grammars.eos

    def mask(self, logits: mx.array) -> mx.array:
        """Logits (1, vocab) with every token the grammar refuses at -inf."""
        if self._m.is_error():  # cannot happen with a validated grammar; end the reply if so
            allowed = np.zeros(self._vocab, np.uint8)
            allowed[self._eos] = 1
        else:
            self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._vocab]
        allowed = mx.array(allowed.astype(bool))
        return mx.where(allowed, logits[..., : self._vocab], -mx.inf)

    def consume(self, token: int) -> None:
        self._m.consume_token(token)

    def done(self) -> bool:
        """The grammar is complete: nothing but the end can follow."""
        return self._m.is_stopped() or self._m.is_error()
