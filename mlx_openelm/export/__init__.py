"""Write a model for other tools: a Hugging Face OpenELM folder, or a GGUF file for llama.cpp.

Our parameter names are the Hugging Face ones, so the folder is dequantise, cast and save; the
GGUF writer is `mlx_openelm.gguf_export`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from .. import hub
from ..adapters import fuse_adapters
from ..chat_template import folder_template
from ..config import ModelArgs
from ..errors import UserError, read_json
from ..files import atomic_folder
from ..loading import load
from ..tokenizer import write_tokenizer_files

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def export_hf(
    model: nn.Module,
    args: ModelArgs,
    out: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_file: str | Path | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> None:
    """Save `model` as a Hugging Face OpenELM folder (dequantising quantised layers in place).

    Args:
        model: the MLX model.
        args: its config.
        out: the output folder (must not exist).
        dtype: float32, float16 or bfloat16 (default: the weights' own float type).
        tokenizer_file: a `tokenizer.model` to copy in (with Hugging Face's tokenizer configs).
        chat_template: the chat template for `tokenizer_config.json` (None for a base model).
        overwrite: replace an existing `out` once the new folder is complete.
    """
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: choose float32, float16 or bfloat16")
    model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    target = DTYPES[dtype] if dtype else weights["transformer.token_embeddings.weight"].dtype
    weights = {k: v.astype(target) for k, v in weights.items()}
    dtype_name = next(k for k, v in DTYPES.items() if v == target)
    config = {**args.to_dict(), "torch_dtype": dtype_name}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        # transformers refuses safetensors files without format "pt" in their metadata.
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            write_tokenizer_files(tmp, tokenizer_file, args.max_context_length, chat_template)


def export(
    model: str | Path,
    *,
    gguf_path: str | Path | None = None,
    gguf_type: str = "f16",
    hf_path: str | Path | None = None,
    hf_dtype: str | None = None,
    adapter_path: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write an MLX model (with its adapters fused in) as a GGUF file and/or a Hugging Face folder.

    Args:
        model: an MLX model folder or Hub repo id; quantised weights are dequantised first.
        gguf_path: the `.gguf` file for llama.cpp (and Ollama, LM Studio, ...).
        gguf_type: f32, f16, bf16, q8_0 or q4_0.
        hf_path: the Hugging Face OpenELM folder.
        hf_dtype: float32, float16 or bfloat16 for that folder (default: the weights' own type).
        adapter_path: a LoRA/DoRA adapter folder to fuse in first.
        overwrite: replace existing outputs.

    Returns:
        The paths written.
    """
    from ..gguf_export import GGUF_TYPES, check_representable, require_gguf, write_gguf

    if gguf_path is None and hf_path is None:
        raise UserError("nothing to write: give --gguf FILE and/or --hf FOLDER")
    if gguf_path is not None:
        require_gguf()
        if gguf_type not in GGUF_TYPES:
            raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if hf_dtype is not None and hf_dtype not in DTYPES:
        raise UserError(f"--hf-dtype {hf_dtype!r}: choose float32, float16 or bfloat16")
    for path in (gguf_path, hf_path):
        if path is not None and not overwrite and Path(path).exists():
            if Path(path).is_file() or any(Path(path).iterdir()):
                raise FileExistsError(f"{path} already exists: delete it or pass --overwrite")
    folder = hub.resolve(model, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model"])
    args = ModelArgs.from_file(folder / "config.json")
    tokenizer_file = folder / "tokenizer.model"
    if gguf_path is not None:
        check_representable(args)
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.model, and a GGUF file must hold the vocabulary: "
                "copy the model's SentencePiece tokenizer.model into the folder"
            )
    quantization = read_json(folder / "config.json").get("quantization")
    if quantization:
        bits = quantization.get("bits")
        log.info("note: %s holds %s-bit MLX weights: they are dequantised first", folder, bits)
    fused, _, _ = load(folder, adapter_path=adapter_path)
    fused = fuse_adapters(fused, dequantize=True)
    template = folder_template(folder)
    written = []
    if gguf_path is not None:
        weights = dict(tree_flatten(fused.parameters()))
        written.append(write_gguf(
            weights, args, gguf_path, gguf_type=gguf_type, tokenizer_file=tokenizer_file,
            chat_template=template, name=Path(str(model)).name, overwrite=overwrite,
        ))  # fmt: skip
    if hf_path is not None:
        export_hf(fused, args, hf_path, dtype=hf_dtype, tokenizer_file=tokenizer_file,
                  chat_template=template, overwrite=overwrite)  # fmt: skip
        written.append(Path(hf_path))
    return written
