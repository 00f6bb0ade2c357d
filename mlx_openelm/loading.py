"""Loading and saving MLX model folders (`config.json` + `model*.safetensors` [+ tokenizer]).

The folder layout is mlx-lm's, so our folders load in `mlx_lm.load` and mlx-community OpenELM
folders load here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import save_model as _mlx_lm_save_model

from . import hub
from .config import ModelArgs
from .errors import UserError
from .model import Model
from .tokenizer import load_tokenizer


def save_model(
    folder: str | Path,
    model: nn.Module,
    args: ModelArgs,
    *,
    quantization: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write weights (sharded past 5 GB, with an index) and `config.json` into `folder`."""
    folder = Path(folder)
    _mlx_lm_save_model(folder, model)
    save_config(folder, args, quantization=quantization, extra_config=extra_config)


def save_config(
    folder: Path,
    args: ModelArgs,
    *,
    quantization: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    config = {**args.to_dict(), **(extra_config or {})}
    if quantization:
        # mlx-lm reads `quantization`; transformers-style tools look for `quantization_config`.
        config["quantization"] = config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# What `load` fetches of a Hub repo: a model folder's files, nothing else.
PATTERNS = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]


HALF = (mx.float16, mx.bfloat16)


def product_scales(model: nn.Module) -> set[str]:
    """The parameter names of the quantized products' scales and biases: the 16-bit parameters
    that the CPU kernels read as they are, with float32 activations."""
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.QuantizedLinear)
        for key in ("scales", "biases")
    }


def float32_on_cpu(model: nn.Module) -> int:
    """On a CPU, run a quantized model with 16-bit parameters in float32; return how many
    parameters changed.

    A folder quantized on a Mac (`convert -q` writes bfloat16 there, as mlx-community's do) keeps
    its norms and the embedding's scales in 16 bits, so its activations would be 16-bit, which
    the CPU kernels do not take and MLX's CPU back end runs in scalar code. Those few parameters
    become float32 (a few MB); the products' scales and biases stay 16-bit, which the kernels read
    as fast as float32 ones. A 16-bit model that is not quantized stays as it is: doubling all of
    it is the user's choice (`convert --dtype float32`; `generate` says so).
    """
    if mx.default_device() != mx.cpu:
        return 0
    params = tree_flatten(model.parameters())
    if not any(key.endswith(".scales") for key, _ in params):
        return 0
    keep = product_scales(model)
    cast = [(k, p.astype(mx.float32)) for k, p in params if p.dtype in HALF and k not in keep]
    if cast:
        model.load_weights(cast, strict=False)
    return len(cast)


def load_config(folder: str | Path) -> ModelArgs:
    return ModelArgs.from_file(Path(folder) / "config.json")


def load(
    path: str | Path,
    *,
    naive_rms_norm: bool = False,
    lazy: bool = False,
    adapter_path: str | Path | None = None,
    run_on_cpu: bool = False,
) -> tuple[Model, Any, ModelArgs]:
    """Load an MLX OpenELM folder (ours or mlx-community's), local or a Hub repo id.

    Args:
        path: the folder, or `owner/name` on the Hub (huggingface-hub's cache is used).
        naive_rms_norm: build the unfused RMSNorm of the paper (for benchmarks).
        lazy: leave the weights memory-mapped until first use.
        adapter_path: a LoRA/DoRA adapter folder (`mlx-openelm lora`) to apply.
        run_on_cpu: to run the model, not to write it out: on a CPU a quantized model with
            16-bit parameters then computes in float32 (`float32_on_cpu`).

    Returns:
        (model, tokenizer, config); tokenizer is None when the folder has none.
    """
    folder = hub.resolve(path, allow_patterns=PATTERNS)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: is it an MLX model folder?")
    args = load_config(folder)  # validates model_type and shapes with a clear message
    if not any(folder.glob("model*.safetensors")):
        raise FileNotFoundError(
            f"{folder} has no model*.safetensors: "
            "convert a PyTorch checkpoint with `mlx-openelm convert`"
        )
    try:
        model, _ = _mlx_lm_load_model(
            folder,
            lazy=lazy,
            model_config={"naive_rms_norm": naive_rms_norm},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    except ValueError as e:
        raise UserError(f"{folder}: weights do not match config.json: {e}") from None
    if adapter_path is not None:
        from .adapters import load_adapters  # mlx-lm's tuner package only when asked for

        load_adapters(model, adapter_path)
    if run_on_cpu:
        float32_on_cpu(model)
    model.eval()
    return model, load_tokenizer(folder), args
