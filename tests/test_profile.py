"""The profiler behind the benchmark's explanations: its breakdown must account for the pass."""

from __future__ import annotations

import mlx.core as mx  # noqa: I001  (conftest imports mlx_openelm first, which picks the BLAS)
import pytest
from mlx_openelm.bench import profile

from mlx_openelm import kernels
from mlx_openelm.config import ModelArgs

TINY = dict(num_transformer_layers=3, model_dim=64, head_dim=16, vocab_size=300,
            ffn_dim_divisor=16, max_context_length=128)  # fmt: skip


def test_breakdown_covers_every_kind_and_adds_up() -> None:
    report = profile.profile(ModelArgs(**TINY), prompt_tokens=24, trials=1)
    for phase in ("prefill", "decode"):
        r = report[phase]
        kinds = {"matmul", "attention", "RMSNorm"}
        if not kernels.available():  # else RoPE runs inside the attention over the KV cache
            kinds.add("RoPE")
        if phase == "prefill":  # a decoding product runs the gate in its kernel
            kinds.add("SiLU gate")
        assert kinds <= r.keys(), r
        assert all(r[k] > 0 for k in kinds | {"total", "synced total"}), r
        parts = sum(v for k, v in r.items() if k not in ("total", "synced total", "other"))
        assert parts <= r["synced total"] * 1.001 and r["other"] >= -1e-6
    w = report["weight_stream"]
    assert w["bytes"] == sum(p.nbytes for p in _weights(TINY))
    assert w["bytes_per_s"].keys() == ({"BLAS", "kernels"} if kernels.available() else {"BLAS"})
    assert all(v > 0 for v in w["bytes_per_s"].values())
    assert {"mlx", "numpy"} <= report["exp_ns_per_element"].keys()


def test_patches_are_undone() -> None:
    before = (kernels.linear, kernels.silu_gate, kernels.attention)
    totals: dict = {}
    try:
        with profile.timed_ops(totals):
            assert kernels.linear is not before[0]
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert (kernels.linear, kernels.silu_gate, kernels.attention) == before


def _weights(shape: dict | ModelArgs, q_bits: int | None = None) -> list[mx.array]:
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_openelm.model import Model

    model = Model(shape if isinstance(shape, ModelArgs) else ModelArgs(**shape))
    if q_bits:
        nn.quantize(model, group_size=64, bits=q_bits)
    return [p for _, p in tree_flatten(model.parameters()) if p.ndim == 2]


@pytest.mark.slow  # a fresh interpreter per row, PyTorch among them
def test_train_speed_times_the_trainer_against_pytorch(tmp_path) -> None:
    import json

    from mlx_openelm.bench import train_speed

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    report = train_speed.main([
        "--config", str(config), "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
        "--trials", "1", "--json", str(tmp_path / "r.json"),
    ])  # fmt: skip
    assert report["tokens_per_sec"].keys() == train_speed.ROWS.keys()
    assert all(v > 0 for v in report["tokens_per_sec"].values())
    assert json.loads((tmp_path / "r.json").read_text())["batch"] == 2


def test_quantized_weight_stream_counts_the_packed_weights() -> None:
    args = ModelArgs(**{**TINY, "model_dim": 128, "ffn_dim_divisor": 64})
    report = profile.profile(args, prompt_tokens=8, trials=1, q_bits=4)
    w = report["weight_stream"]
    assert w["bytes"] == sum(p.nbytes for p in _weights(args, q_bits=4))
    assert w["bytes"] < sum(p.nbytes for p in _weights(args)) / 4  # 4 bits and the scales
    expected = {"MLX quantized", "kernels"} if kernels.available() else {"MLX quantized"}
    assert w["bytes_per_s"].keys() == expected
