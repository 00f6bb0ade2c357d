"""Reading a Hugging Face OpenELM folder: `config.json` plus safetensors (one file or shards with an
index) or `pytorch_model.bin` (one file or shards). Every tensor comes back as a `TensorRef`.

Safetensors are parsed here rather than with `mx.load`, which reads a whole file at once and
reports a truncated file only when it is evaluated: the header gives names, shapes and offsets,
which are checked against the file size before anything is read.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from mlx_openelm.errors import UserError, is_int
from mlx_openelm.files import parse_json, read_json

from .tensors import NUMPY_DTYPES, TensorRef, file_bytes, view
from .torch_zip import read_torch_zip

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
MAX_HEADER = 100 << 20  # safetensors' own limit


def _entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field checked for type and range."""
    bad = UserError(f"{path}: bad safetensors header entry {name!r:.80}: {info!r:.200}")
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise bad
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise bad
    if len(shape) > 8 or not all(is_int(d) and 0 <= d < 1 << 31 for d in shape):
        raise bad  # a float, bool, negative or absurd size: never written by a real saver
    if not all(is_int(d) and d >= 0 for d in offsets):
        raise bad  # large is fine (the 3B's file is 12 GB): the file's size is checked after
    return SAFETENSORS_DTYPES[info["dtype"]], tuple(shape), offsets[0], offsets[1]


def read_safetensors(path: str | Path) -> dict[str, TensorRef]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER):
                raise UserError(
                    f"{path}: bad safetensors header (length {n}, file {size} bytes): the file is "
                    "truncated or not safetensors; re-download it"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file: {path}") from None
    try:
        header = parse_json(raw, path)
    except UserError as e:
        raise UserError(f"bad safetensors header: {e}; re-download it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: bad safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, read_bytes = 8 + n, file_bytes(path)
    tensors, ranges = {}, []
    for name, info in header.items():
        dtype, shape, start, end = _entry(path, name, info)
        nbytes = math.prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if end - start != nbytes:
            raise UserError(f"{path}: bad safetensors header: {name} {shape} in {end - start} B")
        if base + end > size:
            raise UserError(
                f"{path} is truncated ({size} bytes, tensor {name} ends at byte {base + end}): "
                "re-download it"
            )
        ranges.append((start, end, name))

        def read(a=base + start, b=base + end, dtype=dtype, shape=shape) -> np.ndarray:
            return view(read_bytes(a, b), dtype, shape)

        tensors[name] = TensorRef(shape, dtype, path, read)
    ranges.sort()
    for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
        if end > start:
            raise UserError(f"{path}: tensors {a} and {b} share bytes: corrupt or crafted, refused")
    return tensors


def read_weights_file(path: Path) -> dict[str, TensorRef]:
    """One weights file: safetensors by its name, anything else as a PyTorch zip state dict."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_zip(path)
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]  # a CoreNet training checkpoint: take the weights
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    if not all(isinstance(k, str) for k in state):
        key = next(k for k in state if not isinstance(k, str))
        raise UserError(f"{path}: a tensor is named {key!r:.80}, not a string: not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, TensorRef)]
    if bad:
        raise UserError(f"{path}: {', '.join(bad[:5])} are not tensors: not a state dict")
    return state


def _shard_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard file map; a shard must be a plain name inside the folder."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: not a valid shard index (weight_map must map names to files)")
    for f in set(weight_map.values()):
        p = PurePath(f)
        if not f or p.is_absolute() or ".." in p.parts or "\\" in f or p.name != f.strip("/"):
            raise UserError(f"{index}: shard {f!r:.100} is not a file in the model folder: refused")
    return weight_map


def _read_sharded(index: Path) -> dict[str, TensorRef]:
    weight_map = _shard_map(index)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index.parent}: shard {', '.join(missing)} named in {index.name} is missing: "
            "download every shard"
        )
    tensors: dict[str, TensorRef] = {}
    for f in files:
        shard = read_weights_file(index.parent / f)
        absent = [k for k, v in weight_map.items() if v == f and k not in shard]
        if absent:
            raise UserError(f"{index.parent / f} lacks {', '.join(absent[:5])} (see the index)")
        twice = [k for k in shard if k in tensors]
        if twice:
            raise UserError(f"{index.parent / f} repeats {', '.join(twice[:5])} of another shard")
        tensors.update(shard)
    return tensors


def read_hf_weights(folder: Path) -> dict[str, TensorRef]:
    """The weights of a Hugging Face folder, in the order transformers looks for them."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return _read_sharded(folder / index)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_weights_file(folder / name)
    raise FileNotFoundError(
        f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin: "
        "is it a Hugging Face OpenELM folder?"
    )


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: pass a Hugging Face OpenELM folder, or a CoreNet .pt "
            "with --config-yaml"
        )
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config
