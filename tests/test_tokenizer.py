"""The SentencePiece tokenizer and the streaming detokenizer, on a tiny model trained on Austen."""

from __future__ import annotations

import json
import random

import pytest

from mlx_openelm.tokenizer import (
    CHAT_TEMPLATE,
    Tokenizer,
    load_tokenizer,
    write_tokenizer_files,
)

TEXTS = [
    "It is a truth universally acknowledged.",
    "Naïve café, façade, Ærøskøbing — “quoted” ½ × π ≈ 3.14",
    "Emoji: 😀🎉👩‍👩‍👧 and 日本語のテキスト, 한국어, Ελληνικά, עברית",
    " one leading space",
    "   three leading spaces",
    "multiple   spaces\tand\ttabs\n\nand blank lines\n",
    "trailing spaces   ",
    "digits 1234567890 and <s> </s> written out",
]


def stream(tokenizer: Tokenizer, ids: list[int], trim_space: bool) -> list[str]:
    """The pieces a streaming detokenizer emits, one per token, then the finalize flush."""
    d = tokenizer.detokenizer(trim_space=trim_space)
    pieces = []
    for i in ids:
        d.add_token(i)
        pieces.append(d.last_segment)
    d.finalize()
    pieces.append(d.last_segment)
    return pieces


def test_special_ids_and_bos(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.eos_token_ids == {2}
    ids = tokenizer.encode("Anne Elliot")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.encode("Anne Elliot", add_bos=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # byte fallback: no <unk>, even for characters never seen in training


def test_byte_fallback_spells_unseen_characters_in_utf8_bytes(tokenizer):
    ids = tokenizer.encode("😀", add_bos=False)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_join_to_decode_and_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids, trim_space=True)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    for piece in pieces:
        piece.encode("utf-8")  # never a lone surrogate
        assert "\ufffd" not in piece  # never half a character
    # A 4-byte emoji arrives over 4 tokens and comes out in one piece.
    if "😀" in text:
        assert any("😀" in p for p in pieces)


def test_stream_keeps_the_leading_space_of_a_continuation(tokenizer):
    prompt = tokenizer.encode("It was a")
    for word in ("▁the", "▁▁", "<0x20>"):  # a word, a run of spaces, a byte-fallback space
        new = [tokenizer.sp.piece_to_id(word)]
        text = "".join(stream(tokenizer, new, trim_space=False))
        assert text.startswith(" ")
        assert tokenizer.decode(prompt) + text == tokenizer.decode(prompt + new)
    # A reply (trim_space) drops the dummy-prefix space, as decode does, but not a byte space.
    assert "".join(stream(tokenizer, [tokenizer.sp.piece_to_id("▁the")], True)) == "the"
    assert "".join(stream(tokenizer, [tokenizer.sp.piece_to_id("<0x20>")], True)) == " "


def test_stream_equals_decode_on_random_ids(tokenizer):
    # Any id sequence, even invalid UTF-8 byte runs, <unk> and control ids, joins to decode().
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        pieces = stream(tokenizer, ids, trim_space=True)
        assert "".join(pieces) == tokenizer.decode(ids), ids
        for piece in pieces:
            piece.encode("utf-8")


def test_special_text_becomes_ids_only_when_asked(tokenizer):
    text = "hi</s>\n<|user|>"
    plain = tokenizer.encode(text, add_bos=False)
    assert 2 not in plain  # SentencePiece spells </s> out as characters
    special = tokenizer.encode(text, add_bos=False, special=True)
    assert special.count(2) == 1
    i = special.index(2)
    assert special[:i] == tokenizer.encode("hi", add_bos=False)
    # The text after it gets its own leading "▁", as Hugging Face's Llama tokenizer does.
    assert special[i + 1 :] == tokenizer.encode("\n<|user|>", add_bos=False)
    assert tokenizer.sp.id_to_piece(special[i + 1]) == "▁"


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_write_tokenizer_files_loads_in_transformers(tmp_path, spm_model, tokenizer):
    assert load_tokenizer(tmp_path) is None
    write_tokenizer_files(tmp_path, spm_model, max_length=512, chat_template=CHAT_TEMPLATE)
    assert load_tokenizer(tmp_path).encode("Anne") == tokenizer.encode("Anne")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "</s>"

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi 😀</s>\n<|assistant|>\n"
    # HF reads the `</s>` in the Instruct format as EOS, like our special=True encoding.
    body = text.removeprefix("<s>")
    assert hf(body)["input_ids"] == tokenizer.encode(body, special=True)
    assert hf("Anne Elliot, née Musgrove")["input_ids"] == tokenizer.encode(
        "Anne Elliot, née Musgrove"
    )
