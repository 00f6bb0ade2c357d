"""Pretraining: text data, a short run that learns, resume, export round trip, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import DATA, SPM_VOCAB, make_model_folder, tiny_model
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.train.checkpoint import CHECKPOINTS
from mlx_openelm.train.pretrain import (
    PRETRAIN_DEFAULTS,
    build_config,
    ngram_baselines,
    parse_overrides,
    pretrain,
)
from mlx_openelm.train.text_data import encode_documents, pack, read_documents, split_documents
from mlx_openelm.train.trainer import TrainingArgs, make_optimizer, masked_loss

TINY = dict(num_transformer_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=32)
# Paragraphs of the shipped Persuasion excerpt are the documents.
SEP = "\n\n"


def run(data: Path, out: Path, spm_model: Path, **kw):
    opts = dict(
        preset="270M", overrides=TINY, tokenizer=spm_model, doc_separator=SEP, seq_length=32,
        val_fraction=0.05, batch_size=8, iters=30, warmup_steps=3, learning_rate=3e-3,
        steps_per_eval=0, steps_per_save=10, progress=False,
    )  # fmt: skip
    return pretrain(data, out, **{**opts, **kw})


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    shutil.copy(DATA / "persuasion.txt", folder / "persuasion.txt")
    return folder


def test_documents_packing_and_split(text, tokenizer):
    docs = read_documents(text, SEP)
    assert len(docs) > 100 and all(d == d.strip() and d for d in docs)
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == round(len(docs) * 0.1) and not set(val) & set(train) - {""}
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    stream, stats = encode_documents(train[:3], tokenizer)
    assert stream[0] == 1 and stream[-1] == 2 and (stream == 1).sum() == 3 == (stream == 2).sum()
    _, stats = encode_documents(docs, tokenizer, min_chars=200)
    assert stats["dropped"] == sum(len(d) < 200 for d in docs)
    chunks = pack(np.arange(10, dtype=np.int32), 3)
    # Overlapping by one: every token after the first is a target exactly once.
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_jsonl_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_documents(tmp_path) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1: expected"):
        read_documents(tmp_path)


def test_short_run_learns_and_resumes_identically(text, spm_model, tmp_path):
    full = run(text, tmp_path / "full", spm_model, steps_per_eval=15, val_batches=-1)
    lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert (
        len(vals) == 3 and vals[-1] < vals[0] - 0.5 and full["val_loss"] == pytest.approx(vals[-1])
    )
    assert {"config.json", "tokenizer.model", "model.safetensors"} <= {
        p.name for p in (tmp_path / "full").iterdir()
    }

    # Interrupted after step 20: drop the last checkpoint and resume from step 20.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / CHECKPOINTS / "step_0000030")
    run(text, part, spm_model, steps_per_eval=15, val_batches=-1, resume=True)
    a = mx.load(str(tmp_path / "full/model.safetensors"))
    b = mx.load(str(part / "model.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_export_converts_back_with_same_logits(text, spm_model, tmp_path):
    from mlx_openelm.convert import convert

    from mlx_openelm.loading import load

    run(text, tmp_path / "run", spm_model, iters=4, warmup_steps=1, export_hf_path=tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", dtype="float32")
    ours, tok, _ = load(tmp_path / "run")
    back, tok2, _ = load(tmp_path / "mlx")
    ids = mx.array([tok.encode("Anne Elliot was walking")])
    assert mx.allclose(ours(ids), back(ids), atol=1e-5).item()
    assert tok2 is not None and tok2.vocab_size == SPM_VOCAB


def test_average_last_checkpoints_and_own_tokenizer(text, spm_model, tmp_path):
    out = run(text, tmp_path / "run", None, iters=6, warmup_steps=1, steps_per_save=2,
              average_last=3, keep_checkpoints=1, tokenizer_vocab_size=400)  # fmt: skip
    # No tokenizer given: one was trained on the data, and the vocabulary follows it.
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["vocab_size"] == 400 and (tmp_path / "run/tokenizer.model").is_file()
    assert out["averaged_checkpoints"] == 3
    steps = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir())
    assert steps == ["step_0000002", "step_0000004", "step_0000006"]
    w = [mx.load(str(tmp_path / "run" / CHECKPOINTS / s / "model.safetensors")) for s in steps]
    avg = mx.load(str(tmp_path / "run/model.safetensors"))
    k = "transformer.layers.0.attn.qkv_proj.weight"
    assert mx.allclose(avg[k], (w[0][k] + w[1][k] + w[2][k]) / 3, atol=1e-6).item()


def test_weight_decay_spares_norm_gains():
    # CoreNet's no_decay_bn_filter_bias (nanoGPT's configure_optimizers): 1-D parameters keep.
    model = tiny_model()
    before = dict(tree_flatten(model.parameters()))
    opt = make_optimizer(TrainingArgs(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, iters=9))
    opt.update(model, tree_map(mx.zeros_like, model.parameters()))  # only the decay moves
    after = dict(tree_flatten(model.parameters()))
    for k, w in before.items():
        want = w if w.ndim == 1 else w * (1 - 0.1 * 0.5)
        assert mx.allclose(after[k], want, atol=1e-6).item(), k
    assert any(w.ndim == 1 for w in before.values())


def test_z_loss_adds_the_squared_log_normaliser_of_target_positions():
    model = tiny_model()
    inputs = mx.array([[1, 5, 7, 9], [1, 4, 4, 2]])
    targets, mask = mx.array([[5, 7, 9, 2], [4, 4, 2, 0]]), mx.array([[1, 1, 1, 1], [0, 1, 1, 0]])
    ce, n = masked_loss(model, inputs, targets, mask)
    total, n2 = masked_loss(model, inputs, targets, mask, z_loss=1e-2)
    lse = mx.logsumexp(model(inputs).astype(mx.float32), axis=-1)
    z = (lse**2 * mask).sum()
    assert n.item() == n2.item() == 6
    assert total.item() == pytest.approx(ce.item() + 1e-2 * z.item(), rel=1e-5)
    assert PRETRAIN_DEFAULTS["z_loss"] == 1e-4  # CoreNet's z_loss_eps, on in its OpenELM configs


def test_ngram_baselines_order():
    rng = np.random.default_rng(0)
    # A Markov chain: the bigram model must beat the unigram one.
    trans = rng.dirichlet(np.full(20, 0.1), size=20)
    seq = [0]
    for _ in range(20000):
        seq.append(rng.choice(20, p=trans[seq[-1]]))
    seq = np.array(seq)
    b = ngram_baselines(seq[:15000], seq[15000:], 20)
    assert 1 < b["bigram_ppl"] < b["unigram_ppl"] <= 20


def test_config_overrides():
    assert parse_overrides(["model_dim=256", "qkv_multipliers=[0.25, 0.5]"]) == {
        "model_dim": 256,
        "qkv_multipliers": [0.25, 0.5],
    }
    with pytest.raises(ValueError, match="not an OpenELM config field"):
        parse_overrides(["model_dims=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["model_dim"])
    args = build_config(preset="270M", overrides=TINY, vocab_size=300)
    assert args.vocab_size == 300 and args.num_transformer_layers == 2
    with pytest.raises(ValueError, match="exactly one"):
        build_config()


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "no .txt or .jsonl"),
        ("binary", "looks binary"),
        ("heads", "can't share"),
        ("vocab", "smaller than the tokenizer"),
    ],
)
def test_bad_input_fails_before_training(case, match, text, spm_model, tmp_path):
    data, overrides = text, dict(TINY)
    if case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "binary":
        data = tmp_path / "bin"
        data.mkdir()
        (data / "x.txt").write_bytes(bytes(range(256)) * 4)
    elif case == "heads":
        overrides.update(num_query_heads=[4, 4], num_kv_heads=[3, 3])
    else:
        overrides.update(vocab_size=100)
    with pytest.raises(ValueError, match=match):
        run(data, tmp_path / "out", spm_model, overrides=overrides)
    assert not (tmp_path / "out").exists()


def test_out_holding_a_model_is_refused_unless_overwrite(text, spm_model, tmp_path):
    model = make_model_folder(tmp_path / "model", spm_model)
    (model / "metrics.jsonl").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(FileExistsError, match="not a pretraining run.*--overwrite"):
        run(text, model, spm_model, iters=2, warmup_steps=0)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    with pytest.raises(ValueError, match="--resume or --overwrite"):
        run(text, model, spm_model, iters=2, warmup_steps=0, resume=True, overwrite=True)
    run(text, model, spm_model, iters=2, warmup_steps=0, overwrite=True)
    lines = (model / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2]  # the old file is gone
    # A finished run is refused too (it needs --resume), and --overwrite starts it again.
    with pytest.raises(FileExistsError, match="already holds a training run"):
        run(text, model, spm_model, iters=2, warmup_steps=0)
    run(text, model, spm_model, iters=4, warmup_steps=0, steps_per_save=2, overwrite=True)
    steps = sorted(p.name for p in (model / CHECKPOINTS).iterdir())
    assert steps == ["step_0000002", "step_0000004"]


def test_cli_reports_bad_config(text, spm_model, tmp_path):
    result = CliRunner().invoke(
        app,
        ["pretrain", "--data", str(text), "--out", str(tmp_path / "o"), "--preset", "270M",
         "--set", "num_query_heads=[4,4]", "--set",
         "num_kv_heads=[3,3]", "--set", "num_transformer_layers=2",
         "--tokenizer", str(spm_model), "--doc-separator", "\\n\\n"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "error:" in result.output and "can't share" in result.output
    assert not (tmp_path / "o").exists()


def test_train_tokenizer_cli(text, tmp_path):
    out = tmp_path / "tok.model"
    result = CliRunner().invoke(
        app, ["train-tokenizer", "--data", str(text), "--out", str(out), "--vocab-size", "400"]
    )
    assert result.exit_code == 0, result.output
    from mlx_openelm.tokenizer import Tokenizer

    tok = Tokenizer(out)
    assert tok.vocab_size == 400 and (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    s = "Captain Wentworth — £5, 1814.\n\nAnne."
    assert tok.decode(tok.encode(s)) == s  # byte fallback and no whitespace folding
    result = CliRunner().invoke(app, ["train-tokenizer", "--data", str(text), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output


# ---- the shipped demo model (demo/README.md)

DEMO = Path(__file__).parents[1] / "demo"


def test_demo_converts_generates_and_beats_unigram(tmp_path):
    from mlx_openelm.convert import convert

    from mlx_openelm.generation import generate
    from mlx_openelm.loading import load
    from mlx_openelm.train.trainer import evaluate

    convert(DEMO / "OpenELM-austen", tmp_path / "m", dtype="float32")
    model, tok, _ = load(tmp_path / "m")
    docs = read_documents(DEMO / "data" / "austen.jsonl")
    train, val = split_documents(docs, 0.02, seed=0)  # the demo run's split
    text = generate(model, tok, "It is a truth universally acknowledged", max_tokens=24)
    words = re.findall(r"[a-z]+", text.lower())
    known = set(re.findall(r"[a-z]+", " ".join(train).lower()))
    # English words, and not one word looping (what an undertrained model does).
    assert len(words) >= 8 and len(set(words)) >= 6, text
    assert sum(w in known for w in words) >= 0.9 * len(words), text

    # A fixed held-out slice: the first 4 x 256 tokens of the validation chapters.
    val_tokens = encode_documents(val, tok)[0][: 4 * 256 + 1]
    ppl = float(np.exp(evaluate(model, pack(val_tokens, 256), batch_size=4)))
    train_tokens = encode_documents(train, tok)[0]
    baselines = ngram_baselines(train_tokens, val_tokens, tok.vocab_size)
    assert ppl < baselines["unigram_ppl"], (ppl, baselines)
