"""The one training loop, shared by LoRA/DoRA fine-tuning and pretraining.

A compiled step with gradient accumulation, AdamW with warm-up and cosine decay, gradient clipping,
validation, checkpoints that resume bit for bit, Ctrl-C that saves, and data parallelism over
`mx.distributed` (each rank takes its shard of every global batch; only rank 0 writes).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from .. import kernels
from ..errors import UserError, check_seed
from .checkpoint import (
    check_resume_args,
    check_run_folder,
    resume_checkpoint,
    save_checkpoint,
)
from .data import Example, batch_indices, collate, eval_batches, num_input_tokens, shard
from .distributed import check_on_rank0, fingerprint, guard, heartbeat, sync_from_rank0
from .remat import keyed_blocks
from .report import MetricsLog, TrainProgress, Window, plot_loss_curve, report_window

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


@dataclass
class TrainingArgs:
    batch_size: int = 4  # global: all ranks together, per micro-step
    iters: int = 1000  # optimizer steps
    grad_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    warmup_steps: int = 100  # the paper warms up 1000 steps, over far longer runs
    min_lr_ratio: float = 0.1  # cosine ends at 10% of the peak
    weight_decay: float = 0.0  # the paper: 0 for LoRA, 0.1 for pretraining (matrices only)
    z_loss: float = 0.0  # CoreNet's OpenELM pretraining: 1e-4 x log(Z)^2 keeps logits in range
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 turns clipping off
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200  # 0: never validate
    val_batches: int = 25  # -1: the whole validation set
    steps_per_save: int = 100
    keep_checkpoints: int = 2  # numbered checkpoints kept besides the latest weights

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        for name in ("batch_size", "iters", "grad_accumulation_steps", "max_seq_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.iters:
            raise UserError(
                f"warmup_steps ({self.warmup_steps}) must be below iters ({self.iters}): "
                "lower the warm-up or train longer"
            )
        if self.z_loss < 0 or self.weight_decay < 0:
            raise UserError("z_loss and weight_decay must not be negative")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("learning_rate must be positive and min_lr_ratio in [0, 1]")
        check_seed(self.seed)
        for name in ("steps_per_report", "steps_per_save", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")


def masked_loss(
    model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, z_loss: float = 0.0
) -> tuple[mx.array, mx.array]:
    """Cross-entropy SUMMED over the masked positions, and their count.

    The step divides by the token count of the whole global batch, so the gradient is the same
    whatever the split over micro-batches and ranks. `z_loss` adds `z_loss * logsumexp(logits)^2`
    per target (PaLM's; CoreNet's `use_z_loss`), pulling the softmax normaliser towards 1.
    """
    logits = model(inputs)
    ce = kernels.cross_entropy(logits, targets)
    if z_loss:
        # logsumexp from the loss the kernel computed (ce = lse - logits[target]): no second pass
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        lse = ce.astype(mx.float32) + picked.astype(mx.float32)
        ce = ce + z_loss * lse**2
    return (ce * mask).astype(mx.float32).sum(), mask.sum()


def make_schedule(args: TrainingArgs) -> Callable[[mx.array], mx.array]:
    """Linear warm-up to the peak (step 0 already learns), then cosine to `min_lr_ratio` of it."""
    lr, w = args.learning_rate, args.warmup_steps
    cosine = optim.cosine_decay(lr, max(args.iters - w - 1, 1), lr * args.min_lr_ratio)
    if w == 0:
        return cosine
    warmup = optim.linear_schedule(lr / w, lr, max(w - 1, 1))
    return optim.join_schedules([warmup, cosine], [w])


class MatrixDecayAdamW(optim.AdamW):
    """AdamW that decays matrices only: norm gains (and any 1-D parameter) are left alone, as
    CoreNet's `no_decay_bn_filter_bias` and nanoGPT's `configure_optimizers` do."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    return MatrixDecayAdamW(
        learning_rate=make_schedule(args),
        betas=list(args.adam_betas),
        weight_decay=args.weight_decay,
    )


