"""`lora`, `fuse`, `pretrain` and `train-tokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import _run, app

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
    options = {**locals(), "targets": [t.strip() for t in targets.split(",") if t.strip()]}
    from ..train.lora import lora as train_lora

    _run(train_lora, **options)


@app.command()
def fuse(
    model: Annotated[str, typer.Option(help="Base MLX model folder the adapters were trained on")],
    adapter_path: Annotated[Path, typer.Option(help="Adapter folder from `mlx-openelm lora`")],
    out: Annotated[Path, typer.Option(help="Output MLX model folder (must not exist)")],
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write float weights from a quantised base")
    ] = False,
    export_hf_path: Annotated[
        Path | None,
        typer.Option("--export-hf", help="Also write a Hugging Face OpenELM folder here"),
    ] = None,
    hf_dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 for --export-hf")
    ] = None,
) -> None:
    """Merge adapters into the base model: a new MLX folder, and optionally a Hugging Face one."""
    options = locals()
    from ..train.lora import fuse as fuse_adapters

    _run(fuse_adapters, **options)


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
    export_hf_path: Annotated[
        Path | None,
        typer.Option("--export-hf", help="Also write a Hugging Face OpenELM folder here"),
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
    options = {**locals(), "doc_separator": _separator(doc_separator)}
    sets = options.pop("set_") or []
    if warmup_steps is None:
        del options["warmup_steps"]  # the pretraining default: a share of the run
    from ..train.pretrain import parse_overrides
    from ..train.pretrain import pretrain as run_pretrain

    result = _run(lambda **kw: run_pretrain(overrides=parse_overrides(sets), **kw), **options)
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
    options = {**locals(), "doc_separator": _separator(doc_separator)}
    from ..train.tokenizer_training import train_tokenizer as run_train_tokenizer

    tok = _run(run_train_tokenizer, **options)
    print(f"wrote {out} ({tok.vocab_size} pieces)")


def _separator(text: str | None) -> str | None:
    """`--doc-separator` with its escapes read (`\\n` is a newline)."""
    return text.encode().decode("unicode_escape") if text else None
