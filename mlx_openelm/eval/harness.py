"""`mlx-openelm eval`: lm-evaluation-harness tasks on an MLX OpenELM model, with a JSON report."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingDependency, UserError
from ..tasks import LOCAL_TASKS, TASKS_DIR
from .report import describe_model, write_report
from .scoring import ScoreStats

INSTALL_HINT = (
    "lm-evaluation-harness is not installed: pip install 'mlx-openelm[eval]' "
    "(or pip install 'lm-eval>=0.4.5')"
)


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingDependency(INSTALL_HINT) from None


def task_manager(tasks: Sequence[str]):
    """lm-eval's TaskManager with our local tasks; lm-eval's own ~15k configs only when needed
    (scanning them takes half a minute)."""
    from lm_eval.tasks import TaskManager

    local = all(t in LOCAL_TASKS for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"Unknown task(s): {', '.join(unknown)}. Offline: {', '.join(LOCAL_TASKS)}; "
            "lm-eval's own tasks (arc_easy, arc_challenge, boolq, hellaswag, piqa, sciq, "
            "winogrande, ...) download their data from the Hub; `lm-eval ls tasks` lists them"
        )
    return manager


@dataclass
class _Run:
    """One call's lm-eval settings, which the report repeats beside the results."""

    tasks: list[str]
    limit: int | None
    num_fewshot: int | None
    seed: int
    log_samples: bool


def _task_names(
    tasks: Sequence[str] | str, limit: int | None, num_fewshot: int | None, batch_size: int
) -> list[str]:
    """The task list, once the options are checked: before lm-eval's slow import and the model."""
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    tasks = [t for t in tasks if t]
    if not tasks:
        raise UserError("Name at least one task, e.g. --tasks hellaswag_local")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    return tasks


def _run_tasks(lm: Any, manager: Any, run: _Run) -> tuple[dict[str, Any], float]:
    """lm-eval's results and the seconds they took; every seed is `run.seed`, so runs repeat."""
    import lm_eval

    tic = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=run.tasks,
        num_fewshot=run.num_fewshot,
        limit=run.limit,
        task_manager=manager,
        log_samples=run.log_samples,
        random_seed=run.seed,
        numpy_random_seed=run.seed,
        torch_random_seed=None,  # nothing here uses torch
        fewshot_random_seed=run.seed,
    )
    return results, time.perf_counter() - tic


def _report(lm: Any, run: _Run, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The results with what they depend on (settings, model, versions) and the speed."""
    items = sum(n["effective"] for n in results["n-samples"].values())
    report = {
        "tasks": run.tasks,
        "results": results["results"],
        "groups": results.get("groups", {}),
        "n_samples": results["n-samples"],
        "num_fewshot": run.num_fewshot,
        "limit": run.limit,
        "batch_size": lm.batch_size,
        "max_length": lm.max_length,
        **describe_model(lm.model, lm.path, lm.adapter_path),
        "speed": {
            "seconds": round(seconds, 3),
            "items": items,
            "items_per_s": round(items / max(seconds, 1e-9), 3),
            "scoring": lm.stats.as_dict(),
        },
    }
    if run.log_samples:
        report["samples"] = results["samples"]
    return report


def _print_summary(results: dict[str, Any], report: dict[str, Any], seconds: float) -> None:
    """lm-eval's table on stdout; the speed on stderr, so that the table can be piped alone."""
    from lm_eval.utils import make_table

    print(make_table(results))
    speed = report["speed"]
    sc = speed["scoring"]
    print(
        f"{speed['items']} items in {seconds:.1f} s: {speed['items_per_s']:.2f} items/s "
        f"(scoring {sc['requests_per_s']:.1f} requests/s, {sc['tokens_per_s']:.0f} tokens/s)",
        file=sys.stderr,
    )


def evaluate(
    model: str,
    tasks: Sequence[str] | str,
    *,
    adapter_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    output: str | Path | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    verbose: bool = True,
    lm: Any = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on a model and return (and optionally write) the report.

    Args:
        model: the MLX model folder or Hub repo id.
        tasks: lm-eval task names (a list or comma-separated); `hellaswag_local` runs offline.
        adapter_path: a LoRA/DoRA adapter folder to apply.
        limit: score only the first N items of each task (for a quick look; not comparable).
        num_fewshot: examples in each prompt (the paper's figures are zero-shot).
        batch_size: sequences per forward pass.
        max_length: the scoring window (default: the model's context window).
        output: write the report here as JSON.
        seed: lm-eval's random seeds (few-shot sampling).
        log_samples: keep lm-eval's per-item records under "samples".
        verbose: print lm-eval's table and the speed.
        lm: an `MLXOpenELM` backend to use instead of loading `model`.

    Returns:
        The report: per-task metrics, item counts, the model (folder, adapter, dtype, bits),
        versions, and speed (items/s and the scorer's requests/s and tokens/s).
    """
    tasks = _task_names(tasks, limit, num_fewshot, batch_size)
    run = _Run(tasks, limit, num_fewshot, seed, log_samples)
    require_lm_eval()
    from .lm import MLXOpenELM

    manager = task_manager(tasks)  # before loading the model: a typo fails fast
    if lm is None:
        lm = MLXOpenELM(
            model=str(model),
            adapter_path=None if adapter_path is None else str(adapter_path),
            batch_size=batch_size,
            max_length=max_length,
        )
    lm.stats = ScoreStats()  # this run's figures only
    results, seconds = _run_tasks(lm, manager, run)
    report = _report(lm, run, results, seconds)
    write_report(report, output)
    if verbose:
        _print_summary(results, report, seconds)
    return report
