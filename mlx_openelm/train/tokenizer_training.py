"""Train a SentencePiece tokenizer with Llama-2's conventions on the pretraining data."""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from ..errors import UserError
from ..tokenizer import Tokenizer
from .text_data import iter_lines, read_documents


def train_tokenizer(
    data: str | Path,
    out: str | Path,
    *,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    doc_separator: str | None = None,
    character_coverage: float = 0.99995,
    max_sentences: int = 2_000_000,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model like Llama-2's: byte fallback, unk 0, `<s>` 1, `</s>` 2.

    Args:
        data: the pretraining data (a `.txt`/`.jsonl` file or a folder, as `pretrain` reads it).
        out: the `tokenizer.model` to write.
        vocab_size: number of pieces (including the 256 byte pieces and 3 specials).
        model_type: "bpe" (Llama-2's) or "unigram".
        doc_separator: the `.txt` document marker, as for `pretrain`.
        character_coverage: share of characters given their own piece; rarer ones use bytes.
        max_sentences: lines sampled for training (SentencePiece's `input_sentence_size`).
        overwrite: replace an existing `out`.

    Returns:
        The trained tokenizer.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: delete it or choose another path")
    if vocab_size < 300:
        raise UserError(f"vocab_size {vocab_size}: use at least 300 (256 byte pieces + 3 specials)")
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model_type {model_type!r}: choose bpe or unigram")
    docs = read_documents(data, doc_separator)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_lines(docs),
            model_writer=buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            # As Llama-2: text kept as is (no NFKC, spaces kept), so decode(encode(x)) == x.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"SentencePiece could not train on {data}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)
    return Tokenizer(out)
