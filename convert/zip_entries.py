"""Reading a zip's entries without trusting its directory.

A crafted zip can give an entry a directory size longer than its data (the reader then takes
weights from the next entry), two entries one name, a wrong CRC, or a deflate stream that expands
to gigabytes. Here every entry's byte range is checked against its neighbours before anything is
read, every entry is CRC-checked up front, and compressed data is decompressed as a stream
bounded by what the tensors need.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_openelm.errors import UserError

Reader = Callable[..., np.ndarray]
CHUNK = 1 << 20
CRC_CHUNK = 64 << 20


def entry_ranges(path: Path, zf: zipfile.ZipFile) -> dict[str, tuple[int, int]]:
    """name -> (start, end) of each entry's stored bytes, after checking that no two entries share
    a name or overlap, and that each local header agrees with the central directory."""
    spans = []
    with open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise UserError(f"{path}: corrupt zip entry {info.filename}: re-download it")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
            name = f.read(name_len).decode(encoding, "replace")
            if name != info.orig_filename:
                raise UserError(f"{path}: zip entry {info.filename} has a local header for {name}")
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((info.header_offset, start, start + info.compress_size, info.filename))
    names = [s[3] for s in spans]
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise UserError(f"{path}: the zip holds two entries named {twice}: refused")
    spans.sort()
    ends = [(s[2], s[3]) for s in spans]
    for (end, name), nxt in zip(ends, [*spans[1:], (zf.start_dir, 0, 0, "the zip directory")]):
        if end > nxt[0]:
            raise UserError(
                f"{path}: zip entry {name} claims bytes that belong to {nxt[3]}: corrupt or "
                "crafted file, refused"
            )
    return {s[3]: (s[1], s[2]) for s in spans}


def entry_reader(
    path: Path, info: zipfile.ZipInfo, span: tuple[int, int], read_bytes: Reader, nbytes: int
) -> Reader:
    """A function that returns the entry's `nbytes` as uint8. The CRC is checked here, before any
    tensor is converted, so a corrupt entry is refused before anything is logged or written."""
    if info.file_size != nbytes:
        what = "is short" if info.file_size < nbytes else "expands to more than"
        raise UserError(
            f"{path}: zip entry {info.filename} {what} its tensors need ({info.file_size:,} "
            f"bytes, need {nbytes:,}): truncated, corrupt or crafted file, refused"
        )

    def corrupt(why: str) -> UserError:
        return UserError(f"{path}: zip entry {info.filename} is corrupt ({why}): re-download it")

    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != nbytes:
            raise corrupt(f"{info.compress_size} bytes stored for {nbytes}")

        def read_stored() -> np.ndarray:
            return read_bytes(span[0], span[0] + nbytes)

        crc = 0
        for a in range(span[0], span[0] + nbytes, CRC_CHUNK):  # bounded memory at any size
            crc = zlib.crc32(read_bytes(a, min(a + CRC_CHUNK, span[0] + nbytes)), crc)
        if crc != info.CRC:
            raise corrupt("bad CRC-32")
        return read_stored

    def read_compressed(keep: bool = True) -> np.ndarray:
        # Someone re-zipped it with compression: stream it, never more than `nbytes` out.
        chunks, left = [], nbytes
        try:
            with zipfile.ZipFile(path) as z, z.open(info) as f:
                while left and (chunk := f.read(min(left, CHUNK))):
                    left -= len(chunk)
                    chunks.append(chunk) if keep else None
                if left or f.read(1):  # EOF is where zipfile checks the CRC
                    raise corrupt("its data does not match its size")
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise corrupt(str(e)) from None
        return np.frombuffer(b"".join(chunks), dtype=np.uint8)

    read_compressed(keep=False)  # the CRC, in bounded memory
    return read_compressed
