"""The `mlx-openelm` command line: each command maps its options onto one library call.

This module holds the app and its error handling; the command groups live next to it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import MissingDependency, UserError

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


class _Stderr(logging.Handler):
    """The library's messages as plain lines on stderr; sys.stderr is looked up at each one, so a
    runner that swaps it (typer's CliRunner) sees them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _show_library_messages() -> None:
    logger = logging.getLogger("mlx_openelm")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)


def _run(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call the library; a user error becomes one line and exit code 1. The commands pass their
    options as `locals()`, so each option's name is the library argument's."""
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
    _show_library_messages()


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
    options = locals()
    from ..convert import convert as convert_checkpoint

    _run(convert_checkpoint, **options)


@app.command()
def info(
    model: Annotated[str | None, typer.Option(help="MLX model folder or Hub repo id")] = None,
    preset: Annotated[str | None, typer.Option(help="270M, 450M, 1_1B or 3B")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.json of your own design")] = None,
) -> None:
    """Show a model's layer-wise shape: heads and FFN width per layer, and parameter count."""
    from ..summary import describe

    _run(describe, model=model, preset=preset, config=config)


AdapterPath = Annotated[
    str | None, typer.Option(help="LoRA/DoRA adapter folder from `mlx-openelm lora` to apply")
]

# The commands of each group register themselves on `app`.
from . import generation, serving, tools, training  # noqa: E402, F401
