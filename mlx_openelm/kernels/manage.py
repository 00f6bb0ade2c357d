"""The `mlx-openelm kernels` command: status, build and clear of the kernels' build cache."""

from __future__ import annotations

import shutil

from ..errors import UserError
from . import status
from .build import MODULE, BuildError, cache_root, target_path

ACTIONS = ("status", "build", "clear")


def _builds() -> list:
    """The cache's build folders (each holds one compiled module) and unfinished builds."""
    root = cache_root()
    if not root.is_dir():
        return []
    return [
        d
        for d in root.iterdir()
        if d.is_dir() and (d.name.startswith(".build-") or any(d.glob(f"{MODULE}*")))
    ]


def _built() -> bool:
    """Whether the cache holds the build this machine would load (without building it)."""
    try:
        return target_path().is_file()
    except BuildError:
        return False


def manage(action: str = "status") -> list[str]:
    """Lines to print. `build` compiles the kernels for this CPU, mlx and compiler unless the
    cache holds them; `clear` removes every build, so the next run compiles again."""
    if action not in ACTIONS:
        raise UserError(f"unknown action {action!r}: choose status, build or clear")
    if action == "clear":
        builds = _builds()
        for d in builds:
            shutil.rmtree(d)
        return [f"removed {len(builds)} build(s) from {cache_root()}"]
    if action == "build" or _built():
        line = f"CPU kernels: {status()}"  # builds them on the first call
    else:
        line = "CPU kernels: not built yet for this CPU, compiler and mlx (`build` builds them)"
    return [line, f"build cache: {cache_root()} ({len(_builds())} build(s))"]