def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    num_batches: int = -1,
    loss: Callable = masked_loss,
    group: Any = None,
) -> float:
    """Mean loss per target token over (the first `num_batches` of) `examples`, all ranks summed."""
    group = group or mx.distributed.init()
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in eval_batches(examples, batch_size, num_batches, group.rank(), group.size()):
        inputs, targets, mask = map(mx.array, collate(batch))
        s, n = loss(model, inputs, targets, mask)
        total, count = total + s, count + n
        mx.eval(total, count)
        heartbeat()
    if group.size() > 1:
        total, count = mx.distributed.all_sum(total), mx.distributed.all_sum(count)
    model.train(was_training)
    return (total / mx.maximum(count, 1)).item()


# ---- the loop


class _StopRequest:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one quits."""

    def __init__(self, console: TrainProgress):
        self.requested = False
        self._console = console
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._console.print("stopping after this step to save (Ctrl-C again to quit unsaved)")

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _micro_seed(seed: int, micro_step: int, rank: int) -> int:
    # Dropout noise is a function of (seed, micro-step, rank): a resumed run needs no RNG state.
    return int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, np.uint64)[0])


def _start(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_set: Sequence[Example],
    out_dir: Path,
    args: TrainingArgs,
    weights_file: str,
    resume: bool,
    group: mx.distributed.Group,
) -> dict[str, Any]:
    """Check the run, make `out_dir`, and restore a checkpoint (rank 0's, on every rank)."""
    world, writer = group.size(), group.rank() == 0
    if args.batch_size % world:
        raise UserError(
            f"batch size {args.batch_size} is not divisible by the {world} processes: "
            "choose a multiple of the world size"
        )
    if len(train_set) == 0:
        raise UserError("the training set is empty")
    check_on_rank0(lambda: check_run_folder(out_dir, resume), group)
    if writer:  # the only rank that reads or writes out_dir (other machines may lack it)
        out_dir.mkdir(parents=True, exist_ok=True)
    optimizer.init(model.trainable_parameters())
    meta: dict[str, Any] = {"step": 0, "trained_tokens": 0}
    if resume and writer:
        meta = resume_checkpoint(out_dir, weights_file, model, optimizer)
        check_resume_args(meta.get("args", {}), asdict(args))
    if world > 1:  # rank 0's state, whatever the world size of the run that saved it
        with guard(group):
            digest = fingerprint({**asdict(args), "w": weights_file}, train_set, model)
            meta = sync_from_rank0(model, optimizer, meta, digest, group)
    return meta


def _compiled_step(
    model: nn.Module, optimizer: optim.Optimizer, loss: Callable, args: TrainingArgs
) -> tuple[Callable, list]:
    """One micro-step (forward, backward, accumulate; the update on the last), and its state."""
    # The z-loss shapes training only: validation reports the plain cross-entropy.
    train_loss = partial(loss, z_loss=args.z_loss) if args.z_loss else loss
    loss_and_grad = nn.value_and_grad(model, train_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask, acc_grad, scale, do_update):
        (loss_sum, _), grad = loss_and_grad(model, inputs, targets, mask)
        if acc_grad is not None:
            grad = tree_map(mx.add, grad, acc_grad)
        if not do_update:
            return loss_sum, grad, None
        # Mean over ranks of per-rank sums, times world / global token count: the global mean.
        grad = tree_map(lambda g: g * scale, average_gradients(grad))
        norm = mx.array(0.0)
        if args.grad_clip > 0:
            grad, norm = optim.clip_grad_norm(grad, args.grad_clip)
        optimizer.update(model, grad)
        return loss_sum, None, norm

    return step, state


def _optimizer_step(
    step: Callable,
    state: list,
    train_set: Sequence[Example],
    args: TrainingArgs,
    it: int,
    group: mx.distributed.Group,
) -> tuple[mx.array, float, int, mx.array]:
    """Optimizer step `it` over its micro-batches: (loss sum, target count, input tokens, norm)."""
    world, rank = group.size(), group.rank()
    accum, n = args.grad_accumulation_steps, len(train_set)
    # Every rank knows the whole global batch, so each can count all its target tokens.
    batches = [batch_indices(n, args.batch_size, it * accum + m, args.seed) for m in range(accum)]
    step_targets = float(sum(train_set[i][1][1:].sum() for b in batches for i in b))
    scale = mx.array(world / max(step_targets, 1.0))
    acc, step_loss = None, mx.array(0.0)
    for m, global_idx in enumerate(batches):
        local = [train_set[i] for i in shard(global_idx, rank, world)]
        inputs, targets, mask = map(mx.array, collate(local))
        mx.random.seed(_micro_seed(args.seed, it * accum + m, rank))
        loss_sum, acc, norm = step(inputs, targets, mask, acc, scale, m == accum - 1)
        step_loss = step_loss + loss_sum
        mx.eval(state, step_loss, acc)
        heartbeat()
    tokens = sum(num_input_tokens([train_set[i] for i in b]) for b in batches)
    return step_loss, step_targets, tokens, norm


@dataclass
class _Run:
    """What the loop's steps, validations and saves share, so each can be a function of its own."""

    model: nn.Module
    optimizer: optim.Optimizer
    args: TrainingArgs
    out_dir: Path
    group: mx.distributed.Group
    meta: dict[str, Any]  # the checkpoint's record: step, trained tokens, args, world size
    metrics: MetricsLog
    bar: TrainProgress
    weights_file: str
    loss: Callable
    val_set: Sequence[Example] | None
    on_save: Callable[[Path, int], None] | None
    last: dict[str, Any]  # the figures `train` returns, updated at each report and validation

    @property
    def validates(self) -> bool:
        return self.val_set is not None and len(self.val_set) > 0 and self.args.steps_per_eval > 0

    def save(self, step_no: int) -> None:
        self.meta.update(step=step_no, args=asdict(self.args), world_size=self.group.size())
        if self.group.rank() == 0:
            keep = self.args.keep_checkpoints
            save_checkpoint(
                self.out_dir, self.weights_file, self.model, self.optimizer, self.meta, keep
            )
            heartbeat()
            if self.on_save is not None:
                self.on_save(self.out_dir, step_no)

    def validate(self, step_no: int) -> None:
        a = self.args
        val = evaluate(self.model, self.val_set, a.batch_size, a.val_batches, self.loss, self.group)
        self.metrics.write({"step": step_no, "val_loss": val})
        self.bar.print(f"step {step_no}: val loss {val:.3f}")
        self.last["val_loss"] = val


def _loop(
    run: _Run,
    step: Callable,
    state: list,
    train_set: Sequence[Example],
    start: int,
    stop: _StopRequest,
    on_step: Callable[[int, dict[str, Any]], None] | None,
) -> None:
    """Optimizer steps from `start` to the end, each followed by what falls due at it (report,
    validation, save), and a stop that every rank takes at the same step."""
    args, world = run.args, run.group.size()
    if run.validates and start == 0:
        run.validate(0)
    window = Window()
    for it in range(start, args.iters):
        tic = time.perf_counter()
        step_loss, step_targets, tokens, norm = _optimizer_step(
            step, state, train_set, args, it, run.group
        )
        votes = mx.array(float(stop.requested))
        if world > 1:  # one small all-reduce: the global loss for the bar, and stop together
            step_loss, votes = mx.distributed.all_sum(mx.stack([step_loss, votes]))
        window.add(step_loss, step_targets, tokens)
        window.time += time.perf_counter() - tic
        run.meta["trained_tokens"] += window.last_tokens
        step_no = it + 1
        lr = run.optimizer.learning_rate.item()
        run.bar.update(
            step_no, window.mean_loss(), lr, window.tokens_per_sec(), mx.get_peak_memory()
        )
        if step_no % args.steps_per_report == 0 or step_no == args.iters:
            run.last.update(report_window(run.metrics, run.bar, window, step_no, lr, norm.item()))
            window = Window()
        if run.validates and (step_no % args.steps_per_eval == 0 or step_no == args.iters):
            run.validate(step_no)
        if on_step is not None:
            on_step(
                step_no, {"loss": step_loss.item() / max(step_targets, 1.0), "learning_rate": lr}
            )
        # Stop together, or the others would wait in a collective (Ctrl-C may reach only
        # some ranks: on other machines, none).
        stopping = stop.requested if world == 1 else votes.item() > 0
        if step_no % args.steps_per_save == 0 or step_no == args.iters or stopping:
            run.save(step_no)
        if stopping:
            run.bar.print(
                f"interrupted at step {step_no}: saved to {run.out_dir}; continue with --resume"
            )
            raise KeyboardInterrupt


def train(
    model: nn.Module,
    train_set: Sequence[Example],
    val_set: Sequence[Example] | None,
    out_dir: str | Path,
    args: TrainingArgs | None = None,
    *,
    loss: Callable = masked_loss,
    weights_file: str = "adapters.safetensors",
    resume: bool = False,
    on_save: Callable[[Path, int], None] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model`'s trainable parameters on tokenised examples.

    Args:
        model: the model; frozen parameters stay as they are.
        train_set: tokenised examples (`data.tokenize`), packed chunks for pretraining.
        val_set: validation examples, or None.
        out_dir: where checkpoints, the latest weights, `metrics.jsonl` and the loss curve go.
        args: the `TrainingArgs`.
        loss: `loss(model, inputs, targets, mask) -> (summed loss, target count)`.
        weights_file: the name of the trainable weights inside `out_dir` and each checkpoint.
        resume: continue from the newest checkpoint in `out_dir`, ending as an uninterrupted run.
        on_save: called as `on_save(out_dir, step)` on rank 0 after each save.
        on_step: called as `on_step(step, info)` after each optimizer step (tests, callbacks).
        progress: show the live bar.

    Returns:
        The last figures: `step`, `train_loss`, `val_loss` (None when not validating),
        `trained_tokens` and `tokens_per_sec`.
    """
    args = args or TrainingArgs()
    out_dir = Path(out_dir)
    group = mx.distributed.init()
    writer = group.rank() == 0
    optimizer = make_optimizer(args)
    meta = _start(model, optimizer, train_set, out_dir, args, weights_file, resume, group)
    start = meta["step"]
    metrics = MetricsLog(out_dir / METRICS if writer else None, start if resume else None)
    if not resume and writer:
        (out_dir / METRICS).unlink(missing_ok=True)
    step, state = _compiled_step(model, optimizer, loss, args)
    last: dict[str, Any] = {"train_loss": float("nan"), "val_loss": None, "tokens_per_sec": 0.0}
    if start >= args.iters:
        if writer:
            log.info("%s already finished its %d steps: nothing to resume", out_dir, args.iters)
        return {"step": start, "trained_tokens": meta["trained_tokens"], **last}
    model.train()
    bar = TrainProgress(args.iters, start, enabled=progress and writer)
    run = _Run(model, optimizer, args, out_dir, group, meta, metrics, bar, weights_file, loss,
               val_set, on_save, last)  # fmt: skip
    blocks = keyed_blocks(type(model.layers[0]), args.grad_checkpoint)
    with bar, _StopRequest(bar) as stop, blocks, guard(group):
        _loop(run, step, state, train_set, start, stop, on_step)
    if writer:
        note = plot_loss_curve(out_dir / METRICS, out_dir / LOSS_CURVE)
        if note:
            bar.print(note)
    return {"step": args.iters, "trained_tokens": meta["trained_tokens"], **last}
