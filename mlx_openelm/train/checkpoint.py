"""Training checkpoints: trainable weights, optimizer state and step, one folder per save.

A resumed run ends bit for bit where an uninterrupted one would: data order and dropout noise are
functions of the seed and the step, so they need no saved state.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..convert.readers import read_safetensors
from ..errors import UserError
from ..files import atomic_folder, atomic_write, read_json, remove_stale_temporaries

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# Arguments a resumed run must share with the run it continues (they fix data order and schedule).
RESUME_FIXED = (
    "batch_size",
    "iters",
    "grad_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "z_loss",
    "adam_betas",
    "seed",
    "max_seq_length",
)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (`checkpoints/step_NNNNNNN`), or None."""
    folders = sorted(Path(out_dir, CHECKPOINTS).glob("step_*"))
    complete = [f for f in folders if (f / "state.json").is_file()]
    return complete[-1] if complete else None


def check_run_folder(out_dir: Path, resume: bool) -> None:
    """`--resume` needs a checkpoint in `out_dir`; a fresh run must not overwrite one."""
    if resume and latest_checkpoint(out_dir) is None:
        raise FileNotFoundError(f"nothing to resume: {out_dir} has no checkpoint; drop --resume")
    if not resume and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(
            f"{out_dir} already holds a training run: pass --resume to continue it, "
            "or choose another folder"
        )


def save_checkpoint(
    out_dir: Path,
    weights_file: str,
    model: nn.Module,
    optimizer: optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Trainable weights + optimizer state + step, as one atomically renamed folder."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    folder = out_dir / CHECKPOINTS / f"step_{meta['step']:07d}"
    if folder.parent.is_dir():
        remove_stale_temporaries(folder.parent)  # of a save that was killed (SIGKILL)
    with atomic_folder(folder, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / weights_file), weights)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    # The latest weights also sit at the top, where users (and `load`) look for them.
    atomic_write(out_dir / weights_file, lambda p: shutil.copyfile(folder / weights_file, p))
    for old in sorted((out_dir / CHECKPOINTS).glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    read_safetensors(path)  # checks the header against the file size: a truncated save
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} is broken ({e})") from None


def load_checkpoint(
    folder: Path, weights_file: str, model: nn.Module, optimizer: optim.Optimizer
) -> dict[str, Any]:
    """Restore the weights and optimizer state saved by `save_checkpoint`."""
    meta = read_json(folder / "state.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{folder / 'state.json'} is not a checkpoint's state")
    weights = _load_safetensors(folder / weights_file)
    opt_state = _load_safetensors(folder / "optimizer.safetensors")
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        raise UserError(
            f"{folder / weights_file} does not match the model's trainable parameters "
            f"({len(set(weights) ^ expected)} names differ): resume with the same model and options"
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    optimizer.init(model.trainable_parameters())
    mx.eval(model.state, optimizer.state)
    return meta


def resume_checkpoint(
    out_dir: Path, weights_file: str, model: nn.Module, optimizer: optim.Optimizer
) -> dict[str, Any]:
    """Load the newest checkpoint that reads whole; a broken one (a save killed mid-write, a
    full disk) is reported and the one before it used. With none left, the error names the file."""
    folders = sorted(Path(out_dir, CHECKPOINTS).glob("step_*"), reverse=True)
    errors = []
    for folder in (f for f in folders if (f / "state.json").is_file()):
        try:
            meta = load_checkpoint(folder, weights_file, model, optimizer)
        except UserError as e:
            errors.append(str(e))
            log.warning("warning: %s; trying the checkpoint before it", e)
            continue
        return meta
    raise UserError(f"no checkpoint in {out_dir} can be resumed: {'; '.join(errors)}")


def check_resume_args(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume with options that change the data order or the schedule."""
    diff = [
        f"{k} {saved[k]!r} -> {now[k]!r}"
        for k in RESUME_FIXED
        if k in saved and list(np.atleast_1d(saved[k])) != list(np.atleast_1d(now[k]))
    ]
    if diff:
        raise UserError(
            "--resume needs the options of the run it continues; changed: " + ", ".join(diff)
        )


def average_checkpoints(out_dir: str | Path, k: int, weights_file: str) -> dict:
    """The mean of the last `k` checkpoints' weights (the paper averages its last five)."""
    folders = [
        f for f in sorted(Path(out_dir, CHECKPOINTS).glob("step_*")) if (f / "state.json").is_file()
    ]
    if len(folders) < k:
        raise UserError(f"{out_dir} has {len(folders)} checkpoints, fewer than the {k} to average")
    total = None
    for f in folders[-k:]:
        w = mx.load(str(f / weights_file))
        total = w if total is None else tree_map(mx.add, total, w)
    return {name: v / k for name, v in total.items()}
