"""Reading a Hugging Face OpenELM folder: `config.json` plus safetensors (one file or shards with an
index) or `pytorch_model.bin` (one file or shards). Every tensor comes back as a `TensorRef`.

Safetensors are parsed here rather than with `mx.load`, which reads a whole file at once and
reports a truncated file only when it is evaluated: the header gives names, shapes and offsets,
which are checked against the file size before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .tensors import NUMPY_DTYPES, TensorRef, memmap, view
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
    "U8": "uint8",
    "BOOL": "bool",
}
MAX_HEADER = 100 << 20  # safetensors' own limit


def read_safetensors(path: str | Path) -> dict[str, TensorRef]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER):
                raise ValueError(
                    f"{path}: bad safetensors header (length {n}, file {size} bytes): the file is "
                    "truncated or not safetensors; re-download it"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: bad safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: bad safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, mm = 8 + n, memmap(path)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad safetensors header entry {name!r}: {info!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if end - start != nbytes or start < 0:
            raise ValueError(f"{path}: bad safetensors header: {name} {shape} in {end - start} B")
        if base + end > size:
            raise ValueError(
                f"{path} is truncated ({size} bytes, tensor {name} ends at byte {base + end}): "
                "re-download it"
            )

        def read(a=base + start, b=base + end, dtype=dtype, shape=shape) -> np.ndarray:
            return view(mm()[a:b], dtype, shape)

        tensors[name] = TensorRef(shape, dtype, path, read)
    return tensors


def read_weights_file(path: Path) -> dict[str, TensorRef]:
    """One weights file: safetensors by its name, anything else as a PyTorch zip state dict."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_zip(path)
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]  # a CoreNet training checkpoint: take the weights
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    bad = [str(k) for k, v in state.items() if not isinstance(v, TensorRef)]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad[:5])} are not tensors: not a state dict")
    return state


def _read_sharded(index: Path) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
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
            raise ValueError(f"{index.parent / f} lacks {', '.join(absent[:5])} (see the index)")
        twice = [k for k in shard if k in tensors]
        if twice:
            raise ValueError(f"{index.parent / f} repeats {', '.join(twice[:5])} of another shard")
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
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config
