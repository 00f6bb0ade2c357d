"""Builders of small valid checkpoints, and of hostile variants, without torch.

The PyTorch zip is written the way `torch.save` lays it out, its pickle naming torch's globals
through stand-in modules, so any shape, key or storage can be given.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

ARGS = dict(
    num_transformer_layers=2, model_dim=32, head_dim=8, vocab_size=64, ffn_dim_divisor=16,
    max_context_length=64,
)  # fmt: skip
PROMPT = [[1, 17, 50, 3, 9, 42, 7, 18]]


def tiny_state(seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, Hugging Face state dict as float32 numpy arrays)."""
    from mlx_openelm.config import ModelArgs
    from mlx_openelm.model import Model

    args = ModelArgs(**ARGS)
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Model(args).parameters())}
    state = {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()}
    return args.to_dict(), state


def safetensors_bytes(state: dict[str, np.ndarray], header: dict | None = None) -> bytes:
    """A safetensors file; `header` (if given) replaces the computed one, data unchanged."""
    computed, data, offset = {}, b"", 0
    for name, a in state.items():
        raw = a.tobytes()
        computed[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(
        header if header is not None else {"__metadata__": {"format": "pt"}, **computed}
    )
    return header_bytes(text) + data


def header_bytes(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def write_hf(folder: Path, config: dict, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


class Storage:
    def __init__(self, key: str, numel: Any):
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as torch's `_rebuild_tensor_v2(storage, offset, shape, stride, ...)`."""

    def __init__(self, storage: Storage, shape: Any, stride: Any = None, offset: Any = 0):
        self.storage, self.shape, self.offset = storage, shape, offset
        self.stride = stride if stride is not None else _contiguous(shape)

    def __reduce__(self):
        return (
            _FAKE["rebuild"],
            (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()),
        )


def _contiguous(shape: Any) -> tuple:
    try:
        return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    except Exception:
        return (1,)


def _fake_torch() -> dict[str, Any]:
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    return {"torch": torch, "torch._utils": utils, "rebuild": _rebuild_tensor_v2}


_FAKE = _fake_torch()


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", _FAKE["torch"].FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: Any) -> bytes:
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": _FAKE["torch"], "torch._utils": _FAKE["torch._utils"]})
    try:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def state_pickle(state: dict[str, np.ndarray]) -> tuple[bytes, dict[str, bytes]]:
    """(data.pkl, storage key -> bytes); keys are distinct random-looking strings."""
    obj, storages = collections.OrderedDict(), {}
    for i, (name, a) in enumerate(state.items()):
        key = f"s{i * 7919 % 10007:05d}x{i}"
        obj[name] = Tensor(Storage(key, a.size), tuple(a.shape))
        storages[key] = a.tobytes()
    return torch_pickle(obj), storages


def torch_zip_bytes(
    pkl: bytes, storages: dict[str, bytes], compress: dict[str, int] | None = None
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(
                f"archive/data/{key}",
                raw,
                compress_type=(compress or {}).get(key, zipfile.ZIP_STORED),
            )
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def write_bin(folder: Path, config: dict, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(data)
    return folder


def logits(folder: Path) -> np.ndarray:
    import mlx.core as mx

    import mlx_openelm

    model, _, _ = mlx_openelm.load(folder)
    return np.array(model(mx.array(PROMPT)))
