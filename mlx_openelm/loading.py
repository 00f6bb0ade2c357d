"""Loading and saving MLX model folders (`config.json` + `model*.safetensors` [+ tokenizer]).

The folder layout is mlx-lm's, so our folders load in `mlx_lm.load` and mlx-community OpenELM
folders load here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import save_model as _mlx_lm_save_model

from . import hub
from .config import ModelArgs
from .errors import UserError
from .model import Model
from .tokenizer import load_tokenizer


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
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    A failure (or Ctrl-C, or SIGTERM through the CLI) leaves no half-written `out` behind; what a
    SIGKILL leaves is removed by the next run writing there.
    """
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


def save_model(
    folder: str | Path,
    model: nn.Module,
    args: ModelArgs,
    *,
    quantization: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write weights (sharded past 5 GB, with an index) and `config.json` into `folder`."""
    folder = Path(folder)
    _mlx_lm_save_model(folder, model)
    config = {**args.to_dict(), **(extra_config or {})}
    if quantization:
        # mlx-lm reads `quantization`; transformers-style tools look for `quantization_config`.
        config["quantization"] = config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_config(folder: str | Path) -> ModelArgs:
    return ModelArgs.from_file(Path(folder) / "config.json")


def load(
    path: str | Path,
    *,
    naive_rms_norm: bool = False,
    lazy: bool = False,
    adapter_path: str | Path | None = None,
) -> tuple[Model, Any, ModelArgs]:
    """Load an MLX OpenELM folder (ours or mlx-community's), local or a Hub repo id.

    Args:
        path: the folder, or `owner/name` on the Hub (huggingface-hub's cache is used).
        naive_rms_norm: build the unfused RMSNorm of the paper (for benchmarks).
        lazy: leave the weights memory-mapped until first use.
        adapter_path: a LoRA/DoRA adapter folder (`mlx-openelm lora`) to apply.

    Returns:
        (model, tokenizer, config); tokenizer is None when the folder has none.
    """
    patterns = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
    folder = hub.resolve(path, allow_patterns=patterns)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: is it an MLX model folder?")
    args = load_config(folder)  # validates model_type and shapes with a clear message
    if not any(folder.glob("model*.safetensors")):
        raise FileNotFoundError(
            f"{folder} has no model*.safetensors: "
            "convert a PyTorch checkpoint with `mlx-openelm convert`"
        )
    try:
        model, _ = _mlx_lm_load_model(
            folder,
            lazy=lazy,
            model_config={"naive_rms_norm": naive_rms_norm},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    except ValueError as e:
        raise UserError(f"{folder}: weights do not match config.json: {e}") from None
    if adapter_path is not None:
        from .train.lora import load_adapters  # the training package imports this module

        load_adapters(model, adapter_path)
    model.eval()
    return model, load_tokenizer(folder), args
