"""Checkpoints of the real models' sizes: tensors that start past 2 and 4 GiB in their file.

The 1.1B is 4.3 GB in one file and the 3B ~12 GB; the files here are sparse (holes, no disk), laid
out as the savers lay them out, with a few tensors of real values placed past those offsets.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from large_files import write_safetensors, write_torch_zip
from mlx.utils import tree_flatten
from mlx_openelm.convert import convert
from mlx_openelm.convert.readers import read_hf_weights, read_safetensors, read_weights_file

import mlx_openelm
from mlx_openelm.errors import UserError

GiB = 1 << 30
TAIL = np.arange(32, dtype=np.float32).reshape(4, 8) / 7


def _big(gib: float) -> tuple[tuple[int, int], None]:
    return (int(gib * GiB) // 4096, 1024), None  # float32 zeros, a hole


def test_safetensors_tensor_past_4_gib_reads_back(tmp_path):
    path = tmp_path / "model.safetensors"
    starts = write_safetensors(path, {"big": _big(4.25), "tail": ((4, 8), TAIL)})
    assert starts["tail"] > 4 * GiB
    refs = read_safetensors(path)
    assert refs["big"].shape == (int(4.25 * GiB) // 4096, 1024)
    np.testing.assert_array_equal(refs["tail"].read(), TAIL)


def test_safetensors_past_4_gib_still_refused_when_truncated(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"big": _big(4.25), "tail": ((4, 8), TAIL)})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(UserError, match="truncated"):
        read_safetensors(path)


def test_sharded_safetensors_with_shards_past_2_gib(tmp_path):
    weight_map = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        spec = {f"big{i}": _big(2.1), f"tail{i}": ((4, 8), TAIL * i)}
        starts = write_safetensors(tmp_path / name, spec)
        assert starts[f"tail{i}"] > 2 * GiB
        weight_map.update({f"big{i}": name, f"tail{i}": name})
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    refs = read_hf_weights(tmp_path)
    assert set(refs) == set(weight_map)
    np.testing.assert_array_equal(refs["tail2"].read(), TAIL * 2)


@pytest.mark.slow  # reads and CRCs all 4.1 GiB: 8-13 s each on 2 cores
@pytest.mark.parametrize("nest", [None, "model_state_dict"], ids=["pytorch_model.bin", "corenet"])
def test_zip64_torch_checkpoint_past_4_gib(tmp_path, nest):
    path = tmp_path / ("pytorch_model.bin" if nest is None else "model.pt")
    write_torch_zip(path, {"big": _big(4.1), "tail": ((4, 8), TAIL)}, nest=nest)
    assert path.stat().st_size > 4 * GiB
    refs = read_weights_file(path)  # every storage's CRC is checked here, the big one's too
    np.testing.assert_array_equal(refs["tail"].read(), TAIL)
    assert refs["big"].shape == _big(4.1)[0]


@pytest.mark.slow
def test_convert_the_1_1b_size_end_to_end(tmp_path):
    args = mlx_openelm.preset("1_1B")  # 4.3 GB of float32, as Apple's file
    model = mlx_openelm.Model(args)
    rng = np.random.default_rng(0)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    proj = f"transformer.layers.{args.num_transformer_layers - 1}.ffn.proj_2"
    # Values where they can be checked after conversion; the rest is zeros (holes).
    real = {
        k: rng.standard_normal(shapes[k]) for k in ("transformer.norm.weight", f"{proj}.weight")
    }
    src = tmp_path / "hf"
    src.mkdir()
    spec = {k: (s, real.get(k)) for k, s in shapes.items()}
    starts = write_safetensors(src / "model.safetensors", spec)
    assert min(starts[k] for k in real) > 3.9 * GiB  # the old check refused all past 2 GiB
    (src / "config.json").write_text(json.dumps(args.to_dict()))
    out = convert(src, tmp_path / "mlx", dtype="float32", quantize=True, no_tokenizer=True)

    converted, _, _ = mlx_openelm.load(out)
    weights = dict(tree_flatten(converted.parameters()))
    norm = real["transformer.norm.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.array(weights["transformer.norm.weight"]), norm)
    want = mx.quantize(mx.array(real[f"{proj}.weight"].astype(np.float32)), 64, 4)
    for got, exp in zip((weights[f"{proj}.{k}"] for k in ("weight", "scales", "biases")), want):
        assert mx.array_equal(got, exp).item()
