"""The project's own error types, and the checks of user input that raise them (the readers of
JSON and text files live in `files.py`).

The CLI prints a `UserError` as one line and exits 1; anything else is a bug and keeps its
traceback. It subclasses ValueError so library callers' `except ValueError` keeps working.
"""

from __future__ import annotations

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
