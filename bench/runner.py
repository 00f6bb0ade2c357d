"""`mlx-openelm bench`: prepare one set of weights, time every implementation on it, report."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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


@dataclass(frozen=True)
class BenchOptions:
    """What `bench` was asked to do; constructing one checks it (the user's errors, one line each),
    so nothing slow starts on options that would fail later."""

    model: str | None = None
    preset: str | None = None
    config: str | Path | None = None
    prompt_tokens: tuple[int, ...] = (128, 512)
    gen_tokens: int = 128
    dtype: str = "float32"
    q_bits: int | None = None
    reference: str = "torch"
    reference_device: str = "auto"
    reference_model: str | None = None
    mlx_lm: bool = True
    study: bool = False
    trials: int = 3
    interleave: bool = True
    json_path: str | Path | None = None
    plot_path: str | Path | None = None
    seed: int = 0
    bandwidth_bytes: int = 2**30
    llama_cpp: str | Path | None = None
    kernels_ab: bool = False

    def __post_init__(self) -> None:
        self._check_values()
        self._check_environment()

    def _check_values(self) -> None:
        if sum(x is not None for x in (self.model, self.preset, self.config)) != 1:
            raise UserError("give exactly one of --model, --preset or --config")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.q_bits is not None and self.q_bits not in Q_BITS:
            raise UserError(
                f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, got {self.q_bits}"
            )
        if not self.prompt_tokens or min(self.prompt_tokens) < 1:
            raise UserError(
                f"--prompt-tokens must be positive lengths, got {list(self.prompt_tokens)}"
            )
        if self.gen_tokens < 2:
            raise UserError(
                f"--gen-tokens must be at least 2 (decode needs two), got {self.gen_tokens}"
            )
        if self.trials < 1:
            raise UserError(f"--trials must be at least 1, got {self.trials}")
        if self.reference not in ("torch", "none"):
            raise UserError(f"--reference must be torch or none, got {self.reference!r}")
        if self.reference_device not in ("auto", "cpu", "cuda"):
            raise UserError(
                f"--reference-device must be auto, cpu or cuda, got {self.reference_device!r}"
            )
        if self.reference_model is not None and self.reference != "torch":
            raise UserError(
                "--reference-model is for the PyTorch reference: it needs --reference torch"
            )
        if self.reference == "torch" and self.q_bits:
            raise UserError(
                "the PyTorch reference runs unquantised weights only: drop --quantize or pass "
                "--reference none"
            )

    def _check_environment(self) -> None:
        """The output folders and the optional packages and tools the options call for."""
        for path, flag in ((self.json_path, "--json"), (self.plot_path, "--plot")):
            if path is not None and not Path(path).resolve().parent.is_dir():
                raise FileNotFoundError(f"{flag}: folder {Path(path).parent} does not exist")
        if self.plot_path is not None:
            require_matplotlib()
        if self.reference == "torch":
            try:
                import torch  # noqa: F401
            except ImportError:
                raise MissingDependency(
                    "the PyTorch reference needs torch: pip install 'mlx-openelm[reference]' "
                    "(or pass --reference none)"
                ) from None
        if self.llama_cpp is not None:
            from mlx_openelm.export.gguf import require_gguf

            # Refuses a bit width llama.cpp has no type for.
            llama.gguf_type(self.dtype, self.q_bits)
            require_gguf()


@dataclass(frozen=True)
class RunSpec:
    """One row: an implementation run on every prompt length. Its worker process (or
    `llama_cpp.run`) reads it as a dict, `asdict(spec)`."""

    implementation: str
    folder: str
    dtype: str
    dtype_name: str  # the report's: "4-bit/float32" where the weights are quantised
    q_bits: int | None
    prompt_tokens: tuple[int, ...]
    gen_tokens: int
    vocab_size: int
    env: dict[str, str] = field(default_factory=dict)  # set in the worker's environment
    device: str | None = None  # the PyTorch reference's: auto, cpu or cuda
    gguf: str | None = None  # llama.cpp's: the exported weights, their type, its tools, threads
    gguf_type: str | None = None
    tools: dict[str, str | None] | None = None
    threads: int | None = None
    trials: int = 1
    check: bool = True  # the fp32 token check (round 1 only)


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
    # First: locals() holds the arguments only.
    opts = BenchOptions(**{**locals(), "prompt_tokens": tuple(parse_lengths(prompt_tokens))})
    tools = llama.find_tools(opts.llama_cpp) if opts.llama_cpp is not None else None
    console = Console(stderr=True)
    machine = machine_info()
    folder, args, name = _resolve(opts.model, opts.preset, opts.config)
    _check_model(opts, folder, args)
    twin = uniform_twin(args) if opts.study else None
    with tempfile.TemporaryDirectory(prefix="mlx-openelm-bench-") as tmp:
        if folder is None:
            console.print(f"random weights, {name} shape ({args.num_parameters():,} parameters)")
            folder = random_folder(args, Path(tmp) / "model", opts.seed)
        bits = opts.q_bits or folder_bits(folder)  # what the MLX rows run: --q-bits or the folder's
        base = RunSpec(
            implementation="mlx-openelm", folder=str(folder), dtype=opts.dtype, q_bits=opts.q_bits,
            dtype_name=f"{bits}-bit/{opts.dtype}" if bits else opts.dtype,
            prompt_tokens=opts.prompt_tokens, gen_tokens=opts.gen_tokens,
            vocab_size=args.vocab_size,
        )  # fmt: skip
        specs = _mlx_and_torch_specs(opts, base, twin, Path(tmp), machine["mlx_blas"])
        if tools is not None:
            specs.append(_llama_spec(base, bits, tools, Path(tmp), console))
        results = _run_rounds(specs, opts.trials, opts.interleave, console)
    report = _report(opts, name, args, bits, tools, machine, twin, results)
    print_report(report)
    save(report, opts.json_path, opts.plot_path, plot)
    return report


def _check_model(opts: BenchOptions, folder: Path | None, args: Any) -> None:
    """The checks that need the model's config, made before any weights are written or timed."""
    longest = max(opts.prompt_tokens)
    if longest + opts.gen_tokens > args.max_context_length:
        raise UserError(
            f"{longest} prompt + {opts.gen_tokens} generated tokens exceed the model's "
            f"context of {args.max_context_length}: lower --prompt-tokens or --gen-tokens"
        )
    if folder is not None and opts.reference == "torch":
        if folder_bits(folder):
            raise UserError(
                f"{folder} holds quantised weights, which the PyTorch reference can't run: "
                "pass --reference none (or bench the unquantised folder)"
            )
    ref = opts.reference_model
    if ref is not None and not (Path(ref) / "config.json").is_file():
        raise FileNotFoundError(f"--reference-model {ref} has no config.json")


def _mlx_and_torch_specs(
    opts: BenchOptions, base: RunSpec, twin: Any, tmp: Path, mlx_blas: str | None
) -> list[RunSpec]:
    """The rows that run in a worker process: mlx-openelm first (the others' baseline in the
    ratios), then those the options add, each a variant of `base`."""
    specs = [base]
    if opts.kernels_ab:
        specs.append(replace(base, implementation="mlx-openelm-kernels-off",
                             env={"MLX_OPENELM_KERNELS": "0"}))  # fmt: skip
    if opts.reference == "torch":
        specs.append(replace(base, implementation="torch-reference", device=opts.reference_device,
                             folder=str(opts.reference_model or base.folder),
                             q_bits=None))  # fmt: skip
    if opts.mlx_lm:
        specs.append(replace(base, implementation="mlx-lm"))
    if twin is not None:
        twin_folder = random_folder(twin, tmp / "uniform", opts.seed)
        specs.append(replace(base, implementation="mlx-openelm-naive-rmsnorm"))
        specs.append(replace(base, implementation=UNIFORM, folder=str(twin_folder)))
        specs += [replace(base, implementation=f"mlx-openelm-{blas}", env={BLAS_ENV: blas})
                  for blas in _other_blas(mlx_blas)]  # fmt: skip
    return specs


def _llama_spec(
    base: RunSpec, bits: int | None, tools: dict[str, str | None], tmp: Path, console: Console
) -> RunSpec:
    """llama.cpp's row: the same weights exported as the GGUF type nearest to the MLX rows'."""
    kind = llama.gguf_type(base.dtype, bits)
    console.print(f"llama.cpp: exporting the weights as a {kind} GGUF ...")
    path = llama.export(Path(base.folder), tmp / f"model-{kind}.gguf", kind)
    return replace(base, implementation=llama.NAME, gguf=str(path), gguf_type=kind, tools=tools,
                   threads=llama.threads())  # fmt: skip


def _report(
    opts: BenchOptions,
    name: str,
    args: Any,
    bits: int | None,
    tools: dict[str, str | None] | None,
    machine: dict[str, Any],
    twin: Any,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """The report (what the JSON file holds), with the roofline from the memory bandwidth of the
    device the rows ran on."""
    backend = results[0]["backend"]
    bandwidth = measure_bandwidth(opts.bandwidth_bytes, on_gpu=backend != "cpu")
    report = {
        "model": name,
        "parameters": args.num_parameters(),
        "settings": dict(
            prompt_tokens=list(opts.prompt_tokens),
            gen_tokens=opts.gen_tokens,
            dtype=opts.dtype,
            q_bits=opts.q_bits,
            trials=opts.trials,
            interleave=opts.interleave,
            reference=opts.reference,
            reference_device=opts.reference_device,
            seed=opts.seed,
            llama_cpp=tools,
        ),
        "machine": machine,
        "roofline": _roofline(args, bandwidth, opts.dtype, bits, opts.gen_tokens, results),
        "ratios": _ratios(results),
        "results": results,
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    if twin is not None:
        report["study"] = {
            "uniform_twin": {
                "parameters": twin.num_parameters(),
                "query_heads": twin.num_query_heads,
                "ffn_dims": twin.ffn_dims,
            }
        }
    return report


def _run_rounds(
    specs: list[RunSpec], trials: int, interleave: bool, console: Console
) -> list[dict[str, Any]]:
    rounds, per_round = (trials, 1) if interleave else (1, trials)
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in range(rounds):
        # Round r starts at the r-th row, so no row always runs first or last.
        for spec in specs[r % len(specs) :] + specs[: r % len(specs)]:
            console.print(f"round {r + 1}/{rounds}: {spec.implementation} ...")
            run = llama.run if spec.implementation == llama.NAME else run_worker
            merge_trials(merged, run(asdict(replace(spec, trials=per_round, check=r == 0))))
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
