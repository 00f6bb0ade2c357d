"""A checkpoint tensor described (name, shape, dtype, file) before any of its data is read.

Readers return these so the converter can check every name and shape first, then read, convert and
write one tensor at a time (peak memory: a few tensors, not the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_openelm.errors import UserError

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


def file_bytes(path: Path) -> Callable[[int, int], np.ndarray]:
    """A function that reads bytes [start, end) of `path` into a fresh array.

    Plain reads, not a memory map: the pages of a mapped file count in the process's RSS until
    the kernel needs them back, so converting a 12 GB checkpoint through a map held ~12 GB more
    than the tensor at hand. Read this way, peak memory is the tensors being converted.
    """

    def read(start: int, end: int) -> np.ndarray:
        buf = np.empty(end - start, dtype=np.uint8)
        view, done = memoryview(buf), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while done < len(buf):  # Linux returns at most ~2 GiB per read
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{path} is truncated (ends before byte {end}): re-download it")
                done += n
        return buf

    return read


def view(buf: np.ndarray, dtype: str, shape: tuple[int, ...], big_endian: bool = False):
    """Bytes (a contiguous uint8 array) -> an array of `shape`."""
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    a = buf.view(np_dtype.newbyteorder(">") if big_endian else np_dtype).reshape(shape)
    return a.astype(np_dtype) if big_endian else a
