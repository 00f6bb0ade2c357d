"""Shared fixtures: a tiny SentencePiece model trained on shipped text, tiny model folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import mlx_openelm  # noqa: E402, F401, I001  (first: it picks the BLAS before mlx.core loads)
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402

DATA = Path(__file__).parent / "data"
SPM_VOCAB = 512


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-piece BPE SentencePiece model with Llama-2's settings (byte fallback, unk 0, bos 1,
    eos 2, digits split, no whitespace folding), trained on `data/persuasion.txt` (~0.1 s)."""
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(DATA / "persuasion.txt"),
        model_prefix=str(prefix),
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tokenizer(spm_model: Path):
    from mlx_openelm.tokenizer import Tokenizer

    return Tokenizer(spm_model)


def tiny_args(**overrides):
    from mlx_openelm.config import ModelArgs

    params = dict(
        num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=SPM_VOCAB,
        ffn_dim_divisor=32, max_context_length=512,
    )  # fmt: skip
    return ModelArgs(**{**params, **overrides})


def tiny_model(seed: int = 0, *, never_eos: bool = False, **overrides):
    """A random tiny `Model` with logits of about unit size (embeddings scaled by dim^-1/2).

    `never_eos` zeroes EOS's (tied) embedding row: its logit is 0, so greedy never picks it.
    """
    from mlx_openelm.model import Model

    mx.random.seed(seed)
    model = Model(tiny_args(**overrides))
    emb = model.transformer.token_embeddings
    emb.weight = emb.weight * model.args.model_dim**-0.5
    if never_eos:
        emb.weight = emb.weight.at[2].multiply(0.0)
    mx.eval(model.parameters())
    return model


def make_model_folder(
    folder: Path, spm_path: Path | None, seed: int = 0, *, never_eos: bool = False, **overrides
) -> Path:
    """An MLX model folder (`save_model`) with the tiny tokenizer (or none)."""
    from mlx_openelm.loading import save_model
    from mlx_openelm.tokenizer import CHAT_TEMPLATE, write_tokenizer_files

    model = tiny_model(seed, never_eos=never_eos, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, model, model.args)
    if spm_path is not None:
        # An Instruct-style folder: the chat tests need its template.
        write_tokenizer_files(
            folder, spm_path, model.args.max_context_length, chat_template=CHAT_TEMPLATE
        )
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, spm_model: Path) -> Path:
    """A tiny model folder with tokenizer: context 512; EOS never wins greedy decoding."""
    return make_model_folder(tmp_path_factory.mktemp("tiny") / "m", spm_model, never_eos=True)
