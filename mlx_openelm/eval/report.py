"""What a report says about the model it measured: folder, adapter, dtype, bits, versions."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..files import read_json


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    out = {d: _version(d) for d in ("mlx-openelm", "mlx", "mlx-lm", "lm-eval")}
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    out["device"] = str(mx.default_device())
    return out


def describe_model(model: nn.Module, path: str | None, adapter_path: str | None) -> dict[str, Any]:
    """The model as loaded: where from, weights dtype, quantisation, adapter."""
    quant = next(
        (
            m
            for _, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        ),
        None,
    )
    adapter = None
    if adapter_path is not None:
        config = Path(adapter_path) / "adapter_config.json"
        adapter = {"path": str(adapter_path)}
        if config.is_file():
            adapter["config"] = read_json(config)
    args = model.args
    return {
        "model": path,
        "adapter": adapter,
        # Norm weights keep the converted dtype even in a quantised model.
        "dtype": str(model.transformer.norm.weight.dtype).removeprefix("mlx.core."),
        "bits": quant.bits if quant is not None else None,
        "group_size": quant.group_size if quant is not None else None,
        "num_transformer_layers": args.num_transformer_layers,
        "model_dim": args.model_dim,
        "vocab_size": args.vocab_size,
        "max_context_length": args.max_context_length,
        "versions": versions(),
    }


def write_report(report: dict[str, Any], output: str | Path | None) -> None:
    """Write `report` as JSON to `output` (nothing when None), making its folder."""
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2, default=str) + "\n")
