"""The `mlx-openelm` command line: each command maps its options onto one library call."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import MissingDependency, UserError

app = typer.Typer(
    help="Run, convert, fine-tune, pretrain and benchmark Apple's OpenELM models with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Errors a user can fix: printed as one line, exit code 1, no traceback. Anything else (an
# mlx shape error, a TypeError) is a bug and keeps its traceback.
USER_ERRORS = (
    UserError,
    MissingDependency,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,  # a peer of a distributed run was lost
)
DEBUG_ENV = "MLX_OPENELM_DEBUG"
_debug = False


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: temporary folders are removed on the way out."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _run(fn: Callable[..., Any], **kwargs: Any) -> Any:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return fn(**kwargs)
    except USER_ERRORS as e:
        if _debug or os.environ.get(DEBUG_ENV):
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt as e:
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        raise typer.Exit(code=143 if isinstance(e, Terminated) else 130) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


@app.callback()
def main(
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar=DEBUG_ENV, help="Show the traceback of a user error too"),
    ] = False,
) -> None:
    """Run, convert, fine-tune, pretrain and benchmark Apple's OpenELM models with MLX."""
    global _debug
    _debug = debug


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="HF folder, CoreNet .pt file, or Hub repo id")],
    out: Annotated[Path, typer.Argument(help="Output MLX model folder (must not exist)")],
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (bfloat16 on a GPU, float32 on a CPU), float32, float16 or bfloat16"
        ),
    ] = "auto",
    quantize: Annotated[
        bool, typer.Option("--quantize", "-q", help="Quantise the weights")
    ] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per weight when quantising (2-6 or 8)")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantisation group size (32, 64, 128)")] = 64,
    config_yaml: Annotated[
        Path | None, typer.Option(help="CoreNet training YAML (for a CoreNet .pt)")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="tokenizer.model file, a folder holding one, or a Hub repo id (default: the "
            "source's own, else an ungated Hub copy of Llama-2's, checked)"
        ),
    ] = None,
    no_tokenizer: Annotated[
        bool, typer.Option("--no-tokenizer", help="Convert the weights alone")
    ] = False,
    chat_template: Annotated[
        str,
        typer.Option(
            help="auto (OpenELM's for -Instruct names, none for base), openelm, none, a Jinja "
            "file or the template"
        ),
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT once the new folder is complete")
    ] = False,
) -> None:
    """Convert a PyTorch OpenELM checkpoint (Hugging Face or CoreNet) into an MLX model folder."""
    from .convert import convert as convert_checkpoint

    _run(
        convert_checkpoint,
        source=source,
        out=out,
        dtype=dtype,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        config_yaml=config_yaml,
        tokenizer=tokenizer,
        no_tokenizer=no_tokenizer,
        chat_template=chat_template,
        overwrite=overwrite,
    )


