"""A checkpoint tensor described (name, shape, dtype, file) before any of its data is read.

Readers return these so the converter can check every name and shape first, then read one tensor
at a time from a memory map (peak memory: the converted model plus one source tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

# numpy has no bfloat16: its raw bits travel as uint16 and become bf16 in MLX.
NUMPY_DTYPES: dict[str, type] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TensorRef:
    shape: tuple[int, ...]
    dtype: str  # a key of NUMPY_DTYPES
    file: Path
    read: Callable[[], np.ndarray]  # the values (bf16 as uint16), usually a memory-map view

    @property
    def nbytes(self) -> int:
        itemsize = np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize

    def load(self) -> mx.array:
        a = self.read()
        if self.dtype == "float64":
            a = a.astype(np.float32)  # MLX has float64 on the CPU only
        x = mx.array(a)
        return x.view(mx.bfloat16) if self.dtype == "bfloat16" else x

    def first_rows(self, n: int) -> TensorRef:
        """The first `n` rows (drops padding rows of an embedding)."""
        read = self.read
        return replace(self, shape=(n, *self.shape[1:]), read=lambda: read()[:n])


def memmap(path: Path) -> Callable[[], np.ndarray]:
    """One read-only memory map of a whole file, opened on first use and shared by its tensors."""
    cache: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not cache:
            cache.append(np.memmap(path, dtype=np.uint8, mode="r"))
        return cache[0]

    return get


def view(buf: np.ndarray, dtype: str, shape: tuple[int, ...], big_endian: bool = False):
    """Bytes (a contiguous uint8 array) -> an array of `shape`."""
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    a = buf.view(np_dtype.newbyteorder(">") if big_endian else np_dtype).reshape(shape)
    return a.astype(np_dtype) if big_endian else a
