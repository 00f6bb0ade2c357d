"""Checkpoint -> MLX model folder: read, check, cast, quantise, write (atomically)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from mlx_openelm import hub
from mlx_openelm.chat_template import template_for_convert
from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import UserError
from mlx_openelm.files import atomic_folder, check_writable
from mlx_openelm.loading import save_config
from mlx_openelm.tokenizer import Tokenizer, write_tokenizer_files
from mlx_openelm.tokenizer_sources import explicit_tokenizer, resolve_tokenizer

from .corenet import read_corenet
from .readers import read_hf_config, read_hf_weights
from .tensors import TensorRef
from .validate import validate
from .writer import Quantization, write_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer.model"]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr while tensors are converted (minutes for the 3B); gone when done."""
    console = Console(stderr=True)
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as p:
        task = p.add_task("convert", total=total)
        yield lambda n: p.advance(task, n)


def default_dtype() -> str:
    """bfloat16 where MLX has a GPU (Metal, CUDA); float32 on a CPU, whose half-precision matmuls
    are far slower than fp32 through the BLAS (docs/kernels.md)."""
    return "bfloat16" if mx.metal.is_available() or mx.cuda.is_available() else "float32"


def _check_options(dtype: str, quantize: bool, q_bits: int, q_group_size: int) -> mx.Dtype:
    dtype = default_dtype() if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}: choose auto, float32, float16 or bfloat16")
    if quantize and q_bits not in Q_BITS:
        raise UserError(f"q_bits must be one of {', '.join(map(str, Q_BITS))}, got {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise UserError(f"q_group_size must be 32, 64 or 128, got {q_group_size}")
    return DTYPES[dtype]


@dataclass
class Source:
    args: ModelArgs
    tensors: dict[str, TensorRef]  # under Hugging Face names
    tokenizer: Path | None = None  # the source folder's tokenizer.model
    notes: list[str] = field(default_factory=list)  # what was changed on the way, for the log


def read_source(source: str | Path, config_yaml: str | Path | None = None) -> Source:
    """A local folder, Hub repo id or CoreNet file: its config and tensors, nothing read yet."""
    if config_yaml is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{source}: --config-yaml needs a CoreNet .pt file")
        args, tensors, notes = read_corenet(path, Path(config_yaml).expanduser())
        return Source(args, tensors, notes=notes)
    path = hub.resolve(source, allow_patterns=HUB_PATTERNS)
    if path.is_file():
        raise UserError(
            f"{path} is a file: pass the Hugging Face folder that holds it with config.json, "
            "or give a CoreNet checkpoint's training YAML with --config-yaml"
        )
    config = read_hf_config(path)
    try:
        args = ModelArgs.from_dict(config)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    tokenizer = path / "tokenizer.model"
    return Source(args, read_hf_weights(path), tokenizer if tokenizer.is_file() else None)


def _tokenizer(
    src: Source, explicit: tuple[Path, str] | None, no_tokenizer: bool
) -> tuple[Path | None, str]:
    """(tokenizer.model or None, where it came from); one with more pieces than the model has
    embeddings belongs to another checkpoint."""
    args = src.args
    tok, tok_origin = explicit or resolve_tokenizer(
        src.tokenizer, None, args.vocab_size, fetch_default=not no_tokenizer
    )
    if tok is not None and (pieces := Tokenizer(tok).vocab_size) > args.vocab_size:
        raise UserError(
            f"{tok} has {pieces} pieces but the model only {args.vocab_size} embeddings: "
            "wrong tokenizer for this checkpoint"
        )
    return tok, tok_origin


def _log_plan(source: str | Path, src: Source, target: mx.Dtype, *notes: str) -> int:
    """Say what is about to be converted, before the minutes it takes; returns its bytes.

    `notes` (the tokenizer's and template's origins) follow what reading the source changed.
    """
    args, tensors = src.args, src.tensors
    for note in [*src.notes, *notes]:
        log.info(note)
    src_dtypes = ", ".join(sorted({t.dtype for t in tensors.values()}))
    nbytes = sum(t.nbytes for t in tensors.values())
    log.info(f"{len(tensors)} tensors ({src_dtypes}, {_mb(nbytes)}) from {source}")
    if target == mx.float16 and args.model_dim >= 3072:
        log.warning(
            "note: OpenELM-3B needs bfloat16's range; float16 may overflow (CoreNet's advice)"
        )
    n_params = sum(math.prod(t.shape) for t in tensors.values())
    log.info(
        f"OpenELM {args.num_transformer_layers} layers, model_dim {args.model_dim}: "
        f"{n_params / 1e6:,.2f} M parameters, {str(target).removeprefix('mlx.core.')}"
    )
    return nbytes


def convert(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    config_yaml: str | Path | None = None,
    tokenizer: str | Path | None = None,
    no_tokenizer: bool = False,
    chat_template: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Convert a PyTorch OpenELM checkpoint into an MLX model folder (loads here and in mlx-lm).

    Every tensor is checked against the config (names, shapes) before anything is written; a
    failure leaves no output folder. torch is not needed.

    Args:
        source: a Hugging Face folder (config.json + model.safetensors, sharded safetensors with
            an index, or pytorch_model.bin), a Hub repo id, or a CoreNet `.pt` (with config_yaml).
        out: the output folder; it must not exist (or be empty) unless `overwrite`.
        dtype: float32, float16, bfloat16, or auto (bfloat16 on a GPU, float32 on a CPU).
        quantize: quantise the linear layers and the embedding (affine, as mlx-lm does).
        q_bits: bits per weight when quantising.
        q_group_size: quantisation group size (32, 64 or 128).
        config_yaml: the CoreNet training YAML of a CoreNet checkpoint.
        tokenizer: the tokenizer to copy in: a SentencePiece model file, a folder holding
            tokenizer.model, or a Hub repo id (fetched, and refused unless it is Llama-2's). By
            default: the source folder's own tokenizer.model, else (for Llama-2's 32000-piece
            vocabulary) the first ungated Hub copy of Llama-2's tokenizer that passes the check
            (`tokenizer_sources.LLAMA2_TOKENIZER_REPOS`).
        no_tokenizer: write the weights alone, without looking for a tokenizer.
        chat_template: `auto` (OpenELM's Instruct template for a source named `-Instruct`, none
            for a base model), `openelm`, `none`, a Jinja file, or the template text.
        overwrite: replace an existing output folder (only once the new one is complete).

    Returns:
        The output folder.
    """
    target = _check_options(dtype, quantize, q_bits, q_group_size)
    out = Path(out)
    check_writable(out, overwrite)  # before the (possibly long) reading and checking
    if no_tokenizer and tokenizer is not None:
        raise UserError("Pass either --tokenizer or --no-tokenizer, not both")
    # Explicit choices are checked before the (possibly large) source is read.
    explicit = explicit_tokenizer(tokenizer) if tokenizer is not None else None
    template, template_origin = template_for_convert(source, chat_template)

    src = read_source(source, config_yaml)
    args, tensors = src.args, src.tensors
    validate(tensors, args, str(source))
    tok, tok_origin = _tokenizer(src, explicit, no_tokenizer)
    template_origin = template_origin if tok is not None else "none (no tokenizer)"
    notes = (f"tokenizer: {tok_origin}", f"chat template: {template_origin}")
    nbytes = _log_plan(source, src, target, *notes)
    q = Quantization(q_bits, q_group_size) if quantize else None
    with atomic_folder(out, overwrite=overwrite) as tmp, _progress(nbytes) as advance:
        write_weights(tmp, tensors, target, q, on_tensor=advance)
        save_config(tmp, args, quantization=q.config() if q else None)
        if tok is not None:
            write_tokenizer_files(tmp, tok, args.max_context_length, chat_template=template)
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info(f"wrote {out} ({_mb(size)}{f', {q_bits}-bit' if quantize else ''})")
    return out
