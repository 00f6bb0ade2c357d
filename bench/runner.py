"""`mlx-openelm bench`: prepare one set of weights, time every implementation on it, report."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .bench import CHECK_TOKENS, machine_info, measure_bandwidth, run_worker

DTYPES = ("float32", "float16", "bfloat16")


def uniform_twin(args):
    """A Llama/OLMo-like twin: every layer the same width, parameter count as close as it gets."""
    from mlx_openelm.config import ModelArgs

    base = args.to_dict()
    q_mid = sum(args.qkv_multipliers) / len(args.qkv_multipliers)
    best = None
    for k in range(1, 64):
        ffn = k * args.ffn_dim_divisor / args.model_dim
        cand = ModelArgs.from_dict(
            {**base, "num_query_heads": None, "num_kv_heads": None,
             "qkv_multipliers": q_mid, "ffn_multipliers": ffn}
        )  # fmt: skip
        gap = abs(cand.num_parameters() - args.num_parameters())
        if best is None or gap < best[0]:
            best = (gap, cand)
    return best[1]


def _random_folder(args, folder: Path, seed: int) -> Path:
    import mlx_openelm
    import mlx.core as mx  # noqa: I001

    mx.random.seed(seed)
    model = mlx_openelm.Model(args)
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    mlx_openelm.save_model(folder, model, args)
    return folder


def weight_bytes(args, dtype: str, q_bits: int | None) -> int:
    """Bytes read per decode step: every weight once (the tied embedding is read by the head)."""
    n = args.num_parameters()
    if q_bits:
        return int(n * (q_bits / 8 + 4 / 64))  # + an fp16 scale and bias per group of 64
    return n * (4 if dtype == "float32" else 2)


def check_agreement(results: list[dict[str, Any]]) -> None:
    """fp32 implementations must emit the same first greedy tokens; a fast wrong one can't win."""
    by_len: dict[int, dict[str, list[int]]] = {}
    for r in results:
        if r["dtype"] == "float32" and "uniform" not in r["implementation"]:
            by_len.setdefault(r["prompt_tokens"], {})[r["implementation"]] = r["tokens"]
    for n, toks in by_len.items():
        first = next(iter(toks.values()))
        bad = [name for name, t in toks.items() if t != first]
        if bad:
            raise ValueError(
                f"prompt {n}: {', '.join(bad)} generated {[toks[b] for b in bad]} but "
                f"{next(iter(toks))} generated {first}: refusing to compare a wrong implementation"
            )


