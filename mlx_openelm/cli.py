"""The `mlx-openelm` command line: a few lines per command, each mapping options onto one library call."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    help="Run, convert, fine-tune, pretrain and benchmark Apple's OpenELM models with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Errors a user can fix: printed as one line, exit code 1, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def _run(fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(code=130) from None


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="HF folder, CoreNet .pt file, or Hub repo id")],
    out: Annotated[Path, typer.Argument(help="Output MLX model folder (must not exist)")],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float16",
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantise the weights")] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per weight when quantising (4 or 8)")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantisation group size (32, 64, 128)")] = 64,
    config_yaml: Annotated[
        Optional[Path], typer.Option(help="CoreNet training YAML (for a CoreNet .pt)")
    ] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option(help="SentencePiece tokenizer.model to copy in")
    ] = None,
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
    )


@app.command()
def info(
    model: Annotated[Optional[str], typer.Option(help="MLX model folder or Hub repo id")] = None,
    preset: Annotated[Optional[str], typer.Option(help="270M, 450M, 1_1B or 3B")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A config.json of your own design")] = None,
) -> None:
    """Show a model's layer-wise shape: heads and FFN width per layer, and parameter count."""
    from .summary import describe

    _run(describe, model=model, preset=preset, config=config)


if __name__ == "__main__":
    app()
