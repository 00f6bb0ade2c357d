"""A Hugging Face OpenELM folder from an MLX model: our parameter names are the Hugging Face ones,
so it is dequantise, cast and save."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from ..config import ModelArgs
from ..errors import UserError
from ..files import atomic_folder
from ..tokenizer import write_tokenizer_files

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