@app.command()
def info(
    model: Annotated[str | None, typer.Option(help="MLX model folder or Hub repo id")] = None,
    preset: Annotated[str | None, typer.Option(help="270M, 450M, 1_1B or 3B")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.json of your own design")] = None,
) -> None:
    """Show a model's layer-wise shape: heads and FFN width per layer, and parameter count."""
    from .summary import describe

    _run(describe, model=model, preset=preset, config=config)


# Sampling options shared by `generate` and `chat` (mlx-lm's samplers).
MaxTokens = Annotated[int, typer.Option(help="Most tokens to generate (per reply in chat)")]
Temp = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1]; 1 is off")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0 is off")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min-p x the top token's; 0 is off")]
RepetitionPenalty = Annotated[
    float,
    typer.Option(help="Penalty on the last 20 tokens (OpenELM's model cards use 1.2); 1 is off"),
]
Seed = Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling")]
AdapterPath = Annotated[
    str | None, typer.Option(help="LoRA/DoRA adapter folder from `mlx-openelm lora` to apply")
]
ChatTemplateOption = Annotated[
    str | None,
    typer.Option(help="openelm, a Jinja file or the template (default: the model folder's)"),
]
# Training options shared by `lora` and `pretrain` (each keeps its own default).
GradAccumulation = Annotated[int, typer.Option(help="Micro-steps per update")]
LearningRate = Annotated[float, typer.Option(help="Peak LR (AdamW 0.9, 0.95)")]
MinLrRatio = Annotated[float, typer.Option(help="Final LR as a fraction of the peak")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay (matrices only)")]
GradClip = Annotated[float, typer.Option(help="Gradient norm clip (0: off)")]
GradCheckpoint = Annotated[
    bool, typer.Option("--grad-checkpoint", help="Recompute activations: less memory")
]
StepsPerReport = Annotated[int, typer.Option(help="Log train loss every N steps")]
StepsPerEval = Annotated[int, typer.Option(help="Validate every N steps (0: never)")]
ValBatches = Annotated[int, typer.Option(help="Validation batches (-1: all)")]
StepsPerSave = Annotated[int, typer.Option(help="Checkpoint every N steps")]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id, with tokenizer")],
    prompt: Annotated[str, typer.Option(help="Text to continue (BOS is prepended)")],
    max_tokens: MaxTokens = 256,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.2,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this text (not printed); repeatable")
    ] = None,
    adapter_path: AdapterPath = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="The prompt is a user message: print the reply")
    ] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (with --chat)")] = None,
    chat_template: ChatTemplateOption = None,
) -> None:
    """Continue a prompt; the speed report (tokens/s, peak memory) goes to stderr."""
    from .generate import run

    _run(
        run, model=model, prompt=prompt, max_tokens=max_tokens, temp=temp, top_p=top_p,
        top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        stop=stop or [], adapter_path=adapter_path, chat=chat, system=system,
        chat_template=chat_template,
    )  # fmt: skip


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="MLX Instruct model folder or Hub repo id")],
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_tokens: MaxTokens = 512,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.2,
    seed: Seed = None,
    adapter_path: AdapterPath = None,
    chat_template: ChatTemplateOption = None,
) -> None:
    """Chat with an OpenELM Instruct model (/reset, /exit; Ctrl-C stops a reply)."""
    from .chat import run

    _run(
        run, model=model, system=system, max_tokens=max_tokens, temp=temp, top_p=top_p,
        top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        adapter_path=adapter_path, chat_template=chat_template,
    )  # fmt: skip


@app.command()
def lora(
    model: Annotated[str, typer.Option(help="Base MLX model folder (quantised: QLoRA) or Hub id")],
    data: Annotated[Path, typer.Option(help="Folder with train.jsonl and valid.jsonl")],
    adapter_path: Annotated[Path, typer.Option(help="Output folder for the adapters")],
    dora: Annotated[bool, typer.Option("--dora", help="DoRA instead of LoRA")] = False,
    rank: Annotated[int, typer.Option(help="Rank of the low-rank update")] = 32,
    alpha: Annotated[float, typer.Option(help="LoRA alpha; the update is scaled alpha/rank")] = 32,
    dropout: Annotated[float, typer.Option(help="Dropout on the adapter input")] = 0.1,
    targets: Annotated[
        str, typer.Option(help="Comma-separated layers to adapt (also: lm_head when untied)")
    ] = "token_embeddings,qkv_proj,out_proj,proj_1,proj_2",
    num_layers: Annotated[int | None, typer.Option(help="Adapt only the last N blocks")] = None,
    iters: Annotated[int, typer.Option(help="Optimizer steps")] = 1000,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (sets iters)")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-step, all ranks")] = 4,
    grad_accumulation_steps: GradAccumulation = 1,
    max_seq_length: Annotated[int, typer.Option(help="Longer examples are cut")] = 2048,
    learning_rate: LearningRate = 3e-4,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear warm-up (default 10% of the run, at most 100)")
    ] = None,
    min_lr_ratio: MinLrRatio = 0.1,
    weight_decay: WeightDecay = 0.0,
    grad_clip: GradClip = 1.0,
    grad_checkpoint: GradCheckpoint = False,
    seed: Annotated[int, typer.Option(help="Seed for adapter init, data order, dropout")] = 0,
    steps_per_report: StepsPerReport = 10,
    steps_per_eval: StepsPerEval = 200,
    val_batches: ValBatches = 25,
    steps_per_save: StepsPerSave = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue adapter-path's run")] = False,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Formats messages records, as in chat (default: the folder's, else openelm)"
        ),
    ] = None,
) -> None:
    """Fine-tune LoRA/DoRA adapters with the paper's recipe (Ctrl-C saves; --resume continues)."""
    from .train.lora import lora as train_lora

    _run(
        train_lora, model=model, data=data, adapter_path=adapter_path, dora=dora, rank=rank,
        alpha=alpha, dropout=dropout, targets=[t.strip() for t in targets.split(",") if t.strip()],
        num_layers=num_layers, epochs=epochs, resume=resume, iters=iters, batch_size=batch_size,
        grad_accumulation_steps=grad_accumulation_steps, max_seq_length=max_seq_length,
        learning_rate=learning_rate, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay, grad_clip=grad_clip, grad_checkpoint=grad_checkpoint,
        seed=seed, steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
        val_batches=val_batches, steps_per_save=steps_per_save, chat_template=chat_template,
    )  # fmt: skip


