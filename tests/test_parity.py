"""Parity: checkpoints written by the PyTorch reference, converted by the CLI, give the same logits.

Every input format (HF fp32 safetensors, HF bf16 sharded safetensors, pytorch_model.bin, CoreNet
.pt + YAML), scaled-down models that keep each preset's per-layer pattern, and (slow) the full 270M.
Whole prompt and token by token through the KV cache, fp32, max abs diff <= 1e-4.
"""

from __future__ import annotations

import mlx.core as mx  # noqa: I001  (after mlx_openelm, which picks the BLAS)
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_openelm

torch = pytest.importorskip(
    "torch", reason="the PyTorch reference needs torch (pip install .[reference])"
)
import torch_checkpoints  # noqa: E402
from mlx_openelm.bench import reference  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mlx_openelm.cli import app  # noqa: E402
from mlx_openelm.config import ModelArgs, preset  # noqa: E402

TOL = 1e-4
# Each preset shrunk by a common factor on model_dim, head_dim and the FFN divisor, which keeps its
# per-layer head counts and FFN multipliers (checked below).
SCALED = {
    "270M": dict(model_dim=160, head_dim=8, ffn_dim_divisor=32),
    "450M": dict(model_dim=192, head_dim=8, ffn_dim_divisor=32),
    "1_1B": dict(model_dim=256, head_dim=8, ffn_dim_divisor=32),
    "3B": dict(model_dim=192, head_dim=8, ffn_dim_divisor=16),
}


def scaled_config(name: str, vocab_size: int = 256) -> dict:
    args = preset(name, vocab_size=vocab_size, **SCALED[name])
    assert args.num_query_heads == preset(name).num_query_heads  # same layer-wise pattern
    return args.to_dict()


def convert(source, out, *extra) -> None:
    result = CliRunner().invoke(
        app, ["convert", str(source), str(out), "--dtype", "float32", *extra]
    )
    assert result.exit_code == 0, result.output


def max_diffs(ref, folder, tokens: list[int]) -> tuple[float, float]:
    """Max abs logit diff for the whole prompt, and token by token through both KV caches."""
    model, _, _ = mlx_openelm.load(folder)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).float().numpy()
    got = np.array(model(mx.array([tokens])))
    full = float(np.abs(got - want).max())

    cache, ref_cache = make_prompt_cache(model), reference.KVCache()
    step = 0.0
    with torch.no_grad():
        for i, t in enumerate(tokens):
            got_t = np.array(model(mx.array([[t]]), cache=cache))[0, -1]
            want_t = ref(torch.tensor([[t]]), cache=ref_cache)[0, -1].float().numpy()
            assert np.abs(want_t - want[0, i]).max() < TOL  # the reference agrees with itself
            step = max(step, float(np.abs(got_t - want_t).max()))
    return full, step


def prompt(vocab: int, n: int = 24, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def check(ref, folder, vocab) -> None:
    tokens = prompt(vocab)
    full, step = max_diffs(ref, folder, tokens)
    print(f"{folder.parent.name}: max abs logit diff, full {full:.2e}, cached {step:.2e}")
    assert full <= TOL and step <= TOL


@pytest.mark.parametrize("name", SCALED)
def test_hf_fp32_safetensors(tmp_path, name):
    ref = torch_checkpoints.random_model(scaled_config(name), seed=1)
    torch_checkpoints.save_hf(ref, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx")
    check(ref, tmp_path / "mlx", 256)


def test_hf_bf16_sharded(tmp_path):
    ref = torch_checkpoints.random_model(scaled_config("450M"), seed=2)
    torch_checkpoints.save_hf(ref, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=400_000)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) >= 2
    convert(tmp_path / "hf", tmp_path / "mlx")
    # Compare with the reference holding the same (bf16-rounded) weights, computing in fp32.
    ref = reference.OpenELM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    check(ref, tmp_path / "mlx", 256)


def test_pytorch_model_bin(tmp_path):
    ref = torch_checkpoints.random_model(scaled_config("1_1B"), seed=3)
    torch_checkpoints.save_hf(ref, tmp_path / "hf", fmt="bin")
    assert (tmp_path / "hf" / "pytorch_model.bin").exists()
    convert(tmp_path / "hf", tmp_path / "mlx")
    check(ref, tmp_path / "mlx", 256)


def test_corenet_pt_and_yaml(tmp_path):
    ref = torch_checkpoints.random_model(scaled_config("3B"), seed=4)
    torch_checkpoints.save_corenet(
        ref, tmp_path / "model.pt", tmp_path / "config.yaml", padded_vocab=384
    )
    convert(tmp_path / "model.pt", tmp_path / "mlx", "--config-yaml", str(tmp_path / "config.yaml"))
    assert ModelArgs.from_file(tmp_path / "mlx" / "config.json").vocab_size == 256
    check(ref, tmp_path / "mlx", 256)


def test_untied_lm_head(tmp_path):
    config = {**scaled_config("270M"), "share_input_output_layers": False}
    ref = torch_checkpoints.random_model(config, seed=5)
    torch_checkpoints.save_hf(ref, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx")
    check(ref, tmp_path / "mlx", 256)


@pytest.mark.slow
def test_full_size_270m(tmp_path):
    ref = torch_checkpoints.random_model(preset("270M").to_dict(), seed=6)
    torch_checkpoints.save_hf(ref, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", "--no-tokenizer")  # 32000 rows: no Hub lookup
    del ref  # keep one copy in memory at a time
    ref = reference.OpenELM.from_pretrained(tmp_path / "hf")
    tokens = prompt(32000, n=12)
    full, step = max_diffs(ref, tmp_path / "mlx", tokens)
    print(f"full-size 270M: max abs logit diff, full {full:.2e}, cached {step:.2e}")
    assert full <= TOL and step <= TOL
