"""`export`, `eval`, `perplexity` and `bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import AdapterPath, _run, app


@app.command()
def export(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id (with tokenizer)")],
    gguf_path: Annotated[
        Path | None,
        typer.Option("--gguf", help="Write a GGUF file for llama.cpp, Ollama, LM Studio here"),
    ] = None,
    gguf_type: Annotated[str, typer.Option(help="f32, f16, bf16, q8_0 or q4_0")] = "f16",
    hf_path: Annotated[
        Path | None, typer.Option("--hf", help="Write a Hugging Face OpenELM folder here")
    ] = None,
    hf_dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 for --hf")
    ] = None,
    adapter_path: AdapterPath = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the outputs once the new ones are complete")
    ] = False,
) -> None:
    """Export a model (adapters fused in) as GGUF for llama.cpp and/or a Hugging Face folder."""
    options = locals()
    from ..export import export as run_export

    written = _run(run_export, **options)
    for path in written:
        size = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
        print(f"wrote {path} ({size / 1e6:.1f} MB)")


@app.command("eval")
def eval_tasks(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id, with tokenizer")],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated lm-eval tasks; hellaswag_local runs offline")
    ],
    adapter_path: Annotated[
        Path | None, typer.Option(help="LoRA/DoRA adapter folder to apply")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items per task")] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Examples per prompt (0: zero-shot)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass")] = 16,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here")] = None,
) -> None:
    """Zero-/few-shot accuracy with lm-evaluation-harness (needs the `eval` extra installed)."""
    options = locals()
    from ..eval.harness import evaluate

    _run(evaluate, **options)


@app.command()
def perplexity(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id, with tokenizer")],
    data: Annotated[Path, typer.Option(help="Text file, .jsonl ('text' per line) or a folder")],
    context: Annotated[
        int | None, typer.Option(help="Tokens per window (default: the model's)")
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="New tokens scored per window (default: the context)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass")] = 8,
    adapter_path: Annotated[
        Path | None, typer.Option(help="LoRA/DoRA adapter folder to apply")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here")] = None,
) -> None:
    """Token-level perplexity of text with a sliding window (as lm-eval's loglikelihood_rolling)."""
    options = locals()
    from ..eval.perplexity import perplexity as run_perplexity

    _run(run_perplexity, **options)


@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help="MLX model folder or Hub repo id")] = None,
    preset: Annotated[
        str | None, typer.Option(help="Random weights of a released shape: 270M, 450M, 1_1B, 3B")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Random weights of the shape in this config.json")
    ] = None,
    prompt_tokens: Annotated[str, typer.Option(help="Prompt lengths, comma-separated")] = (
        "128,512,1024"
    ),
    gen_tokens: Annotated[int, typer.Option(help="Tokens generated per run")] = 128,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantise MLX rows")] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per weight when quantising")] = 4,
    reference: Annotated[str, typer.Option(help="torch (the PyTorch reference) or none")] = "torch",
    reference_device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    reference_model: Annotated[
        str | None, typer.Option(help="Hugging Face folder for the reference (default: --model's)")
    ] = None,
    mlx_lm: Annotated[bool, typer.Option("--mlx-lm/--no-mlx-lm", help="Add mlx-lm's row")] = True,
    study: Annotated[
        bool, typer.Option("--study", help="Add naive-RMSNorm and uniform-width rows")
    ] = False,
    trials: Annotated[int, typer.Option(help="Timed runs per row (the median is reported)")] = 3,
    interleave: Annotated[
        bool,
        typer.Option(help="One trial per row per round, so machine load hits all rows alike"),
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report")] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG plot of tok/s here")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
    llama_cpp: Annotated[
        Path | None,
        typer.Option(help="llama.cpp's build/bin (or llama-bench): add its rows, same weights"),
    ] = None,
    kernels_ab: Annotated[
        bool, typer.Option("--kernels-ab", help="Add an mlx-openelm row with its CPU kernels off")
    ] = False,
) -> None:
    """Prefill and decode speed: mlx-openelm against mlx-lm and the PyTorch reference (Table 7)."""
    options = locals()
    if not options.pop("quantize"):
        options["q_bits"] = None
    from ..bench.runner import bench as run_bench

    _run(run_bench, **options)


@app.command("kernels")
def kernels_command(
    action: Annotated[str, typer.Argument(help="status, build or clear")] = "status",
) -> None:
    """The native CPU kernels (Linux): whether they run, build them now (a first run, a CI
    image), or clear their build cache."""
    from ..kernels.manage import manage

    for line in _run(manage, action=action):
        print(line)