@app.command()
def fuse(
    model: Annotated[str, typer.Option(help="Base MLX model folder the adapters were trained on")],
    adapter_path: Annotated[Path, typer.Option(help="Adapter folder from `mlx-openelm lora`")],
    out: Annotated[Path, typer.Option(help="Output MLX model folder (must not exist)")],
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write float weights from a quantised base")
    ] = False,
    export_hf: Annotated[
        Path | None, typer.Option(help="Also write a Hugging Face OpenELM folder here")
    ] = None,
    hf_dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 for --export-hf")
    ] = None,
) -> None:
    """Merge adapters into the base model: a new MLX folder, and optionally a Hugging Face one."""
    from .train.lora import fuse as fuse_adapters

    _run(
        fuse_adapters, model=model, adapter_path=adapter_path, out=out, dequantize=dequantize,
        export_hf_path=export_hf, hf_dtype=hf_dtype,
    )  # fmt: skip


@app.command()
def export(
    model: Annotated[str, typer.Option(help="MLX model folder or Hub repo id (with tokenizer)")],
    gguf: Annotated[
        Path | None, typer.Option(help="Write a GGUF file for llama.cpp, Ollama, LM Studio here")
    ] = None,
    gguf_type: Annotated[str, typer.Option(help="f32, f16, bf16, q8_0 or q4_0")] = "f16",
    hf: Annotated[
        Path | None, typer.Option(help="Write a Hugging Face OpenELM folder here")
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
    from .train.export import export as run_export

    written = _run(
        run_export, model=model, gguf_path=gguf, gguf_type=gguf_type, hf_path=hf,
        hf_dtype=hf_dtype, adapter_path=adapter_path, overwrite=overwrite,
    )  # fmt: skip
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
    from .eval.harness import evaluate

    _run(
        evaluate, model=model, tasks=tasks, adapter_path=adapter_path, limit=limit,
        num_fewshot=num_fewshot, batch_size=batch_size, output=output,
    )  # fmt: skip


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
    from .eval.perplexity import perplexity as run_perplexity

    _run(
        run_perplexity, model=model, data=data, context=context, stride=stride,
        batch_size=batch_size, adapter_path=adapter_path, output=output,
    )  # fmt: skip


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
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON report")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot of tok/s here")] = None,
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
    from .bench.runner import bench as run_bench

    _run(
        run_bench, model=model, preset=preset, config=config, prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens, dtype=dtype, q_bits=q_bits if quantize else None,
        reference=reference, reference_device=reference_device, reference_model=reference_model,
        mlx_lm=mlx_lm, study=study, trials=trials, interleave=interleave, json_path=json_out,
        plot_path=plot, seed=seed, llama_cpp=llama_cpp, kernels_ab=kernels_ab,
    )  # fmt: skip


