"""Write a model for other tools: a Hugging Face OpenELM folder (`hf.py`) or a GGUF file for
llama.cpp, Ollama and LM Studio (`gguf.py`); `export` is the `mlx-openelm export` command."""

from __future__ import annotations

import logging
from pathlib import Path

from mlx.utils import tree_flatten

from .. import hub
from ..adapters import fuse_adapters
from ..chat_template import folder_template
from ..config import ModelArgs
from ..errors import UserError
from ..files import read_json
from ..loading import load
from .hf import DTYPES, export_hf

log = logging.getLogger(__name__)


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
    from .gguf import GGUF_TYPES, check_representable, require_gguf, write_gguf

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
