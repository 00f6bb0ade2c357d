"""Writing files and folders atomically: a crash, Ctrl-C or SIGTERM leaves the old output or none,
and what a SIGKILL leaves behind is removed by the next run writing there."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(parent: Path, name: str = "*") -> None:
    """Remove `.NAME.PID.*.tmp` folders of ours whose process is gone (killed mid-write)."""
    for tmp in parent.glob(f".{glob.escape(name) if name != '*' else '*'}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").split(".")[-2]
        if tmp.is_dir() and not tmp.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output path that cannot be written, before any long work is done."""
    out = Path(out)
    taken = out.is_symlink() or out.is_file() or (out.is_dir() and any(out.iterdir()))
    if taken and not overwrite:
        raise FileExistsError(f"{out} already exists: delete it or choose another output path")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write in {parent} (permission denied)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    prefix = f".{out.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the temporary name, not the result
    try:
        yield tmp
        if out.is_symlink() or out.is_file():
            out.unlink()  # --overwrite replaces the link itself, never what it points to
        elif out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary name beside `path`, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