@app.command()
def pretrain(
    data: Annotated[
        Path, typer.Option(help=".txt/.jsonl file or folder: a document per file or jsonl line")
    ],
    out: Annotated[Path, typer.Option(help="Output MLX model folder (with checkpoints)")],
    config: Annotated[Path | None, typer.Option(help="config.json with the model's shape")] = None,
    preset: Annotated[
        str | None, typer.Option(help="Or a released shape: 270M, 450M, 1_1B, 3B")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, e.g. --set model_dim=256 (repeat)"),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="SentencePiece tokenizer.model (default: train one)")
    ] = None,
    tokenizer_vocab_size: Annotated[
        int, typer.Option(help="Pieces when training the tokenizer")
    ] = 4096,
    seq_length: Annotated[int, typer.Option(help="Tokens per packed sequence")] = 256,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out")] = 0.02,
    doc_separator: Annotated[
        str | None, typer.Option(help="Split .txt files at this marker (\\n is a newline)")
    ] = None,
    min_doc_chars: Annotated[int, typer.Option(help="Drop shorter documents (paper: 200)")] = 0,
    min_doc_tokens: Annotated[int, typer.Option(help="Drop shorter documents (paper: 256)")] = 0,
    iters: Annotated[int, typer.Option(help="Optimizer steps (the cosine ends here)")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-step, all ranks")] = 16,
    grad_accumulation_steps: GradAccumulation = 1,
    learning_rate: LearningRate = 1e-3,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear warm-up (default 10% of iters, at most 1000)")
    ] = None,
    min_lr_ratio: MinLrRatio = 0.1,
    weight_decay: WeightDecay = 0.1,
    z_loss: Annotated[
        float, typer.Option(help="z-loss weight on log(Z)^2 (CoreNet's 1e-4; 0: off)")
    ] = 1e-4,
    grad_clip: GradClip = 1.0,
    grad_checkpoint: GradCheckpoint = False,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and split")] = 0,
    steps_per_report: StepsPerReport = 10,
    steps_per_eval: StepsPerEval = 200,
    val_batches: ValBatches = -1,
    steps_per_save: StepsPerSave = 200,
    keep_checkpoints: Annotated[int, typer.Option(help="Numbered checkpoints kept")] = 2,
    average_last: Annotated[
        int, typer.Option(help="Average the last K checkpoints at the end")
    ] = 0,
    export_hf: Annotated[
        Path | None, typer.Option(help="Also write a Hugging Face OpenELM folder here")
    ] = None,
    hf_dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 for --export-hf")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT's run")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete what OUT holds and start afresh")
    ] = False,
) -> None:
    """Pretrain an OpenELM from scratch, the paper's recipe (Ctrl-C saves; --resume continues)."""
    from .train.pretrain import parse_overrides
    from .train.pretrain import pretrain as run_pretrain

    training = {} if warmup_steps is None else {"warmup_steps": warmup_steps}
    sep = doc_separator.encode().decode("unicode_escape") if doc_separator else None
    result = _run(
        lambda **kw: run_pretrain(overrides=parse_overrides(set_ or []), **kw),
        data=data, out=out, config=config, preset=preset, tokenizer=tokenizer,
        tokenizer_vocab_size=tokenizer_vocab_size, seq_length=seq_length,
        val_fraction=val_fraction,
        doc_separator=sep, min_doc_chars=min_doc_chars, min_doc_tokens=min_doc_tokens,
        average_last=average_last, export_hf_path=export_hf, hf_dtype=hf_dtype, resume=resume,
        overwrite=overwrite, iters=iters, batch_size=batch_size,
        grad_accumulation_steps=grad_accumulation_steps,
        learning_rate=learning_rate, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
        z_loss=z_loss, grad_clip=grad_clip, grad_checkpoint=grad_checkpoint, seed=seed,
        steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
        val_batches=val_batches,
        steps_per_save=steps_per_save, keep_checkpoints=keep_checkpoints, **training,
    )  # fmt: skip
    import mlx.core as mx

    if result and result.get("val_ppl") is not None and mx.distributed.init().rank() == 0:
        print(
            f"validation perplexity {result['val_ppl']:.2f} (unigram {result['unigram_ppl']:.2f}, "
            f"bigram {result['bigram_ppl']:.2f}) on {result['val_tokens']:,} held-out tokens"
        )


@app.command("train-tokenizer")
def train_tokenizer(
    data: Annotated[Path, typer.Option(help=".txt/.jsonl file or folder, as for pretrain")],
    out: Annotated[Path, typer.Option(help="The tokenizer.model to write")],
    vocab_size: Annotated[int, typer.Option(help="Pieces, with 256 bytes and 3 specials")] = 4096,
    model_type: Annotated[str, typer.Option(help="bpe (Llama-2's) or unigram")] = "bpe",
    doc_separator: Annotated[
        str | None, typer.Option(help="Split .txt files at this marker (\\n is a newline)")
    ] = None,
) -> None:
    """Train a SentencePiece tokenizer like Llama-2's (byte fallback; unk 0, <s> 1, </s> 2)."""
    from .train.tokenizer_training import train_tokenizer as run_train_tokenizer

    sep = doc_separator.encode().decode("unicode_escape") if doc_separator else None
    tok = _run(
        run_train_tokenizer, data=data, out=out, vocab_size=vocab_size, model_type=model_type,
        doc_separator=sep,
    )  # fmt: skip
    print(f"wrote {out} ({tok.vocab_size} pieces)")


if __name__ == "__main__":
    app()
