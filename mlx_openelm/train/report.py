"""What a training run shows and leaves behind: a live bar, `metrics.jsonl`, a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """A rich bar with step, loss, learning rate, tokens/s and peak memory (rank 0 only)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.console = Console(stderr=True, quiet=not enabled)
        self._progress = Progress(
            TextColumn("[bold blue]step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn(
                "loss {task.fields[loss]} · lr {task.fields[lr]:.2e} · "
                "{task.fields[tps]:,.0f} tok/s · peak {task.fields[mem]:.2f} GB"
            ),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=start, loss="-", lr=0.0, tps=0.0, mem=0.0
        )

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tps: float, peak_bytes: int) -> None:
        self._progress.update(
            self._task, completed=step, loss=f"{loss:.3f}", lr=lr, tps=tps, mem=peak_bytes / 1e9
        )

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)


class MetricsLog:
    """Appends one JSON object per report to `metrics.jsonl`; does nothing when `path` is None."""

    def __init__(self, path: Path | None, resume_step: int | None = None):
        self.path = path
        if path is not None and resume_step is not None and path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be logged again.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_loss_curve(metrics: Path, png: Path) -> str | None:
    """Draw train and validation loss against step; returns a note when it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss curve skipped: matplotlib is not installed (pip install matplotlib)"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return None


class Window:
    """Loss, tokens and time since the last report."""

    def __init__(self) -> None:
        self.loss, self.targets = mx.array(0.0), 0.0  # all ranks together
        self.tokens, self.last_tokens, self.time = 0, 0, 0.0

    def add(self, loss: mx.array, targets: float, tokens: int) -> None:
        self.loss, self.targets = self.loss + loss, self.targets + targets
        self.tokens, self.last_tokens = self.tokens + tokens, tokens

    def mean_loss(self) -> float:
        return self.loss.item() / self.targets if self.targets else float("nan")

    def tokens_per_sec(self) -> float:
        # Tokens of the whole global batch over rank 0's time: the sum of the ranks' rates.
        return self.tokens / max(self.time, 1e-9)


def report_window(
    metrics: MetricsLog, bar: TrainProgress, window: Window, step_no: int, lr: float, norm: float
) -> dict[str, float]:
    """Write the train figures of the last window to the log and the bar; returns them."""
    figures = {"train_loss": window.mean_loss(), "tokens_per_sec": window.tokens_per_sec()}
    metrics.write(
        {
            "step": step_no,
            "train_loss": figures["train_loss"],
            "learning_rate": lr,
            "tokens_per_sec": figures["tokens_per_sec"],
            "peak_memory_bytes": mx.get_peak_memory(),
            "grad_norm": norm,
        }
    )
    bar.print(
        f"step {step_no}: train loss {figures['train_loss']:.3f}, lr {lr:.2e}, "
        f"{figures['tokens_per_sec']:,.0f} tok/s, peak {mx.get_peak_memory() / 1e9:.2f} GB"
    )
    return figures
