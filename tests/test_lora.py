"""LoRA/DoRA fine-tuning: fresh adapters are a no-op, training learns, fuse/export keep the logits,
resume is exact, bad data fails early and writes nothing."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx  # noqa: I001  (conftest imports mlx_openelm first, which picks the BLAS)
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model_folder, tiny_model
from mlx.utils import tree_flatten, tree_unflatten
from typer.testing import CliRunner

import mlx_openelm
from mlx_openelm.adapters import ADAPTER_LEAVES, adapter_config, apply_lora, fuse_adapters
from mlx_openelm.chat_template import folder_template
from mlx_openelm.cli import app
from mlx_openelm.loading import save_model
from mlx_openelm.train import lora as lora_mod
from mlx_openelm.train import trainer
from mlx_openelm.train.data import load_data_folder, tokenize
from mlx_openelm.train.lora import fuse, lora
from mlx_openelm.train.trainer import TrainingArgs, make_schedule, train

DATA = Path(__file__).parent / "data" / "lora"
TOKENS = mx.array([[1, 45, 300, 7, 99, 12, 250, 3, 8, 400, 77, 2]])
# A quick recipe for a tiny random model: a high LR, few steps.
QUICK = dict(rank=8, alpha=16, batch_size=8, learning_rate=1e-2, warmup_steps=3, progress=False)


def logits(model: nn.Module, tokens: mx.array = TOKENS) -> np.ndarray:
    return np.array(model(tokens).astype(mx.float32))


def adapter_weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, spm_model) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("lora") / "base", spm_model, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_folder) -> Path:
    """30 LoRA steps on the shipped data, through the CLI."""
    out = tmp_path_factory.mktemp("lora") / "adapters"
    result = CliRunner().invoke(
        app,
        ["lora", "--model", str(base_folder), "--data", str(DATA), "--adapter-path", str(out),
         "--rank", "8", "--alpha", "16", "--iters", "30", "--batch-size", "8",
         "--learning-rate", "1e-2", "--warmup-steps", "3", "--steps-per-eval", "15",
         "--steps-per-report", "5", "--steps-per-save", "15"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


# ---- adapters


@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_keeps_logits(dora):
    model = tiny_model(seed=2)
    want = logits(model)
    apply_lora(model, adapter_config(len(model.layers), dora=dora, rank=4, alpha=8))
    model.eval()
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert ({"DoRALinear", "DoRAEmbedding"} if dora else {"LoRALinear", "LoRAEmbedding"}) <= kinds
    np.testing.assert_allclose(logits(model), want, atol=1e-5, rtol=0)
    if not dora:
        assert np.array_equal(logits(model), want)  # B = 0: not even rounding changes


@pytest.mark.parametrize("dora", [False, True])
def test_fuse_adapters_in_memory(dora):
    model = tiny_model(seed=2)
    base = logits(model)
    apply_lora(model, adapter_config(len(model.layers), dora=dora, rank=4, alpha=8))
    model.eval()
    # Random non-zero updates (and magnitudes, for DoRA) so fusing has something to merge.
    rng = np.random.default_rng(0)
    noise = [
        (k, v + mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith((".lora_b", ".m"))
    ]
    model.update(tree_unflatten(noise))
    want = logits(model)
    assert np.abs(want - base).max() > 0.05
    fused = fuse_adapters(model)
    assert not any(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(logits(fused), want, atol=1e-4, rtol=0)


def test_only_adapters_train_and_scale_is_alpha_over_rank():
    model = tiny_model(seed=2)
    config = adapter_config(len(model.layers), dora=True, rank=32, alpha=32)
    assert config["lora_parameters"]["scale"] == 1.0
    assert adapter_config(2, rank=8, alpha=16)["lora_parameters"]["scale"] == 2.0
    apply_lora(model, config)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.rsplit(".", 1)[-1] in ADAPTER_LEAVES for k in names)
    adapted = {k.rsplit(".", 1)[0] for k in names}
    want = {"transformer.token_embeddings"} | {
        f"transformer.layers.{i}.{m}"
        for i in range(2)
        for m in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")
    }
    assert adapted == want  # the paper's five targets in every block; norms stay frozen
    assert model.transformer.layers[0].attn.qkv_proj.scale == 1.0
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        adapter_config(2, targets=["q_proj"])
    with pytest.raises(ValueError, match="ties it to token_embeddings"):
        apply_lora(tiny_model(), adapter_config(2, targets=["lm_head"]))


def test_schedule_warms_up_then_decays_to_ten_percent():
    args = TrainingArgs(iters=100, warmup_steps=10, learning_rate=1e-3)
    lr = [make_schedule(args)(mx.array(s)).item() for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3) and lr[99] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:], strict=False))
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingArgs(iters=10, warmup_steps=10)


# ---- training through the CLI


def test_training_lowers_train_and_val_loss(trained):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    print(
        f"train loss {train_loss[0]:.2f} -> {train_loss[-1]:.2f}; val {val[0]:.2f} -> {val[-1]:.2f}"
    )
    assert len(train_loss) == 6 and len(val) == 3  # steps 5..30; val at 0, 15, 30
    # Frozen random base, rank 8: more than 1.5 nats (a 4.5x lower perplexity) in 30 steps.
    assert train_loss[-1] < train_loss[0] - 1.5
    assert val[-1] < val[0] - 1.5 and val[-1] < val[1]
    report = next(r for r in records if "train_loss" in r)
    assert {"step", "learning_rate", "tokens_per_sec", "peak_memory_bytes"} <= set(report)
    assert report["tokens_per_sec"] > 0
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    assert (trained / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == [
        "step_0000015",
        "step_0000030",
    ]


def test_fuse_and_export_hf_keep_the_logits(trained, base_folder, tmp_path):
    adapted, _, _ = mlx_openelm.load(base_folder, adapter_path=trained)
    base, _, _ = mlx_openelm.load(base_folder)
    want = logits(adapted)
    assert np.abs(want - logits(base)).max() > 0.1  # the adapters do change the model

    result = CliRunner().invoke(
        app,
        ["fuse", "--model", str(base_folder), "--adapter-path", str(trained),
         "--out", str(tmp_path / "fused"), "--export-hf", str(tmp_path / "hf"),
         "--hf-dtype", "float32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fused, tok, _ = mlx_openelm.load(tmp_path / "fused")
    assert tok is not None and not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    # The base folder's chat template (or its absence) carries over to both outputs.
    assert folder_template(base_folder) is not None
    assert folder_template(tmp_path / "fused") == folder_template(base_folder)
    assert folder_template(tmp_path / "hf") == folder_template(base_folder)
    np.testing.assert_allclose(logits(fused), want, atol=2e-4, rtol=0)

    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["model_type"] == "openelm" and hf["torch_dtype"] == "float32"
    torch = pytest.importorskip("torch")
    from mlx_openelm.bench.reference import OpenELM

    ref = OpenELM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = ref(torch.tensor(np.array(TOKENS), dtype=torch.long)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_adapters_load_in_mlx_lm(trained, base_folder):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    theirs, _ = load_model(base_folder)  # mlx-lm's own openelm model
    load_adapters(theirs, str(trained))
    theirs.eval()
    ours, _, _ = mlx_openelm.load(base_folder, adapter_path=trained)
    np.testing.assert_allclose(logits(theirs), logits(ours), atol=1e-4, rtol=0)


def test_existing_adapters_need_resume(trained, base_folder):
    with pytest.raises(FileExistsError, match="pass --resume"):
        lora(base_folder, DATA, trained, iters=30, **QUICK)


def test_a_short_run_warms_up_for_a_share_of_it(base_folder, tmp_path):
    # No --warmup-steps: 10% of the run (at most 100), said in the opening line.
    opts = ["lora", "--model", str(base_folder), "--data", str(DATA), "--rank", "4",
            "--batch-size", "8", "--steps-per-eval", "0"]  # fmt: skip
    r = CliRunner().invoke(app, [*opts, "--iters", "30", "--adapter-path", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "30 steps, warm-up 3 (10% of the run)" in r.output
    saved = json.loads((tmp_path / "a/adapter_config.json").read_text())["training"]
    assert saved["warmup_steps"] == 3
    r = CliRunner().invoke(app, [*opts, "--epochs", "0.5", "--adapter-path", str(tmp_path / "b")])
    assert r.exit_code == 0 and "10 steps, warm-up 1 (10% of the run)" in r.output, r.output
    # An explicit warm-up is checked against the run's length.
    r = CliRunner().invoke(app, [*opts, "--iters", "30", "--warmup-steps", "40",
                                 "--adapter-path", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 1 and "warmup_steps (40) must be below iters (30)" in r.output


def test_a_custom_chat_template_trains_chats_and_fuses_alike(base_folder, tmp_path):
    from mlx_openelm.chat_template import template_for_chat

    custom = tmp_path / "custom.jinja"
    custom.write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    adapters = tmp_path / "adapters"
    r = CliRunner().invoke(
        app,
        ["lora", "--model", str(base_folder), "--data", str(DATA), "--rank", "4", "--iters", "2",
         "--batch-size", "8", "--steps-per-eval", "0", "--adapter-path", str(adapters),
         "--chat-template", str(custom)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    # chat and generate --chat with these adapters format turns as training did.
    assert template_for_chat(str(base_folder), base_folder, None, adapters) == (
        custom.read_text(),
        "the adapters' training",
    )
    assert template_for_chat(str(base_folder), base_folder, None)[0] != custom.read_text()
    r = CliRunner().invoke(
        app,
        ["fuse", "--model", str(base_folder), "--adapter-path", str(adapters),
         "--out", str(tmp_path / "fused")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert folder_template(tmp_path / "fused") == custom.read_text()


def test_loading_with_adapters_imports_no_training_code(trained, base_folder):
    # Inference stays light: no trainer, watchdog, checkpoints or rich progress bars.
    script = (
        "import sys, mlx_openelm; from mlx_openelm.loading import load; "
        f"load({str(base_folder)!r}, adapter_path={str(trained)!r}); "
        "print([m for m in sys.modules if m.startswith('mlx_openelm.train')])"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ---- resume and Ctrl-C


def test_interrupt_then_resume_equals_an_uninterrupted_run(base_folder, tmp_path, monkeypatch):
    # Dropout and gradient accumulation on, so the RNG and the data position must resume exactly.
    opts = dict(QUICK, dropout=0.1, iters=6, batch_size=4, grad_accumulation_steps=2,
                steps_per_save=2, steps_per_eval=3, steps_per_report=1, seed=5)  # fmt: skip
    lora(base_folder, DATA, tmp_path / "full", **opts)

    def interrupt_at(step, info, at=3):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    with monkeypatch.context() as m:
        m.setattr(lora_mod, "train", functools.partial(trainer.train, on_step=interrupt_at))
        with pytest.raises(KeyboardInterrupt):
            lora(base_folder, DATA, tmp_path / "split", **opts)
    assert (tmp_path / "split" / "checkpoints" / "step_0000003").is_dir()  # saved on Ctrl-C
    lora(base_folder, DATA, tmp_path / "split", resume=True, **opts)

    full, split = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        assert np.array_equal(full[k], split[k]), k  # bit for bit
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("full", "split")]
    strip = [[{k: v for k, v in json.loads(x).items() if k in ("step", "train_loss", "val_loss")}
              for x in m.splitlines()] for m in metrics]  # fmt: skip
    assert strip[0] == strip[1]  # the log is continued, not duplicated
    with pytest.raises(ValueError, match="changed: learning_rate"):
        lora(base_folder, DATA, tmp_path / "split", resume=True, **{**opts, "learning_rate": 1e-3})


# ---- the loop's invariants, on pre-tokenised data


@pytest.fixture(scope="module")
def train_set(tokenizer):
    return tokenize(load_data_folder(DATA)["train"], tokenizer, 128)[0]


def _train_once(train_set, out: Path, dropout: float = 0.0, **kw) -> dict[str, np.ndarray]:
    model = tiny_model(seed=3)
    mx.random.seed(0)
    apply_lora(model, adapter_config(2, rank=4, alpha=8, dropout=dropout))
    args = TrainingArgs(
        **{"iters": 3, "learning_rate": 1e-2, "warmup_steps": 1, "steps_per_eval": 0, **kw}
    )
    train(model, train_set, None, out, args, progress=False)
    return adapter_weights(out)


def test_accumulation_equals_one_big_batch(train_set, tmp_path):
    big = _train_once(train_set, tmp_path / "a", batch_size=8)
    split = _train_once(train_set, tmp_path / "b", batch_size=4, grad_accumulation_steps=2)
    for k in big:
        np.testing.assert_allclose(big[k], split[k], atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_changes_memory_not_results(train_set, tmp_path):
    # With dropout on: the recomputed blocks must see the forward pass's dropout noise.
    block = type(tiny_model().layers[0])
    call, dropout_call = block.__call__, nn.Dropout.__call__
    plain = _train_once(train_set, tmp_path / "a", dropout=0.3, batch_size=4)
    ckpt = _train_once(train_set, tmp_path / "b", dropout=0.3, batch_size=4, grad_checkpoint=True)
    assert block.__call__ is call and nn.Dropout.__call__ is dropout_call  # patches undone
    no_dropout = _train_once(train_set, tmp_path / "c", batch_size=4)
    for k in plain:
        assert np.array_equal(plain[k], ckpt[k]), k
    assert any(not np.allclose(plain[k], no_dropout[k]) for k in plain)  # dropout was on


# ---- QLoRA


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_trains_and_fuses(dora, spm_model, tmp_path):
    model = tiny_model(seed=4)
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path / "q"
    folder.mkdir()
    save_model(folder, model, model.args, quantization={"group_size": 32, "bits": 4})
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    out = tmp_path / "adapters"
    result = lora(folder, DATA, out, dora=dora, iters=10, steps_per_eval=10, steps_per_report=5,
                  **QUICK)  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    print(f"{'dora' if dora else 'lora'} on 4-bit: val {val[0]:.2f} -> {val[-1]:.2f}")
    assert val[-1] < val[0] - 0.4, val

    assert result["val_loss"] == pytest.approx(val[-1])

    adapted, _, _ = mlx_openelm.load(folder, adapter_path=out)
    assert isinstance(adapted.layers[0].attn.qkv_proj.linear, nn.QuantizedLinear)
    want = logits(adapted)
    fuse(folder, out, tmp_path / "fused", export_hf_path=tmp_path / "hf")
    fused, _, _ = mlx_openelm.load(tmp_path / "fused")  # re-quantised: close, not equal
    assert isinstance(fused.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert np.abs(logits(fused) - want).max() < 0.5
    # The Hugging Face export fuses into the float weights: the adapted model's logits.
    hf, _, _ = mlx_openelm.load(_convert_hf(tmp_path / "hf", tmp_path / "back"))
    np.testing.assert_allclose(logits(hf), want, atol=1e-4, rtol=0)


def _convert_hf(hf: Path, out: Path) -> Path:
    result = CliRunner().invoke(app, ["convert", str(hf), str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out


# ---- errors


def test_bad_data_fails_early_and_writes_nothing(base_folder, tmp_path):
    def run(data: Path):
        out = tmp_path / f"out_{data.name}"
        r = CliRunner().invoke(
            app, ["lora", "--model", str(base_folder), "--data", str(data),
                  "--adapter-path", str(out)],
        )  # fmt: skip
        assert r.exit_code == 1 and not out.exists()
        return r.output

    (tmp_path / "empty").mkdir()
    assert "has no train.jsonl" in run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(
        '{"text": "ok"}\n{"text": "ok"}\n{"prompt": "no completion"}\n'
    )
    (bad / "valid.jsonl").write_text('{"text": "ok"}\n')
    out = run(bad)
    assert f"error: {bad / 'train.jsonl'}:3:" in out and "completion" in out
    (bad / "train.jsonl").write_text('{"text": "ok"}\n')
    (bad / "valid.jsonl").write_text("not json\n")
    assert f"{bad / 'valid.jsonl'}:1: not valid JSON" in run(bad)


def test_generate_with_adapter_path_equals_the_fused_model(trained, base_folder, tmp_path):
    fused = tmp_path / "fused"
    runner = CliRunner()
    ok = runner.invoke(app, ["fuse", "--model", str(base_folder), "--adapter-path", str(trained),
                             "--out", str(fused)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    common = ["--prompt", "Anne was", "--max-tokens", "12", "--temp", "0"]

    def text(*args: str) -> str:
        result = runner.invoke(app, ["generate", *args, *common])
        assert result.exit_code == 0, result.output
        return result.stdout

    with_adapters = text("--model", str(base_folder), "--adapter-path", str(trained))
    assert with_adapters == text("--model", str(fused))
    assert with_adapters != text("--model", str(base_folder))  # the adapters change the output
