"""`mlx-openelm bench`: prepare one set of weights, time every implementation on it, report."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from mlx_openelm.errors import MissingDependency, UserError

from . import llama_cpp as llama
from .bench import BLAS_ENV, run_worker
from .machine import machine_info, measure_bandwidth
from .report import plot, print_report, require_matplotlib, save
from .weights import random_folder, uniform_twin

DTYPES = ("float32", "float16", "bfloat16")
Q_BITS = (2, 3, 4, 5, 6, 8)
# Where the baseline's top-1 and top-2 log-probabilities are closer than this, fp32 rounding may
# legitimately flip the greedy token: tokens are compared up to the first such position. With
# `random_weights`, MLX and PyTorch fp32 log-probabilities of the 270M differ by ~1e-4 at most.
MARGIN_TOL = 2e-3
BASELINES = ("torch-reference", "mlx-openelm")
UNIFORM = "mlx-openelm-uniform"  # other weights: its tokens are not compared


# ---- roofline ------------------------------------------------------------------------------------


def weight_bytes(args: Any, dtype: str, q_bits: int | None) -> int:
    """Weight bytes read per decode step: every weight once (the tied embedding by the head)."""
    n = args.num_parameters()
    size = 4 if dtype == "float32" else 2
    if q_bits:
        return int(n * (q_bits / 8 + 2 * size / 64))  # + a scale and a bias per group of 64
    return n * size


def folder_bits(folder: Path) -> int | None:
    """The bits of a quantised model folder's weights (None when they are float)."""
    quantization = json.loads((folder / "config.json").read_text()).get("quantization")
    return quantization["bits"] if quantization else None


def kv_bytes(args: Any, positions: float, dtype: str) -> float:
    """KV-cache bytes read per decode step with `positions` cached."""
    size = 4 if dtype == "float32" else 2
    return positions * sum(2 * nkv * args.head_dim * size for nkv in args.num_kv_heads)


# ---- the token check -----------------------------------------------------------------------------


def check_agreement(results: list[dict[str, Any]], tol: float = MARGIN_TOL) -> None:
    """Refuse rows whose fp32 greedy tokens differ from the baseline's (PyTorch, else mlx-openelm).

    Tokens are compared up to the first position where the baseline's top-2 margin is below `tol`
    (a near-tie). Each row gets `checked_tokens` (how many were compared) and `checked_against`;
    a row that ran no check (llama.cpp without llama-completion, or not f32) is left out.
    """
    for n in sorted({r["prompt_tokens"] for r in results}):
        rows = {r["implementation"]: r for r in results if r["prompt_tokens"] == n}
        rows.pop(UNIFORM, None)
        base_name = next((b for b in BASELINES if b in rows), None)
        if base_name is None:
            continue
        base = rows[base_name]
        margins = base["check_margins"]
        k = next((i for i, m in enumerate(margins) if m < tol), len(margins))
        want = base["check_tokens"][:k]
        for name, row in rows.items():
            if not row["check_tokens"] and name != base_name:
                continue
            got = row["check_tokens"][:k]
            if got != want:
                i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
                raise UserError(
                    f"prompt {n}: {name} generated {got} but {base_name} generated {want} "
                    f"(first difference at token {i}): refusing to compare a wrong implementation"
                )
            row["checked_tokens"], row["checked_against"] = k, base_name


