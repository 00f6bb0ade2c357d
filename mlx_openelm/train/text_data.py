"""Pretraining data: plain text or jsonl documents -> BOS/EOS-wrapped token stream -> packed chunks.

A data path is a file or a folder of files (`*.txt`, `*.jsonl`, read in sorted order):
- `.txt`: one document per file, or, with `doc_separator`, documents split at that marker
  (e.g. "\\n\\n\\n" for two blank lines, or a line of its own such as "\\n<|doc|>\\n").
- `.jsonl`: one `{"text": ...}` document per line.

Every document becomes `<s> text </s>`; documents are concatenated and cut into chunks of
`seq_length + 1` tokens that overlap by one, so each token is a target exactly once. The held-out
validation split is a seeded choice of whole documents, so no validation text is trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import parse_json_line
from .data import Example, TokenizerLike, _special_id

TEXT_SUFFIXES = (".txt", ".jsonl")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data path {path} not found")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(
            f"{path} holds no .txt or .jsonl file: put plain-text documents (one per .txt file) "
            'or jsonl ({"text": ...} per line) there'
        )
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw[:65536]:
        raise UserError(f"{path} looks binary (it has NUL bytes): give plain UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (byte {e.start}): convert it, e.g. with iconv"
        ) from None


def read_documents(path: str | Path, doc_separator: str | None = None) -> list[str]:
    """All documents under `path` (a file or folder), in a fixed order.

    Args:
        path: a `.txt`/`.jsonl` file or a folder of them (searched recursively).
        doc_separator: split `.txt` files at this marker (default: one document per file).
    """
    docs: list[str] = []
    for file in _files(Path(path)):
        text = _read_text(file)
        if file.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                obj = parse_json_line(line, f"{file}:{lineno}")
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f'{file}:{lineno}: expected {{"text": "..."}} for pretraining')
                docs.append(obj["text"])
        else:
            parts = text.split(doc_separator) if doc_separator else [text]
            docs += [p.strip() for p in parts]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} holds no text: every document is empty")
    return docs


def split_documents(
    docs: Sequence[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded choice of whole documents (at least one when validating)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(docs), []
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise UserError(
            f"{len(docs)} document(s) can't give both a training and a validation split: "
            "add documents, split them with a separator, or set val_fraction 0"
        )
    order = np.random.default_rng([seed, 1]).permutation(len(docs))
    val = set(order[:n_val].tolist())
    return [d for i, d in enumerate(docs) if i not in val], [docs[i] for i in sorted(val)]


def encode_documents(
    docs: Sequence[str],
    tokenizer: TokenizerLike,
    min_chars: int = 0,
    min_tokens: int = 0,
) -> tuple[np.ndarray, dict[str, int]]:
    """One stream of `<s> doc </s>` tokens, dropping documents shorter than the minimums.

    The paper drops documents under 200 characters or 256 tokens; those are `min_chars` and
    `min_tokens` here (off by default, since a small corpus may have few long documents).

    Returns:
        (tokens, stats): stats counts `documents` kept and `dropped`.
    """
    bos, eos = _special_id(tokenizer, "bos_id"), _special_id(tokenizer, "eos_id")
    parts, dropped = [], 0
    for doc in docs:
        if len(doc) < min_chars:
            dropped += 1
            continue
        ids = list(tokenizer.encode(doc))
        ids = ids[1:] if ids and ids[0] == bos else ids
        if len(ids) < min_tokens:
            dropped += 1
            continue
        parts.append(np.array([bos, *ids, eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return stream, {"documents": len(parts), "dropped": dropped}


def pack(tokens: np.ndarray, seq_length: int) -> list[Example]:
    """Chunks of `seq_length + 1` tokens overlapping by one; a shorter tail is dropped."""
    if seq_length < 1:
        raise UserError(f"seq_length must be at least 1, got {seq_length}")
    n = (len(tokens) - 1) // seq_length
    ones = np.ones(seq_length + 1, dtype=bool)
    return [(tokens[i * seq_length : (i + 1) * seq_length + 1], ones) for i in range(n)]


def iter_lines(docs: Sequence[str]) -> Iterator[str]:
    """Non-empty lines of the documents: the sentences a SentencePiece trainer reads."""
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line
