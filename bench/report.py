"""The bench report: a terminal table like the paper's Table 7, ratios, roofline, and a PNG plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mlx_openelm.errors import MissingDependency


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    # A pipe or a file gets a wide table rather than rich's 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    results, settings = report["results"], report["settings"]
    table = Table(
        title=f"OpenELM {report['model']} ({report['parameters'] / 1e6:.1f}M): batch 1, greedy, "
        f"KV cache, {settings['gen_tokens']} generated, median ± std of {settings['trials']}"
        + (" (interleaved rounds)" if settings.get("interleave") else "")
    )
    columns = ("implementation", "backend", "dtype", "prompt", "prefill tok/s", "decode tok/s",
               "TTFT s", "peak memory", "peak RSS", "checked")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in columns[:3] else "right")
    for r in results:
        checked = f"{r['checked_tokens']} tok" if "checked_tokens" in r else "-"
        table.add_row(
            r["implementation"], r["backend"], r["dtype"], str(r["prompt_tokens"]),
            _spread(r, "prefill_tps", 1), _spread(r, "decode_tps", 2), f"{r['ttft_s']:.3f}",
            _gib(r["peak_memory_bytes"]), _gib(r["peak_rss_bytes"]), checked,
        )  # fmt: skip
    console.print(table)
    console.print(
        "peak memory: MLX allocator peak (MLX rows), process peak RSS (PyTorch on CPU, llama.cpp)"
    )
    kernel_rows = {r["implementation"]: r["kernels"] for r in results if r.get("kernels")}
    for impl, state in kernel_rows.items():
        console.print(f"{impl}: native CPU kernels {state}")
    for r in results:
        if "llama_bench" in r and r["prompt_tokens"] == results[-1]["prompt_tokens"]:
            lb = r["llama_bench"]
            console.print(
                f"{r['implementation']}: llama-bench {lb['build']}, {lb['model_type']}, KV cache "
                f"{lb['type_k']}, {r['threads']} threads; prefill = pp N, decode = tg "
                f"{settings['gen_tokens']} at depth N; flash attention {_on_off(lb, 'prefill')} "
                f"for prefill, {_on_off(lb, 'decode')} for decode (the faster)"
            )
    for ratio in report["ratios"]:
        console.print(
            f"mlx-openelm / {ratio['implementation']} @ prompt {ratio['prompt_tokens']}: "
            f"prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x"
        )
    roof = report["roofline"]
    kernels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in roof["bandwidth_by_kernel"].items())
    console.print(
        f"roofline: {roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read bandwidth (best of: "
        f"{kernels} GB/s), {roof['weight_bytes'] / 1e9:.2f} GB of weights per token"
    )
    for p in roof["per_prompt"]:
        console.print(
            f"  prompt {p['prompt_tokens']}: bound {p['decode_tps_bound']:.1f} tok/s, "
            f"mlx-openelm decode {p['mlx_openelm_decode_tps']:.2f} tok/s = {p['fraction']:.0%}"
        )
    machine = report["machine"]
    if "load_average_start" in machine:
        start = ", ".join(f"{x:.2f}" for x in machine["load_average_start"])
        end = ", ".join(f"{x:.2f}" for x in machine.get("load_average_end", []))
        console.print(
            f"machine: {machine['cpu']} x{machine['cpu_count']}, MLX BLAS {machine['mlx_blas']}; "
            f"load average at start {start}, at end {end}"
        )


def _on_off(llama_bench: dict[str, Any], test: str) -> str:
    fa = llama_bench.get("flash_attn", {}).get(test)  # reports older than the choice lack it
    return "?" if fa is None else "on" if fa else "off"


def _spread(r: dict[str, Any], key: str, digits: int) -> str:
    std = r.get(f"{key}_std")
    return f"{r[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency("--plot needs matplotlib: pip install matplotlib") from None


def plot(report: dict[str, Any], path: Path) -> None:
    """tok/s against prompt length, prefill and decode side by side, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    impls = dict.fromkeys((r["implementation"], r["backend"]) for r in report["results"])
    for ax, key, title in zip(
        axes, ("prefill_tps", "decode_tps"), ("prefill", "decode"), strict=True
    ):
        for impl, backend in impls:
            rows = sorted(
                (r["prompt_tokens"], r[key], r.get(f"{key}_std", 0.0))
                for r in report["results"]
                if (r["implementation"], r["backend"]) == (impl, backend)
            )
            x, y, err = zip(*rows, strict=True)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{impl} ({backend})")
        ax.set(xlabel="prompt tokens", ylabel="tokens/s", title=title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    bounds = [(p["prompt_tokens"], p["decode_tps_bound"]) for p in report["roofline"]["per_prompt"]]
    axes[1].plot(*zip(*bounds, strict=True), "k--", label="bandwidth roofline")
    # One legend for both panels, beside them, so no line hides under it.
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1, 0.5),
               fontsize=8)  # fmt: skip
    s = report["settings"]
    fig.suptitle(f"OpenELM {report['model']}, {s['dtype']}, {s['gen_tokens']} generated, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---- `bench-serve`: concurrent clients against servers ------------------------------------------


def print_serve_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    s = report["settings"]
    table = Table(
        title=f"{report['model']} ({report['dtype']}) served: prompt {s['prompt_tokens']} tokens, "
        f"{s['max_tokens']} out, {s['requests_per_client']} requests per client, streamed, "
        f"median of {s['rounds']} round(s), servers alternating"
    )
    for col in ("server", "clients", "aggregate tok/s", "TTFT p50 / p95 ms", "ITL p50 / p95 ms"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in report["results"]:
        table.add_row(
            r["server"], str(r["clients"]), f"{r['aggregate_tok_s']:.1f}",
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f}",
            f"{r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f}",
        )  # fmt: skip
    console.print(table)
    for ratio in report["ratios"]:
        if "to" in ratio:
            console.print(
                f"{ratio['of']} / {ratio['to']} @ {ratio['clients']} clients: aggregate "
                f"{ratio['aggregate']:.2f}x, TTFT p50 {ratio['ttft_p50']:.2f}x"
            )
        else:
            console.print(f"{ratio['of']}: {ratio['scaling']}: {ratio['aggregate']:.2f}x")
    m = report["machine"]
    start = ", ".join(f"{x:.2f}" for x in m.get("load_average_start", []))
    end = ", ".join(f"{x:.2f}" for x in m.get("load_average_end", []))
    console.print(f"machine: {m['cpu']} x{m['cpu_count']}, MLX BLAS {m['mlx_blas']}; load "
                  f"average at start {start}, at end {end}")  # fmt: skip


def serve_plot(report: dict[str, Any], path: Path) -> None:
    """Aggregate tok/s, TTFT p50 and ITL p50 against concurrent clients, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("aggregate_tok_s", "aggregate output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
              ("itl_p50_ms", "inter-token latency p50 (ms)"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for server in dict.fromkeys(r["server"] for r in report["results"]):
            rows = sorted((r["clients"], r[key]) for r in report["results"]
                          if r["server"] == server)  # fmt: skip
            ax.plot(*zip(*rows, strict=True), marker="o", label=server)
        ax.set(xlabel="concurrent clients", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"{report['model']} ({report['dtype']}) served: prompt {s['prompt_tokens']}, "
                 f"{s['max_tokens']} out per request")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save(report: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None,
         draw: Callable[[dict[str, Any], Path], None]) -> None:  # fmt: skip
    """Write a report's JSON and its plot (drawn by `draw`) where asked."""
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if plot_path:
        draw(report, Path(plot_path))
