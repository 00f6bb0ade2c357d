"""Reading and writing files: JSON and text read with every way they can be bad reported as a
UserError, and files and folders written atomically (a crash, Ctrl-C or SIGTERM leaves the old
output or none; what a SIGKILL leaves behind is removed by the next run writing there)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


MAX_JSON_DEPTH = 64  # no config, index or state file we read nests deeper than a few levels


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; non-UTF-8 bytes are a UserError naming the file and the byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start]:#x})") from None


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile file may nest 100k deep)."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            break
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(o.values())
            elif isinstance(o, list):
                nxt.extend(o)
        level = nxt
    return depth


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UserError(f"the key {twice!r} appears twice")
    return d


def parse_json(text: str | bytes, source: str | Path) -> Any:
    """JSON text -> object; bad syntax, duplicate keys or deep nesting are a UserError."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source} is not valid JSON: {e}") from None
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    except ValueError:  # Python's cap on an integer's digits (sys.get_int_max_str_digits)
        raise UserError(f"{source} holds a number with too many digits") from None
    except RecursionError:
        raise UserError(f"{source}: JSON nested too deeply") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise UserError(f"{source}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return obj


def parse_json_line(line: str, where: str) -> Any:
    """One jsonl record; the error names `file:line`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    except ValueError:
        raise UserError(f"{where}: a number with too many digits") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """A JSON file, every way it can be bad reported as a UserError naming it."""
    return parse_json(read_text(path), path)
