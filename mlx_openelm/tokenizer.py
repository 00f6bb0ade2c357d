"""The Llama-2 SentencePiece tokenizer that OpenELM uses, and streaming detokenizing.

OpenELM's Hub repos ship no tokenizer: a model folder holds Llama-2's `tokenizer.model` (32000
pieces, `<unk>` 0, `<s>` 1 BOS, `</s>` 2 EOS) once `mlx-openelm convert` copies it in (see
tokenizer_sources.py for where it comes from).
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
from pathlib import Path

import sentencepiece as spm
from mlx_lm.tokenizer_utils import StreamingDetokenizer

from .errors import UserError

TOKENIZER_FILE = "tokenizer.model"

# The OpenELM Instruct format (Zephyr's, from alignment-handbook) as a Hugging Face chat template,
# so mlx-lm / transformers users do not fall back to the Llama-2 template, which gives garbage.
# It writes BOS itself because apply_chat_template tokenizes without adding special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class Tokenizer:
    """SentencePiece with Llama-2's conventions: BOS prepended, EOS ends generation."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No SentencePiece model at {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError):
            raise UserError(
                f"{path} is not a SentencePiece model: use Llama-2's tokenizer.model"
            ) from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.eos_token_ids = {self.eos_id}
        # Control pieces (`<s>`, `</s>`) as they appear in text, for `encode(..., special=True)`.
        self.special = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)
        }
        self.pieces, self.unknown = _piece_table(self.sp)
        self._special_re = re.compile("|".join(re.escape(p) for p in self.special) or "(?!)")

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text -> ids.

        Args:
            text: the text.
            add_bos: prepend `<s>` (OpenELM was trained with it; always on for a fresh prompt).
            special: read `<s>` and `</s>` written in the text as the BOS/EOS ids, as Hugging
              Face's tokenizer does (SentencePiece alone spells them out as plain characters).
              Each piece of text between them gets SentencePiece's leading `▁`, also as HF does.
        """
        ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        if not special:
            return ids + self.sp.encode(text)
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.sp.encode(text[pos : m.start()])
            ids.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def detokenizer(self, trim_space: bool = False) -> StreamingDetokenizer:
        """A streaming detokenizer (mlx-lm's interface): whole characters only, linear time.

        Args:
            trim_space: drop the leading space of the first word, as `decode` does. Leave it off
              when the text continues a prompt, so " word" keeps its space.
        """
        return SPMDetokenizer(self, trim_space=trim_space)


def _piece_table(sp: spm.SentencePieceProcessor) -> tuple[list[str | bytes | None], set[int]]:
    """What each id prints: text (with "▁" as " "), a raw byte, or None (control); unknown ids."""
    pieces: list[str | bytes | None] = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i):
            pieces.append(None)  # <s>, </s> decode to nothing
        elif sp.is_byte(i):
            pieces.append(bytes([int(piece[3:5], 16)]))  # "<0xAB>"
        elif sp.is_unknown(i):
            pieces.append(" \u2047 ")  # what sentencepiece prints for <unk>
        else:
            pieces.append(piece.replace("\u2581", " "))
    return pieces, {i for i in range(sp.vocab_size()) if sp.is_unknown(i)}


def _replace_each_byte(e: UnicodeDecodeError) -> tuple[str, int]:
    return "\ufffd", e.start + 1


# sentencepiece decodes each invalid byte to one U+FFFD (Python's "replace" may merge a run).
codecs.register_error("mlx_openelm.spm", _replace_each_byte)


class SPMDetokenizer(StreamingDetokenizer):
    """Streaming SentencePiece decoding that joins up to exactly `sentencepiece`'s own decode.

    mlx-lm's SPMStreamingDetokenizer nearly fits; it trims a leading byte-fallback space (<0x20>)
    and merges invalid bytes into fewer U+FFFD than sentencepiece. Byte pieces go through an
    incremental UTF-8 decoder, so a character split over several tokens comes out whole.
    """

    def __init__(self, tokenizer: Tokenizer, trim_space: bool = True):
        self.trim_space = trim_space
        self.pieces, self.unknown = tokenizer.pieces, tokenizer.unknown
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.text = ""
        self.tokens: list[int] = []
        self._bytes = codecs.getincrementaldecoder("utf-8")("mlx_openelm.spm")
        self._first = True

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        piece = self.pieces[token]
        if piece is None:  # a control piece prints nothing but ends a byte run
            self.text += self._bytes.decode(b"", final=True)
            return
        first, self._first = self._first, False
        if isinstance(piece, bytes):
            self.text += self._bytes.decode(piece)
            return
        self.text += self._bytes.decode(b"", final=True)  # an unfinished character ends here
        if first and self.trim_space and token not in self.unknown:
            piece = piece[1:] if piece.startswith(" ") else piece  # the dummy-prefix space
        self.text += piece

    def finalize(self) -> None:
        self.text += self._bytes.decode(b"", final=True)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's `tokenizer.model`, or None when it has none."""
    path = Path(folder) / TOKENIZER_FILE
    return Tokenizer(path) if path.exists() else None


def require_tokenizer(tokenizer: Tokenizer | None, folder: str | Path) -> Tokenizer:
    if tokenizer is None:
        raise FileNotFoundError(
            f"{folder} has no {TOKENIZER_FILE}: convert with `mlx-openelm convert SOURCE OUT "
            "--tokenizer path/to/tokenizer.model` (Llama-2's SentencePiece model), or copy it in"
        )
    return tokenizer


def write_tokenizer_files(
    folder: str | Path,
    tokenizer_model_path: str | Path,
    max_length: int = 2048,
    chat_template: str | None = None,
) -> None:
    """Copy a SentencePiece `tokenizer.model` into a model folder, with HF's small config files.

    `tokenizer_config.json` and `special_tokens_map.json` make the folder load in mlx-lm and
    transformers (a Llama tokenizer, with a chat template for an Instruct model).

    Args:
        folder: the model folder (it must exist).
        tokenizer_model_path: Llama-2's `tokenizer.model` (or another SentencePiece model).
        max_length: the model's context window, recorded as `model_max_length`.
        chat_template: the Jinja chat template to record (OpenELM's Instruct format by default);
          None for a base model, which then has none.
    """
    folder, src = Path(folder), Path(tokenizer_model_path)
    tok = Tokenizer(src)  # validates
    dst = folder / TOKENIZER_FILE
    if not (dst.exists() and dst.samefile(src)):
        shutil.copyfile(src, dst)
    names = {
        "bos_token": tok.sp.id_to_piece(tok.bos_id),
        "eos_token": tok.sp.id_to_piece(tok.eos_id),
        "unk_token": tok.sp.id_to_piece(tok.unk_id),
    }
    config = {
        **names,
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "pad_token": None,
        # legacy: text after `</s>` gets a leading "▁", as Llama-2's tokenizer.json (used to
        # train OpenELM Instruct) does.
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "sp_model_kwargs": {},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", names)):
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