def merge_trials(merged: dict[tuple[str, int], dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Fold one round's rows into `merged` (keyed by implementation and prompt length): trials
    are pooled and the medians (and the mean and std beside them) recomputed; peak memory is the
    highest seen; the check is round 1's.
    """
    for row in rows:
        key = (row["implementation"], row["prompt_tokens"])
        if key not in merged:
            merged[key] = row
            _spread(row)
            continue
        m = merged[key]
        for name in ("prefill_tps", "decode_tps", "ttft_s"):
            m[f"{name}_trials"] += row[f"{name}_trials"]
            m[name] = statistics.median(m[f"{name}_trials"])
        _spread(m)
        m["trials"] = len(m["prefill_tps_trials"])
        m["peak_memory_bytes"] = max(m["peak_memory_bytes"], row["peak_memory_bytes"])
        rss = [x for x in (m["peak_rss_bytes"], row["peak_rss_bytes"]) if x is not None]
        m["peak_rss_bytes"] = max(rss) if rss else None


def _spread(row: dict[str, Any]) -> None:
    for name in ("prefill_tps", "decode_tps"):
        trials = row[f"{name}_trials"]
        row[f"{name}_mean"] = statistics.fmean(trials)
        row[f"{name}_std"] = statistics.stdev(trials) if len(trials) > 1 else 0.0


# ---- the command ---------------------------------------------------------------------------------


def parse_lengths(lengths: Sequence[int] | str) -> list[int]:
    """[128, 512] or "128,512" -> [128, 512]."""
    if isinstance(lengths, str):
        try:
            return [int(x) for x in lengths.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(
                f"--prompt-tokens must be comma-separated lengths like 128,512, got {lengths!r}"
            ) from None
    return [int(n) for n in lengths]


def _validate(model, preset, config, prompt_tokens, gen_tokens, dtype, q_bits, reference,
              reference_device, reference_model, trials, json_path, plot_path,
              llama_cpp) -> dict[str, str | None] | None:  # fmt: skip
    if sum(x is not None for x in (model, preset, config)) != 1:
        raise UserError("give exactly one of --model, --preset or --config")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise UserError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {q_bits}")
    if not prompt_tokens or min(prompt_tokens) < 1:
        raise UserError(f"--prompt-tokens must be positive lengths, got {list(prompt_tokens)}")
    if gen_tokens < 2:
        raise UserError(f"--gen-tokens must be at least 2 (decode needs two), got {gen_tokens}")
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if reference not in ("torch", "none"):
        raise UserError(f"--reference must be torch or none, got {reference!r}")
    if reference_device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--reference-device must be auto, cpu or cuda, got {reference_device!r}")
    if reference_model is not None and reference != "torch":
        raise UserError(
            "--reference-model is for the PyTorch reference: it needs --reference torch"
        )
    if reference == "torch" and q_bits:
        raise UserError(
            "the PyTorch reference runs unquantised weights only: drop --quantize or pass "
            "--reference none"
        )
    for path, flag in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{flag}: folder {Path(path).parent} does not exist")
    if plot_path is not None:
        require_matplotlib()
    if reference == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MissingDependency(
                "the PyTorch reference needs torch: pip install 'mlx-openelm[reference]' "
                "(or pass --reference none)"
            ) from None
    if llama_cpp is None:
        return None
    from mlx_openelm.export.gguf import require_gguf

    llama.gguf_type(dtype, q_bits)  # refuses a bit width llama.cpp has no type for
    require_gguf()
    return llama.find_tools(llama_cpp)


def _other_blas(loaded: str | None) -> list[str]:
    """Linux CPU: the optimised BLAS libraries present here that MLX is not using now."""
    import mlx.core as mx  # this package's import has already picked the BLAS

    from mlx_openelm._blas import CANDIDATES

    if mx.metal.is_available() or mx.cuda.is_available():
        return []  # the matmuls run on the GPU
    return [
        name
        for name, paths in CANDIDATES.items()
        if not any(p == loaded for p in paths)
        and any(Path(p).is_file() for p in paths if p.startswith("/"))
    ]


def _resolve(model, preset, config) -> tuple[Path | None, Any, str]:
    """(folder or None for random weights, its ModelArgs, a name for the report)."""
    from mlx_openelm.config import ModelArgs
    from mlx_openelm.config import preset as preset_args

    if preset is not None:
        return None, preset_args(preset), f"preset:{preset}"
    if config is not None:
        return None, ModelArgs.from_file(config), f"config:{config}"
    from mlx_openelm import hub

    folder = hub.resolve(model, ["*.json", "*.safetensors"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it an MLX model folder?")
    return folder, ModelArgs.from_file(folder / "config.json"), str(model)


def bench(
    model: str | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    prompt_tokens: Sequence[int] | str = (128, 512),
    gen_tokens: int = 128,
    dtype: str = "float32",
    q_bits: int | None = None,
    reference: str = "torch",
    reference_device: str = "auto",
    reference_model: str | None = None,
    mlx_lm: bool = True,
    study: bool = False,
    trials: int = 3,
    interleave: bool = True,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
    bandwidth_bytes: int = 2**30,
    llama_cpp: str | Path | None = None,
    kernels_ab: bool = False,
) -> dict[str, Any]:
    """Time prefill and decode of mlx-openelm, mlx-lm and the PyTorch reference on the same weights.

    Args:
        model: an MLX model folder or Hub repo id; or `preset` ("270M", ...) or `config` (a
            config.json) for random weights of that shape, which every side then loads.
        prompt_tokens: prompt lengths (or "128,512"); each gets a row per implementation.
        gen_tokens: tokens generated per run (greedy, batch 1, KV cache).
        dtype: weights dtype for the timed runs; `q_bits` quantises the MLX rows too.
        reference: "torch" adds the PyTorch reference row, "none" leaves it out.
        reference_device: "auto" (CUDA when PyTorch sees one), "cpu" or "cuda".
        reference_model: a Hugging Face folder for the reference (default: the same folder).
        mlx_lm: add mlx-lm's own `openelm` row.
        study: add the naive-RMSNorm and uniform-width rows (the paper's RMSNorm question), and
            on Linux an mlx-openelm row per other optimised BLAS installed (MLX_OPENELM_BLAS).
        trials: timed runs per row; the median is reported.
        interleave: run the trials in rounds, one per row per round (a fresh process each), so
            that a busy spell on a shared machine hits every row alike rather than one.
        json_path, plot_path: where to write the JSON report and the PNG plot.
        seed: random weights' seed.
        bandwidth_bytes: array size for the bandwidth measurement behind the roofline.
        llama_cpp: llama.cpp's build/bin folder (or its llama-bench): adds llama.cpp rows of the
            same weights as GGUF (see llama_cpp.py), in the token check when llama-completion
            is there and the weights are f32.
        kernels_ab: add an mlx-openelm row with the native CPU kernels off (MLX's own ops).

    Returns:
        The report (what the JSON file holds). Raises ValueError when an fp32 check disagrees.
    """
    prompt_tokens = parse_lengths(prompt_tokens)
    tools = _validate(model, preset, config, prompt_tokens, gen_tokens, dtype, q_bits, reference,
                      reference_device, reference_model, trials, json_path, plot_path,
                      llama_cpp)  # fmt: skip
    console = Console(stderr=True)
    machine = machine_info()
    folder, args, name = _resolve(model, preset, config)
    if max(prompt_tokens) + gen_tokens > args.max_context_length:
        raise UserError(
            f"{max(prompt_tokens)} prompt + {gen_tokens} generated tokens exceed the model's "
            f"context of {args.max_context_length}: lower --prompt-tokens or --gen-tokens"
        )
    if folder is not None and reference == "torch":
        if folder_bits(folder):
            raise UserError(
                f"{folder} holds quantised weights, which the PyTorch reference can't run: "
                "pass --reference none (or bench the unquantised folder)"
            )
    if reference_model is not None and not (Path(reference_model) / "config.json").is_file():
        raise FileNotFoundError(f"--reference-model {reference_model} has no config.json")
    with tempfile.TemporaryDirectory(prefix="mlx-openelm-bench-") as tmp:
        if folder is None:
            console.print(f"random weights, {name} shape ({args.num_parameters():,} parameters)")
            folder = random_folder(args, Path(tmp) / "model", seed)
        bits = q_bits or folder_bits(folder)  # what the MLX rows run: --q-bits or the folder's
        common = dict(folder=str(folder), dtype=dtype, q_bits=q_bits, gen_tokens=gen_tokens,
                      prompt_tokens=prompt_tokens, vocab_size=args.vocab_size,
                      dtype_name=f"{bits}-bit/{dtype}" if bits else dtype)  # fmt: skip
        specs = [{**common, "implementation": "mlx-openelm"}]
        if kernels_ab:
            specs.append({**common, "implementation": "mlx-openelm-kernels-off",
                          "env": {"MLX_OPENELM_KERNELS": "0"}})  # fmt: skip
        if reference == "torch":
            specs.append({**common, "implementation": "torch-reference", "device": reference_device,
                          "folder": str(reference_model or folder), "q_bits": None})  # fmt: skip
        if mlx_lm:
            specs.append({**common, "implementation": "mlx-lm"})
        if study:
            twin = uniform_twin(args)
            twin_folder = random_folder(twin, Path(tmp) / "uniform", seed)
            specs.append({**common, "implementation": "mlx-openelm-naive-rmsnorm"})
            specs.append({**common, "implementation": UNIFORM, "folder": str(twin_folder)})
            specs += [{**common, "implementation": f"mlx-openelm-{blas}", "env": {BLAS_ENV: blas}}
                      for blas in _other_blas(machine["mlx_blas"])]  # fmt: skip
        if tools is not None:
            kind = llama.gguf_type(dtype, bits)
            console.print(f"llama.cpp: exporting the weights as a {kind} GGUF ...")
            path = llama.export(folder, Path(tmp) / f"model-{kind}.gguf", kind)
            specs.append({**common, "implementation": llama.NAME, "gguf": str(path),
                          "gguf_type": kind, "tools": tools,
                          "threads": llama.threads()})  # fmt: skip
        results = _run_rounds(specs, trials, interleave, console)
    backend = results[0]["backend"]
    bandwidth = measure_bandwidth(bandwidth_bytes, on_gpu=backend != "cpu")
    report = {
        "model": name,
        "parameters": args.num_parameters(),
        "settings": dict(
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            dtype=dtype,
            q_bits=q_bits,
            trials=trials,
            interleave=interleave,
            reference=reference,
            reference_device=reference_device,
            seed=seed,
            llama_cpp=tools,
        ),
        "machine": machine,
        "roofline": _roofline(args, bandwidth, dtype, bits, gen_tokens, results),
        "ratios": _ratios(results),
        "results": results,
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    if study:
        report["study"] = {
            "uniform_twin": {
                "parameters": twin.num_parameters(),
                "query_heads": twin.num_query_heads,
                "ffn_dims": twin.ffn_dims,
            }
        }
    print_report(report)
    save(report, json_path, plot_path, plot)
    return report


def _run_rounds(specs, trials: int, interleave: bool, console: Console) -> list[dict[str, Any]]:
    rounds, per_round = (trials, 1) if interleave else (1, trials)
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in range(rounds):
        # Round r starts at the r-th row, so no row always runs first or last.
        for spec in specs[r % len(specs) :] + specs[: r % len(specs)]:
            console.print(f"round {r + 1}/{rounds}: {spec['implementation']} ...")
            run = llama.run if spec["implementation"] == llama.NAME else run_worker
            merge_trials(merged, run({**spec, "trials": per_round, "check": r == 0}))
            if r == 0:
                check_agreement(list(merged.values()))  # fail as soon as a row disagrees
    return list(merged.values())


def _roofline(args, bandwidth, dtype, q_bits, gen_tokens, results) -> dict[str, Any]:
    best = max(bandwidth.values())
    wbytes = weight_bytes(args, dtype, q_bits)
    per_prompt = []
    for r in results:
        if r["implementation"] == "mlx-openelm":
            n = r["prompt_tokens"]
            step = wbytes + kv_bytes(args, n + gen_tokens / 2, dtype)
            bound = best / step
            per_prompt.append(
                dict(
                    prompt_tokens=n,
                    bytes_per_token=int(step),
                    decode_tps_bound=bound,
                    mlx_openelm_decode_tps=r["decode_tps"],
                    fraction=r["decode_tps"] / bound,
                )
            )
    return {"bandwidth_bytes_per_s": best, "bandwidth_by_kernel": bandwidth,
            "weight_bytes": wbytes, "per_prompt": per_prompt}  # fmt: skip


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mlx-openelm / each other row, per prompt length, from the same run."""
    mine = {r["prompt_tokens"]: r for r in results if r["implementation"] == "mlx-openelm"}
    out = []
    for r in results:
        m = mine.get(r["prompt_tokens"])
        if m is not None and r is not m:
            out.append(dict(implementation=r["implementation"], prompt_tokens=r["prompt_tokens"],
                            prefill=m["prefill_tps"] / r["prefill_tps"],
                            decode=m["decode_tps"] / r["decode_tps"]))  # fmt: skip
    return out
