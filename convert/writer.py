"""Writing a model folder's weights one tensor at a time.

Building the whole model first (every tensor loaded, then `mlx_lm.save_model`) held the source's
pages and the converted model at once: 8.5 GB RSS for the 1.1B's 4.3 GB checkpoint, so the 3B did
not fit a 24 GiB machine. Here each tensor is read, cast, quantised and written before the next
one is read, into the files mlx-lm's `save_model` writes (shards past 5 GiB, with an index), so
peak memory is a few tensors whatever the model's size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .tensors import TensorRef

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int

    def applies(self, shape: tuple[int, ...]) -> bool:
        """mlx-lm's rule: every Linear and Embedding (OpenELM's 2-D weights) whose rows split into
        whole groups; norms stay as they are."""
        return len(shape) == 2 and shape[-1] % self.group_size == 0

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


@dataclass(frozen=True)
class _Out:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def _outputs(name: str, ref: TensorRef, dtype: mx.Dtype, q: Quantization | None) -> list[_Out]:
    """What one source tensor becomes in the folder, known before any of it is read."""
    if q is None or not q.applies(ref.shape):
        return [_Out(name, ref.shape, dtype)]
    rows, cols = ref.shape
    module = name.removesuffix(".weight")
    groups = (rows, cols // q.group_size)
    return [
        _Out(name, (rows, cols * q.bits // 32), mx.uint32),
        _Out(f"{module}.scales", groups, dtype),
        _Out(f"{module}.biases", groups, dtype),
    ]


def _convert(ref: TensorRef, dtype: mx.Dtype, q: Quantization | None) -> list[mx.array]:
    w = ref.load().astype(dtype)
    if q is None or not q.applies(ref.shape):
        return [w]
    return list(mx.quantize(w, q.group_size, q.bits))  # as nn.QuantizedLinear.from_linear


def _shards(plan: list[tuple[str, list[_Out]]]) -> list[list[tuple[str, list[_Out]]]]:
    """mlx-lm's `make_shards`, by source tensor so a quantised weight keeps its scales beside it."""
    shards: list[list[tuple[str, list[_Out]]]] = []
    size = 0
    for item in plan:
        nbytes = sum(o.nbytes for o in item[1])
        if not shards or size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _header(outs: list[_Out]) -> bytes:
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for o in outs:
        header[o.name] = {
            "dtype": ST_DTYPES[o.dtype],
            "shape": list(o.shape),
            "data_offsets": [offset, offset + o.nbytes],
        }
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer
    return len(raw).to_bytes(8, "little") + raw


def _raw(a: mx.array) -> memoryview:
    a = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a  # numpy has no bfloat16
    return memoryview(np.ascontiguousarray(a)).cast("B")


def write_weights(
    folder: Path,
    tensors: dict[str, TensorRef],
    dtype: mx.Dtype,
    quantization: Quantization | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Write `tensors` (checked against the config already) into `folder` as safetensors, cast
    to `dtype` and quantised where `quantization` applies; return the bytes written.

    `on_tensor(nbytes)` is called after each source tensor, for progress.
    """
    plan = [(name, _outputs(name, ref, dtype, quantization)) for name, ref in tensors.items()]
    shards = _shards(plan)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for shard, file in zip(shards, names):
        outs = [o for _, item_outs in shard for o in item_outs]
        with open(folder / file, "wb") as f:
            f.write(_header(outs))
            for name, item_outs in shard:
                arrays = _convert(tensors[name], dtype, quantization)
                mx.eval(arrays)
                for out, a in zip(item_outs, arrays, strict=True):
                    assert (tuple(a.shape), a.dtype) == (out.shape, out.dtype), (out, a.shape)
                    f.write(_raw(a))
                    weight_map[out.name] = file
                    total += out.nbytes
                del arrays
                if on_tensor is not None:
                    on_tensor(tensors[name].nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return total
