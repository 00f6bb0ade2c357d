"""Layer-wise scaling against the released models' shapes (OPENELM.md's table)."""

import json

import mlx.core as mx  # noqa: F401  (mlx_openelm must be importable next to mlx)
import pytest
from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs, make_divisible, preset
from mlx_openelm.model import Model


def runs(*pairs):
    """(count, run) pairs -> the per-layer list."""
    return [count for count, run in pairs for _ in range(run)]


# size: (layers, model_dim, head_dim, query heads per layer, first ffn_dim, last ffn_dim, params)
TABLE = {
    "270M": (16, 1280, 64, runs((12, 5), (16, 7), (20, 4)), 768, 5120, 271_527_168),
    "450M": (20, 1536, 64, runs((12, 3), (16, 7), (20, 6), (24, 4)), 768, 6144, 457_179_136),
    "1_1B": (
        28,
        2048,
        64,
        runs((16, 3), (20, 7), (24, 8), (28, 6), (32, 4)),
        1024,
        8192,
        1_079_891_456,
    ),
    "3B": (36, 3072, 128, runs((12, 4), (16, 14), (20, 12), (24, 6)), 1536, 12288, 3_036_647_424),
}


@pytest.mark.parametrize("name", TABLE)
def test_presets_match_released_models(name):
    layers, dim, hd, heads, ffn_first, ffn_last, params = TABLE[name]
    args = preset(name)
    assert (args.num_transformer_layers, args.model_dim, args.head_dim) == (layers, dim, hd)
    assert args.num_query_heads == heads
    assert args.num_kv_heads == [h // 4 for h in heads]
    assert args.ffn_dims[0] == ffn_first and args.ffn_dims[-1] == ffn_last
    assert all(f % 256 == 0 for f in args.ffn_dims)
    assert args.ffn_dims == sorted(args.ffn_dims)
    assert args.num_parameters() == params


def test_270m_every_ffn_width():
    assert preset("270M").ffn_dims == [
        768, 1024, 1280, 1536, 1792, 2048, 2560, 2816,
        3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120,
    ]  # fmt: skip


def test_parameter_count_matches_built_model():
    args = ModelArgs(
        num_transformer_layers=5, model_dim=96, head_dim=16, vocab_size=123,
        qkv_multipliers=(0.25, 1.5), ffn_multipliers=(1.0, 3.0), ffn_dim_divisor=32,
        num_gqa_groups=2, share_input_output_layers=False,
    )  # fmt: skip
    count = sum(v.size for _, v in tree_flatten(Model(args).parameters()))
    assert args.num_parameters() == count


def test_preset_names():
    assert preset("apple/OpenELM-450M-Instruct") == preset("450M")
    with pytest.raises(ValueError, match="Unknown OpenELM preset"):
        preset("7B")


def test_make_divisible_never_rounds_down_more_than_ten_percent():
    assert make_divisible(1280 * 0.5, 256) == 768  # 640 -> 512 would lose 20%
    assert make_divisible(100, 8) == 104
    for v in range(1, 5000, 7):
        assert make_divisible(v, 64) >= 0.9 * v


def test_hf_config_forms_agree():
    """A saved HF config (per-layer lists) and a hand-written one (2-element ranges) agree."""
    ranged = {"model_type": "openelm", **preset("270M").to_dict()}
    ranged.update(ffn_multipliers=[0.5, 4.0], qkv_multipliers=[0.5, 1.0])
    del ranged["num_query_heads"], ranged["num_kv_heads"]
    expanded = json.loads(json.dumps(preset("270M").to_dict()))
    assert len(expanded["ffn_multipliers"]) == 16
    a, b = ModelArgs.from_dict(ranged), ModelArgs.from_dict(expanded)
    assert a == b == preset("270M")
    assert ModelArgs.from_dict({**expanded, "unknown_key": 1}) == a


def test_config_round_trips_through_mlx_lm_args():
    from mlx_lm.models.openelm import ModelArgs as MlxLmArgs

    d = preset("450M").to_dict()
    theirs = MlxLmArgs.from_dict(d)
    assert theirs.num_query_heads == d["num_query_heads"]
    assert theirs.ffn_multipliers == d["ffn_multipliers"]


SMALL = {"num_transformer_layers": 2, "model_dim": 64, "head_dim": 16}


@pytest.mark.parametrize(
    "params, message",
    [
        ({**SMALL, "model_type": "llama"}, "not an OpenELM"),
        ({"model_dim": 64, "head_dim": 16}, "missing num_transformer_layers"),
        ({**SMALL, "ffn_multipliers": [1, 2, 3]}, "one value per layer"),
        ({**SMALL, "num_query_heads": [4, 4], "num_kv_heads": [3, 4]}, "can't share"),
        ({**SMALL, "num_transformer_layers": 0}, "positive integer"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_clearly(params, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_dict(params)
