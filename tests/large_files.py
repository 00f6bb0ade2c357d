"""Checkpoints of real sizes (past 2 and 4 GiB) that cost no disk: sparse files.

A tensor given as None is zeros and left as a hole in the file; a tensor given as an array is
written where its offset says. Safetensors files are laid out as `safetensors.save_file` does;
PyTorch zips as `torch.save` does (zip64 past 4 GiB), through `zipfile`, with the zeros of a
hole skipped by the file object instead of written.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
from hostile import Storage, Tensor, torch_pickle

Spec = dict[str, tuple[tuple[int, ...], np.ndarray | None]]  # name -> (shape, values or None)
ZEROS = bytes(64 << 20)


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 4  # float32


def write_safetensors(path: Path, spec: Spec) -> dict[str, int]:
    """Write `spec` as float32 safetensors; return each tensor's absolute offset in the file."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, _) in spec.items():
        end = offset + _nbytes(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    starts = {name: base + h["data_offsets"][0] for name, h in header.items() if name in spec}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (_, values) in spec.items():
            if values is not None:
                f.seek(starts[name])
                f.write(values.astype(np.float32).tobytes())
        f.truncate(base + offset)
    return starts


class _HoleFile:
    """The file object zipfile writes to: the shared block of zeros becomes a hole."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        if data is ZEROS:
            self.f.seek(len(ZEROS), 1)
            return len(ZEROS)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_torch_zip(path: Path, spec: Spec, *, nest: str | None = None) -> None:
    """Write `spec` as `torch.save` would (float32 storages, zip64 where needed); with `nest`,
    the state dict sits under that key, as in a CoreNet training checkpoint."""
    state, storages = {}, {}
    for i, (name, (shape, values)) in enumerate(spec.items()):
        key = str(i)
        state[name] = Tensor(Storage(key, math.prod(shape)), shape)
        storages[key] = (shape, values)
    pkl = torch_pickle({nest: state} if nest else state)
    with open(path, "wb") as raw, zipfile.ZipFile(_HoleFile(raw), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, (shape, values) in storages.items():
            with z.open(f"archive/data/{key}", "w", force_zip64=True) as w:
                if values is not None:
                    w.write(values.astype(np.float32).tobytes())
                    continue
                left = _nbytes(shape)
                while left >= len(ZEROS):
                    w.write(ZEROS)
                    left -= len(ZEROS)
                w.write(bytes(left))
        z.writestr("archive/version", "3\n")