def bench(
    model: str | None = None,
    preset: str | None = None,
    prompt_tokens: list[int] = (128, 512),
    gen_tokens: int = 128,
    dtype: str = "float32",
    q_bits: int | None = None,
    reference: str = "torch",
    reference_device: str = "auto",
    mlx_lm: bool = True,
    study: bool = False,
    trials: int = 3,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time prefill and decode for mlx-openelm, mlx-lm and the PyTorch reference on the same weights."""
    from mlx_openelm.config import ModelArgs
    from mlx_openelm.config import preset as preset_args

    if (model is None) == (preset is None):
        raise ValueError("give exactly one of --model or --preset")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if gen_tokens < 2 or trials < 1 or not prompt_tokens or min(prompt_tokens) < 1:
        raise ValueError("need --gen-tokens >= 2, --trials >= 1 and positive --prompt-tokens")
    if reference not in ("torch", "none"):
        raise ValueError(f"--reference must be torch or none, got {reference!r}")
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="mlx-openelm-bench-") as tmp:
        if preset is not None:
            args = preset_args(preset)
            console.print(f"[bold]random weights of the {preset} preset ({args.num_parameters():,} parameters)")
            folder = _random_folder(args, Path(tmp) / "model", seed)
        else:
            from mlx_openelm import hub

            folder = hub.resolve(model, ["*.json", "*.safetensors"])
            args = ModelArgs.from_file(folder / "config.json")
        too_long = max(prompt_tokens) + gen_tokens - args.max_context_length
        if too_long > 0:
            raise ValueError(f"prompt + generated tokens exceed the context ({args.max_context_length})")
        quantised_source = "quantization" in json.loads((folder / "config.json").read_text())
        common = dict(folder=str(folder), dtype=dtype, dtype_name=f"{q_bits}-bit" if q_bits else dtype,
                      q_bits=q_bits, prompt_tokens=list(prompt_tokens), gen_tokens=gen_tokens,
                      trials=trials, vocab_size=args.vocab_size, device=reference_device)  # fmt: skip
        specs = [{**common, "implementation": "mlx-openelm"}]
        if mlx_lm:
            specs.append({**common, "implementation": "mlx-lm"})
        if study:
            specs.append({**common, "implementation": "mlx-openelm-naive-rmsnorm"})
            twin = uniform_twin(args)
            twin_folder = _random_folder(twin, Path(tmp) / "uniform", seed)
            specs.append({**common, "implementation": "mlx-openelm-uniform", "folder": str(twin_folder)})
        if reference == "torch":
            if q_bits or quantised_source:
                console.print("[yellow]no PyTorch reference for quantised weights: skipped")
            else:
                try:
                    import torch  # noqa: F401
                except ImportError:
                    raise ImportError(
                        "the PyTorch reference needs torch: pip install 'mlx-openelm[reference]' "
                        "(or pass --reference none)"
                    ) from None
                specs.append({**common, "implementation": "torch-reference"})
        results = []
        for spec in specs:
            console.print(f"running {spec['implementation']} ...")
            results.extend(run_worker(spec))
    check_agreement(results)
    bandwidth = measure_bandwidth()
    wbytes = weight_bytes(args, dtype, q_bits)
    roofline = {
        "bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": wbytes,
        "decode_tps_bound": bandwidth / wbytes,
    }
    report = {
        "model": model or f"preset:{preset}",
        "parameters": args.num_parameters(),
        "machine": machine_info(),
        "roofline": roofline,
        "results": results,
    }
    print_report(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if plot_path:
        plot(report, Path(plot_path))
    return report


def _ratio(results, impl_a, impl_b, key) -> str:
    rows = {(r["implementation"], r["prompt_tokens"]): r[key] for r in results}
    out = []
    for n in sorted({r["prompt_tokens"] for r in results}):
        if (impl_a, n) in rows and (impl_b, n) in rows:
            out.append(f"{rows[(impl_a, n)] / rows[(impl_b, n)]:.2f}x @{n}")
    return ", ".join(out)


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    table = Table(title=f"OpenELM {report['model']}: batch 1, greedy, KV cache (median)")
    for col in ("implementation", "backend", "dtype", "prompt", "prefill tok/s", "decode tok/s", "TTFT s", "peak mem"):
        table.add_column(col, justify="left" if col in ("implementation", "backend", "dtype") else "right")  # fmt: skip
    for r in results:
        table.add_row(r["implementation"], r["backend"], r["dtype"], str(r["prompt_tokens"]),
                      f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}", f"{r['ttft_s']:.3f}",
                      f"{r['peak_memory_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    console = Console()
    console.print(table)
    for other in ("torch-reference", "mlx-lm", "mlx-openelm-naive-rmsnorm", "mlx-openelm-uniform"):
        for key in ("prefill_tps", "decode_tps"):
            if line := _ratio(results, "mlx-openelm", other, key):
                console.print(f"mlx-openelm / {other} {key.split('_')[0]}: {line}")
    roof = report["roofline"]
    decode = statistics.median(r["decode_tps"] for r in results if r["implementation"] == "mlx-openelm")
    console.print(
        f"roofline: {roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured, "
        f"{roof['weight_bytes'] / 1e9:.2f} GB of weights per token -> {roof['decode_tps_bound']:.1f} tok/s "
        f"bound; mlx-openelm decode reached {decode / roof['decode_tps_bound']:.0%}"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    impls = dict.fromkeys(r["implementation"] for r in report["results"])
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps"), ("prefill", "decode")):
        for impl in impls:
            rows = sorted((r["prompt_tokens"], r[key]) for r in report["results"] if r["implementation"] == impl)
            ax.plot(*zip(*rows), marker="o", label=impl)
        ax.set(xlabel="prompt tokens", ylabel="tokens/s", title=title, xscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"OpenELM {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
