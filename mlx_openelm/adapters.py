"""LoRA/DoRA adapters for inference: apply them, load an adapter folder, fuse them in.

The adapter folder (`adapters.safetensors` + `adapter_config.json`) uses mlx-lm's layout and names,
so mlx-lm's own `openelm` model loads it too. Training them is `train/lora.py`; this module
imports nothing from `train/`, so `load(adapter_path=...)` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

from .errors import UserError
from .files import read_json

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2")
# Our target names -> mlx-lm keys: relative to a block, or to the model for the embeddings/head.
TARGET_KEYS = {
    "token_embeddings": "transformer.token_embeddings",
    "qkv_proj": "attn.qkv_proj",
    "out_proj": "attn.out_proj",
    "proj_1": "ffn.proj_1",
    "proj_2": "ffn.proj_2",
    "lm_head": "lm_head",
}
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


class QuantizedDoRAEmbedding(DoRAEmbedding):
    """DoRA on a quantised embedding (QLoRA): mlx-lm's DoRAEmbedding reads the packed weight."""

    @staticmethod
    def from_base(
        embedding: nn.QuantizedEmbedding, r: int = 8, dropout: float = 0.0, scale: float = 20.0
    ) -> QuantizedDoRAEmbedding:
        num, packed = embedding.weight.shape
        layer = QuantizedDoRAEmbedding(num, packed * 32 // embedding.bits, r, dropout, scale)
        layer.set_embedding(embedding)
        return layer

    def _weight(self) -> mx.array:
        e = self.embedding
        if not isinstance(e, nn.QuantizedEmbedding):
            return e.weight
        return mx.dequantize(e.weight, e.scales, e.biases, e.group_size, e.bits, mode=e.mode)

    def set_embedding(self, embedding: nn.Module) -> None:
        self.embedding = embedding
        self.m = mx.linalg.norm(self._weight().astype(mx.float32), axis=1)

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.embedding.as_linear(x)
        z = (self.dropout(x) @ self.lora_b.T) @ self.lora_a.T
        out = y + (self.scale * z).astype(x.dtype)
        adapted = self._weight() + (self.scale * self.lora_a) @ self.lora_b
        denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        return (self.m / denom).astype(x.dtype) * out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self._weight()
        weight = weight + (self.scale * self.lora_a @ self.lora_b).astype(weight.dtype)
        fused = nn.Embedding(*weight.shape)
        fused.weight = ((self.m / mx.linalg.norm(weight, axis=1))[:, None] * weight).astype(
            weight.dtype
        )
        e = self.embedding
        if isinstance(e, nn.QuantizedEmbedding) and not dequantize:
            return nn.QuantizedEmbedding.from_embedding(fused, e.group_size, e.bits, mode=e.mode)
        return fused


def adapter_config(
    num_layers: int,
    *,
    dora: bool = False,
    rank: int = 32,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> dict[str, Any]:
    """The `adapter_config.json` dict, in mlx-lm's format (plus our `alpha` and `targets`).

    mlx-lm scales the low-rank update by `scale` directly; LoRA papers use alpha / rank.
    """
    if num_layers < 1:
        raise UserError(f"num_layers must be at least 1, got {num_layers}")
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserError(
            f"need rank >= 1, alpha > 0 and 0 <= dropout < 1; got {rank}, {alpha}, {dropout}"
        )
    unknown = [t for t in targets if t not in TARGET_KEYS]
    if unknown or not targets:
        raise UserError(
            f"unknown LoRA targets {unknown or '(none)'}: choose from {', '.join(TARGET_KEYS)}"
        )
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": alpha / rank,
            "dropout": dropout,
            "keys": [TARGET_KEYS[t] for t in targets],
        },
        "alpha": alpha,
        "targets": list(targets),
    }


def apply_lora(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Freeze `model` (base weights and norms) and wrap its target layers in LoRA/DoRA layers."""
    model.freeze()
    params = config["lora_parameters"]
    dora = config.get("fine_tune_type", "lora") == "dora"
    keys = params.get("keys")  # None (mlx-lm's default): every linear layer in the blocks
    if keys is not None:
        keys = list(keys)
        if "lm_head" in keys and "lm_head" not in model:
            raise UserError("lm_head is not a target here: this model ties it to token_embeddings")
        emb, emb_key = model.transformer.token_embeddings, TARGET_KEYS["token_embeddings"]
        if dora and isinstance(emb, nn.QuantizedEmbedding) and emb_key in keys:
            keys.remove(emb_key)
            model.transformer.token_embeddings = QuantizedDoRAEmbedding.from_base(
                emb, r=params["rank"], dropout=params["dropout"], scale=params["scale"]
            )
    linear_to_lora_layers(model, config["num_layers"], {**params, "keys": keys}, use_dora=dora)
    return model


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapters in `adapter_path` (`adapter_config.json` + `adapters.safetensors`)."""
    adapter_path = Path(adapter_path)
    for name in (ADAPTER_CONFIG, ADAPTERS):
        if not (adapter_path / name).is_file():
            raise FileNotFoundError(f"{adapter_path} has no {name}: is it an adapter folder?")
    config = read_json(adapter_path / ADAPTER_CONFIG)
    if config.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise UserError(f"{adapter_path}: only LoRA and DoRA adapters are supported")
    apply_lora(model, config)
    weights = mx.load(str(adapter_path / ADAPTERS))
    expected = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, w in weights.items() if k not in expected or w.shape != expected[k].shape]
    missing = [k for k in expected if k not in weights]
    if bad or missing:
        raise UserError(
            f"{adapter_path / ADAPTERS} does not fit this model: "
            f"{len(bad)} unexpected or misshapen tensors (e.g. {(bad + missing)[0]}), "
            f"{len(missing)} missing; was it trained on another base model?"
        )
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return model


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter layer into a plain (or, from a quantised base, re-quantised) layer."""
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return model
