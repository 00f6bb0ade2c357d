"""Random damage to a valid safetensors header, pickle and config.json (seeded): the converter
never shows a traceback, exits 0 or 1, and when it exits 0 the model computes the same logits."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
from hostile import (
    header_bytes,
    logits,
    safetensors_bytes,
    state_pickle,
    tiny_state,
    torch_zip_bytes,
    write_bin,
    write_hf,
)
from typer.testing import CliRunner

from mlx_openelm.cli import app

CONFIG, STATE = tiny_state()
CASES = 100  # per kind: ~300 conversions, most refused in milliseconds
HOSTILE = [
    -1, 0, 1, 3, 2**31, 2**63, 2**70, 1.5, 1e308, float("inf"), float("nan"), "12", "", None,
    True, [], [1, 2], {}, {"a": 1}, "F32", "BF16", "I32",
]  # fmt: skip
NOT_POSITIVE = [v for v in HOSTILE if not (isinstance(v, (int, float)) and v > 0 and v != 1.5)]


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        op = rng.choice(["flip", "insert", "delete", "truncate"])
        if op == "flip":
            data[i] ^= 1 << rng.randrange(8)
        elif op == "insert":
            data[i:i] = bytes([rng.randrange(256)])
        elif op == "delete":
            del data[i]
        else:
            data = data[: max(i, 1)]
    return bytes(data)


def mutate_json(rng: random.Random, obj, floats: tuple[str, ...] = ()):
    """Replace one value somewhere with a hostile one (floats only with non-positive values: a
    different positive eps or rope base is a valid model, with other logits)."""
    obj = json.loads(json.dumps(obj))
    node, key = obj, None
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            break
        node = node[key]
    if key is not None:
        if rng.random() < 0.15 and isinstance(node, dict):
            del node[key]
        else:
            node[key] = rng.choice(NOT_POSITIVE if key in floats else HOSTILE)
    return json.dumps(obj, allow_nan=True)


def run(src, out):
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--no-tokenizer"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and len(lines) == 1, result.stderr
    return result.exit_code


def _floats(folder, names: tuple[str, ...]) -> list:
    config = json.loads((folder / "config.json").read_bytes()) if folder else CONFIG
    return [config.get(k) for k in names]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("ref")
    assert run(write_hf(tmp / "hf", CONFIG, safetensors_bytes(STATE)), tmp / "out") == 0
    return logits(tmp / "out")


@pytest.mark.parametrize("kind", ["safetensors", "pickle", "config"])
def test_random_damage_is_refused_or_harmless(tmp_path, reference, kind):
    rng = random.Random(f"fuzz-{kind}")
    data = safetensors_bytes(STATE)
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    pkl, storages = state_pickle(STATE)
    floats = ("rms_norm_eps", "rope_freq_constant")
    outcomes = []
    for i in range(CASES):
        src, out = tmp_path / f"src{i}", tmp_path / f"out{i}"
        if kind == "safetensors":
            text = mutate_json(rng, header) if rng.random() < 0.5 else None
            raw = header_bytes(text) + body if text else mutate_bytes(rng, data[: 8 + n]) + body
            write_hf(src, CONFIG, raw)
        elif kind == "pickle":
            write_bin(src, CONFIG, torch_zip_bytes(mutate_bytes(rng, pkl), storages))
        else:
            write_hf(src, CONFIG, safetensors_bytes(STATE))
            text = json.dumps(CONFIG)
            damaged = mutate_json(rng, CONFIG, floats) if rng.random() < 0.7 else None
            (src / "config.json").write_bytes(
                damaged.encode() if damaged else mutate_bytes(rng, text.encode())
            )
        code = run(src, out)
        if code == 0 and kind == "config" and _floats(src, floats) != _floats(None, floats):
            code = 2  # a flipped digit gave another valid eps or rope base: a different model
        elif code == 0:
            np.testing.assert_array_equal(logits(out), reference, err_msg=f"case {i}")
        outcomes.append(code)
    print(f"{kind}: {outcomes.count(0)} converted, {outcomes.count(1)} refused")
    assert outcomes.count(1) > CASES // 2
