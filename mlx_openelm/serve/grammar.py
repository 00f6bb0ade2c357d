"""Structured output: `response_format` json_object / json_schema as a grammar that masks the
logits at every step, so the reply always parses (and validates), with no retries.

The engine is xgrammar (MLC's, C++, vLLM's and SGLang's default): on a 32000-token vocabulary
its mask cost ~4 us a token against ~0.7 ms for outlines-core and ~1.8 ms for llguidance, the
three that pip installs here; docs/serve.md has the figures, `bench/grammar_overhead.py` the
measurement.
"""

from __future__ import annotations

import json
import re
from typing import Any

import mlx.core as mx
import numpy as np

from ..tokenizer import Tokenizer
from .protocol import APIError, ResponseFormat

# A small grammar keeps a hostile schema from costing the engine thread much per token.
MAX_SCHEMA_BYTES = 64 * 1024
XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class Grammars:
    """Compiles response formats against one tokenizer. xgrammar is an optional dependency (it
    requires torch): it is imported on the first structured request, and without it such a
    request gets a 400 that says what to install."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab_size
        self.eos = tokenizer.eos_id
        self._xgr: Any = None
        self._compiler: Any = None

    def _compiler_or_400(self) -> Any:
        if self._compiler is not None:
            return self._compiler
        try:
            import xgrammar as xgr
        except ImportError:
            raise APIError(
                400,
                "structured output (response_format) needs xgrammar on the server: "
                "pip install 'mlx-openelm[structured]' (docs/serve.md)",
                param="response_format",
                code="structured_output_unavailable",
            ) from None
        sp = self.tokenizer.sp
        # SentencePiece pieces as they are ("▁" a space, "<0x0A>" a byte); control pieces (<s>,
        # </s>) print nothing, which xgrammar reads as special tokens, never inside the JSON.
        # So are the control bytes (0x00-0x1f), which compact JSON never holds raw (xgrammar let a
        # <0x00> piece into a string).
        pieces = [
            "" if p is None or (isinstance(p, bytes) and p[0] < 0x20) else sp.id_to_piece(i)
            for i, p in enumerate(self.tokenizer.pieces)
        ]
        info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=self.vocab,
                                 stop_token_ids=[self.eos])  # fmt: skip
        self._xgr, self._compiler = xgr, xgr.GrammarCompiler(info, cache_limit_bytes=64 << 20)
        return self._compiler

    def compile(self, fmt: ResponseFormat | None) -> CompiledGrammar | None:
        """The grammar for `response_format`, or None for plain text; a bad schema is a 400."""
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            if fmt.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs a json_schema",
                               param="response_format.json_schema")  # fmt: skip
            schema = fmt.json_schema.get("schema", {})
            if not isinstance(schema, (dict, bool)):
                raise APIError(400, "json_schema.schema must be a JSON schema object",
                               param="response_format.json_schema")  # fmt: skip
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise APIError(400, f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes",
                           param="response_format")  # fmt: skip
        compiler = self._compiler_or_400()
        try:
            compiled = compiler.compile_json_schema(
                text, any_whitespace=False, separators=(",", ":")
            )
        except Exception as e:  # xgrammar reports a bad schema as a RuntimeError/ValueError
            # xgrammar's messages begin with a time and its own source line: not the client's
            message = XGRAMMAR_PREFIX.sub("", " ".join(str(e).split()))[:500]
            raise APIError(
                400, f"invalid JSON schema: {message}", param="response_format"
            ) from None
        return CompiledGrammar(self, compiled)


class CompiledGrammar:
    def __init__(self, grammars: Grammars, grammar: str):
        self.grammars, self.grammar = grammars, grammar

    def matcher(self) -> Matcher:
        return Matcher(self.grammars, self.grammar)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, grammars: Grammars, grammar: Any):
        self._m = grammars._xgr.GrammarMatcher(grammar)
        self._mask = np.zeros((1, (grammars.vocab + 31) // 32), np.int32)
        self._vocab = grammars.vocab

    def mask(self, logits: mx.array) -> mx.array:
        """Logits (1, vocab) with every token the grammar refuses at -inf."""
        self._m.fill_next_token_bitmask(self._mask)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._vocab]
        allowed = mx.array(allowed.astype(bool))
        return mx.where(allowed, logits[..., : self._vocab], -mx.inf)

    def consume(self, token: int) -> None:
        self._m.accept_token(token)

    def done(self) -> bool:
        """The grammar has ended (its stop token accepted)."""
        return self._m.is_terminated()
