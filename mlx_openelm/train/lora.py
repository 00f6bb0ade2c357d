"""LoRA and DoRA fine-tuning with the paper's recipe, on mlx-lm's adapter layers.

OpenELM's fused `qkv_proj` and `proj_1` are plain linear layers here. The adapters themselves
(applying, loading, fusing) are `mlx_openelm.adapters`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import hub
from ..adapters import (
    ADAPTER_CONFIG,
    ADAPTERS,
    DEFAULT_TARGETS,
    adapter_config,
    apply_lora,
    fuse_adapters,
)
from ..chat_template import adapter_template, folder_template, template_for_training
from ..config import ModelArgs
from ..errors import UserError
from ..export.hf import export_hf
from ..files import atomic_folder, read_json
from ..loading import PATTERNS, load, save_model
from ..tokenizer import require_tokenizer, write_tokenizer_files
from .checkpoint import latest_checkpoint
from .data import Example, TokenizerLike, load_data_folder, tokenize
from .distributed import check_on_rank0
from .trainer import TrainingArgs, train

log = logging.getLogger(__name__)

# The default warm-up is 10% of the run, at most this (the paper: 1000, over far longer runs).
MAX_WARMUP = 100


def lora(
    model: str | Path,
    data: str | Path,
    adapter_path: str | Path,
    *,
    dora: bool = False,
    rank: int = 32,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: Sequence[str] = DEFAULT_TARGETS,
    num_layers: int | None = None,
    epochs: float | None = None,
    resume: bool = False,
    progress: bool = True,
    tokenizer: TokenizerLike | None = None,
    chat_template: str | None = None,
    **training: Any,
) -> dict[str, Any]:
    """Fine-tune adapters on `data` (`train.jsonl`, `valid.jsonl`) and save them in `adapter_path`.

    Args:
        model: an MLX model folder (quantised works: QLoRA) or Hub repo id.
        data: the data folder.
        adapter_path: the output folder; with `resume`, the run to continue.
        dora: DoRA instead of LoRA.
        rank, alpha, dropout: the low-rank update (the paper: 32, 32, 0.1).
        targets: layers to adapt (the paper's five by default).
        num_layers: adapt only the last N blocks (default all).
        epochs: train this many passes over train.jsonl (sets `iters`).
        resume: continue from the last checkpoint in `adapter_path`.
        progress: show the live bar.
        tokenizer: overrides the model folder's tokenizer.
        chat_template: formats `messages` records (`openelm`, a file or the template text);
          default the model folder's, else OpenELM's. Pass the same to `chat`.
        training: `TrainingArgs` fields (iters, batch_size, learning_rate, ...); without
          `warmup_steps` the warm-up is 10% of the run, at most `MAX_WARMUP`.

    Returns:
        The last training figures (see `trainer.train`).
    """
    warmup = training.pop("warmup_steps", None)  # None: a share of the run, once it is known
    args = _training_args(training, warmup)
    adapter_path = Path(adapter_path)
    check_on_rank0(lambda: _check_folder(adapter_path, resume))  # others need not see it
    # Validate every data line before loading the model or writing anything.
    splits = load_data_folder(data, require_valid=args.steps_per_eval > 0)
    folder = hub.resolve(model, allow_patterns=PATTERNS)
    base, model_tokenizer, model_args = load(folder, run_on_cpu=True)
    tokenizer = tokenizer or require_tokenizer(model_tokenizer, model)
    template = template_for_training(folder, chat_template)
    examples = _Examples.tokenize(splits, tokenizer, args.max_seq_length, template, data)
    args = _schedule(args, epochs, warmup, len(examples.train))
    config = _AdapterOptions(dora, rank, alpha, dropout, targets, num_layers).config(base)
    if resume:
        check_on_rank0(lambda: _check_same_options(adapter_path, config))
    mx.random.seed(args.seed)  # the adapters' initial A matrices
    apply_lora(base, config)

    if mx.distributed.init().rank() == 0:
        _log_start(base, model_args, config, examples, args, warmup is None)
        adapter_path.mkdir(parents=True, exist_ok=True)
        record = {**config, "base_model": str(model), "training": asdict(args)}
        if chat_template is not None:  # then chat, generate --chat and fuse use it too
            record["chat_template"] = template
        (adapter_path / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    return train(
        base,
        examples.train,
        examples.val,
        adapter_path,
        args,
        weights_file=ADAPTERS,
        resume=resume,
        progress=progress,
    )


def _training_args(training: dict[str, Any], warmup: int | None) -> TrainingArgs:
    """The caller's options, checked before anything is loaded; the warm-up waits for `iters`."""
    try:
        return TrainingArgs(**training, warmup_steps=warmup or 0)
    except TypeError as e:
        raise UserError(f"unknown training option: {e}") from None


@dataclass
class _Examples:
    """The tokenised splits, and how many training records were truncated or had no target."""

    train: list[Example]
    val: list[Example]
    stats: dict[str, int]

    @classmethod
    def tokenize(
        cls,
        splits: dict[str, list[dict[str, Any]]],
        tokenizer: TokenizerLike,
        max_seq_length: int,
        template: str,
        data: str | Path,
    ) -> _Examples:
        """Refuses a training set with nothing to learn before the adapters are made."""
        train_set, stats = tokenize(splits["train"], tokenizer, max_seq_length, template)
        val_set, _ = tokenize(splits.get("valid", []), tokenizer, max_seq_length, template)
        if not train_set:
            raise UserError(f"{data}/train.jsonl has no example with a target left to learn")
        return cls(train_set, val_set, stats)


@dataclass
class _AdapterOptions:
    """The low-rank update as the caller chose it; its depth is known once the model is loaded."""

    dora: bool
    rank: int
    alpha: float
    dropout: float
    targets: Sequence[str]
    num_layers: int | None  # the last N blocks; None: all

    def config(self, base: nn.Module) -> dict[str, Any]:
        n_layers = len(base.layers) if self.num_layers is None else self.num_layers
        if n_layers > len(base.layers):
            raise UserError(f"num_layers {n_layers}: the model has only {len(base.layers)} blocks")
        return adapter_config(
            n_layers,
            dora=self.dora,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=self.targets,
        )


def _log_start(
    base: nn.Module,
    model_args: ModelArgs,
    config: dict[str, Any],
    examples: _Examples,
    args: TrainingArgs,
    default_warmup: bool,
) -> None:
    """One line with the share of the model trained and the data's size, before the run starts."""
    trainable = sum(v.size for _, v in tree_flatten(base.trainable_parameters()))
    total = model_args.num_parameters()
    notes = [f"{v} training examples {k}" for k, v in examples.stats.items() if v]
    notes.append(
        f"{args.iters} steps, warm-up {args.warmup_steps}"
        + (" (10% of the run)" if default_warmup else "")
    )
    log.info(
        f"{config['fine_tune_type']}: {trainable / 1e6:.3f}M trainable parameters "
        f"({100 * trainable / total:.2f}% of {total / 1e6:.1f}M); "
        f"{len(examples.train)} training, {len(examples.val)} validation examples"
        + "".join(f"; {note}" for note in notes)
    )


def _check_folder(adapter_path: Path, resume: bool) -> None:
    if resume and latest_checkpoint(adapter_path) is None:
        raise FileNotFoundError(f"nothing to resume: {adapter_path} has no checkpoint")
    if not resume and (adapter_path / ADAPTERS).exists():
        raise FileExistsError(
            f"{adapter_path} already holds adapters: pass --resume to continue, "
            "or choose another --adapter-path"
        )


def _schedule(
    args: TrainingArgs, epochs: float | None, warmup: int | None, examples: int
) -> TrainingArgs:
    """`epochs` sets the steps; without a warm-up it is 10% of them, at most MAX_WARMUP."""
    if epochs is not None:
        per_step = args.batch_size * args.grad_accumulation_steps
        args = replace(args, iters=max(1, math.ceil(epochs * examples / per_step)))
    if warmup is None:
        return replace(args, warmup_steps=min(MAX_WARMUP, args.iters // 10))
    return replace(args, warmup_steps=warmup)  # checked against the final iters


def _check_same_options(adapter_path: Path, config: dict[str, Any]) -> None:
    """A run resumes with the LoRA options it started with."""
    if not (adapter_path / ADAPTER_CONFIG).is_file():
        return
    saved = read_json(adapter_path / ADAPTER_CONFIG)
    if {k: saved.get(k) for k in config} != json.loads(json.dumps(config)):
        raise UserError(
            f"{adapter_path} was trained with other LoRA options "
            f"({saved.get('fine_tune_type')}, rank {saved['lora_parameters']['rank']}, "
            f"targets {saved.get('targets')}): resume with the same ones"
        )


def fuse(
    model: str | Path,
    adapter_path: str | Path,
    out: str | Path,
    *,
    dequantize: bool = False,
    export_hf_path: str | Path | None = None,
    hf_dtype: str | None = None,
) -> None:
    """Merge adapters into their base model and write a new MLX model folder.

    Args:
        model: the base MLX model folder (or Hub repo id) the adapters were trained on.
        adapter_path: the adapter folder.
        out: the fused MLX model folder (must not exist).
        dequantize: write a float model even when the base is quantised.
        export_hf_path: also write a Hugging Face OpenELM folder here (dequantised).
        hf_dtype: float32, float16 or bfloat16 for that export (default: the fused weights' type).
    """
    for path in (out, export_hf_path):
        if path is not None and Path(path).exists() and any(Path(path).iterdir()):
            raise FileExistsError(f"{path} already exists: delete it or choose another path")
    folder = hub.resolve(model, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    base, _, model_args = load(folder, adapter_path=adapter_path)
    quantization = None
    if not dequantize:
        quantization = read_json(folder / "config.json").get("quantization")
    fused = fuse_adapters(base, dequantize=dequantize)
    tokenizer_file = folder / "tokenizer.model"
    template = adapter_template(adapter_path) or folder_template(folder)
    with atomic_folder(out) as tmp:
        save_model(tmp, fused, model_args, quantization=quantization)
        if tokenizer_file.is_file():
            write_tokenizer_files(tmp, tokenizer_file, model_args.max_context_length, template)
    if export_hf_path is not None:
        if quantization:  # fuse into the float weights, not into re-quantised ones
            fused = fuse_adapters(load(folder, adapter_path=adapter_path)[0], dequantize=True)
        export_hf(
            fused, model_args, export_hf_path, dtype=hf_dtype, tokenizer_file=tokenizer_file,
            chat_template=template,
        )  # fmt: skip
