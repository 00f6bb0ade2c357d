"""Per-token cost of structured output's token mask on a 32000-token vocabulary, for the grammar
engines pip installs here: llguidance, xgrammar, outlines-core. How serve's engine was chosen
(docs/serve.md).

The vocabulary is Llama-2-sized and built from English text: the 256 byte pieces, then the most
frequent substrings of the shipped novel (with and without a leading space) up to 32000. Each
engine compiles one JSON schema, then walks a valid document token by token: compute the mask
(the allowed ids), consume the token. The figure is the median microseconds per token over the
walk, repeated.

    python -m mlx_openelm.bench.grammar_overhead [--text tests/data/persuasion.txt]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

VOCAB = 32000
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
DOCUMENT = (
    '{"name":"Anne Elliot of Kellynch Hall","age":27,"tags":["patient","kind","wise"],"ok":true}'
)


def vocabulary(text: str) -> list[bytes]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)]
    counts: collections.Counter[str] = collections.Counter()
    for word in re.findall(r"\w+|[^\w\s]+", text):
        for n in range(2, min(len(word), 10) + 1):
            for i in range(len(word) - n + 1):
                counts[word[i : i + n]] += 1
    seen = set(tokens)
    for piece, _ in counts.most_common():
        for t in (piece.encode(), b" " + piece.encode()):
            if t not in seen and len(tokens) < VOCAB:
                seen.add(t)
                tokens.append(t)
    for extra in (b'{"', b'":', b'",', b'"', b",", b":", b"[", b"]", b"}", b" {"):
        if extra not in seen:
            tokens[-1 - len(seen) % 100] = extra  # keep JSON's punctuation pieces in
            seen.add(extra)
    return tokens[:VOCAB]


def greedy(tokens: list[bytes], text: bytes) -> list[int]:
    """The document as the longest pieces, left to right."""
    index = {t: i for i, t in enumerate(tokens) if i > 2}
    out, i = [], 0
    while i < len(text):
        for n in range(min(12, len(text) - i), 0, -1):
            if text[i : i + n] in index:
                out.append(index[text[i : i + n]])
                i += n
                break
    return out


def time_walk(step, ids: list[int], repeats: int) -> float:
    per = []
    for _ in range(repeats):
        reset = step(None)
        tic = time.perf_counter()
        for t in ids:
            step(t)
        per.append((time.perf_counter() - tic) / len(ids) * 1e6)
        del reset
    return statistics.median(per)


def llguidance_engine(tokens: list[bytes]):
    import llguidance

    class Tok:
        eos_token_id, bos_token_id, special_token_ids = EOS, 1, [0, 1, 2]

        def __init__(self):
            self.tokens = tokens

        def __call__(self, b: bytes) -> list[int]:
            return greedy(tokens, b)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    mask = np.zeros((VOCAB + 31) // 32, np.int32)
    state = {}

    def step(token):
        if token is None:
            state["m"] = llguidance.LLMatcher(tok, grammar)
            return state
        m = state["m"]
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        assert mask[token // 32] >> (token % 32) & 1, "llguidance refused a valid token"
        m.consume_token(token)

    return step


def xgrammar_engine(tokens: list[bytes]):
    import xgrammar as xgr

    info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    mask = np.zeros((1, (VOCAB + 31) // 32), np.int32)
    state = {}

    def step(token):
        if token is None:
            state["m"] = xgr.GrammarMatcher(compiled)
            return state
        m = state["m"]
        m.fill_next_token_bitmask(mask)
        assert mask[0, token // 32] >> (token % 32) & 1, "xgrammar refused a valid token"
        m.accept_token(token)

    return step


def outlines_engine(tokens: list[bytes]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    mapping: dict[str, list[int]] = {}
    for i, t in enumerate(tokens):
        if i > 2:
            mapping.setdefault(t.decode("latin-1"), []).append(i)
    vocab = Vocabulary(EOS, mapping)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab)
    state = {}

    def step(token):
        if token is None:
            state["g"] = Guide(index)
            return state
        g = state["g"]
        allowed = g.get_tokens()
        g.advance(token)
        return allowed

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--text", default=str(Path(__file__).parent.parent / "tests/data/persuasion.txt")
    )
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    tokens = vocabulary(Path(args.text).read_text())
    ids = greedy(tokens, DOCUMENT.encode())
    print(f"vocabulary {len(tokens)} tokens; document {len(ids)} tokens")
    for name, make in [("llguidance", llguidance_engine), ("xgrammar", xgrammar_engine),
                       ("outlines-core", outlines_engine)]:  # fmt: skip
        try:
            tic = time.perf_counter()
            step = make(tokens)
            compile_ms = (time.perf_counter() - tic) * 1e3
            us = time_walk(step, ids, args.repeats)
        except Exception as e:
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        print(f"{name}: {us:.1f} us/token (mask + consume), setup {compile_ms:.0f} ms")


if __name__ == "__main__":
    main()
