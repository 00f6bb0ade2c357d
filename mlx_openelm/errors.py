"""The project's own error type, and readers that turn a bad file into one of them.

The CLI prints a `UserError` as one line and exits 1; anything else is a bug and keeps its
traceback. It subclasses ValueError so library callers' `except ValueError` keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """Bad input the user can fix: the message names the file and, where it can, the fix."""


class MissingDependency(ImportError):
    """An optional package is not installed; the message gives the `pip install` command."""


def is_int(x: Any) -> bool:
    """An int that is not a bool (JSON and pickles can give either where a size belongs)."""
    return isinstance(x, int) and not isinstance(x, bool)


MAX_SEED = (1 << 32) - 1  # what every consumer takes: mx.random.seed, numpy's legacy seeding


def check_seed(seed: int | None, option: str = "--seed") -> None:
    """A seed every random generator here accepts (MLX refuses negative ones with a TypeError)."""
    if seed is not None and not (is_int(seed) and 0 <= seed <= MAX_SEED):
        raise UserError(f"{option} must be a whole number from 0 to {MAX_SEED}, got {seed!r:.40}")


def check_utf8(text: str, what: str) -> None:
    """Text from argv or a terminal holds undecodable bytes as surrogates; refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 text (character {e.start})") from None


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
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """A JSON file, every way it can be bad reported as a UserError naming it."""
    return parse_json(read_text(path), path)
