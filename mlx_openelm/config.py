"""OpenELM configuration and layer-wise scaling.

One dataclass, `ModelArgs`, describes every OpenELM: the four released presets, a Hugging Face
`config.json` (with per-layer lists or 2-element ranges) and a size a user designs. The per-layer
head counts and FFN widths are derived here, once, with the reference's exact rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError, is_int
from .files import read_json

MODEL_TYPE = "openelm"


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round `v` to a multiple of `divisor`, never more than 10% below `v` (CoreNet's rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# Caps on what cannot be a real OpenELM (the largest has 36 layers, dim 3072): a config past them
# is refused at once, before a model is built (a million layers took minutes) or MLX's int32
# shapes overflow.
MAX_LAYERS = 1024
MAX_DIM = 1 << 20  # model_dim, head_dim, FFN width, divisors
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24
MAX_PARAMETERS = 1 << 40
INT_FIELDS = {
    "num_transformer_layers": MAX_LAYERS, "model_dim": MAX_DIM, "head_dim": MAX_DIM,
    "vocab_size": MAX_VOCAB, "max_context_length": MAX_CONTEXT, "num_gqa_groups": MAX_DIM,
    "ffn_dim_divisor": MAX_DIM, "rope_max_length": MAX_CONTEXT,
}  # fmt: skip
BOOL_FIELDS = ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_fields(args: Any) -> None:
    """Types and ranges of every field, so a bad config is one clear error, not a crash later."""
    for name, cap in INT_FIELDS.items():
        v = getattr(args, name)
        if not is_int(v) or v <= 0:
            raise UserError(f"{name} must be a positive integer, got {v!r:.80}")
        if v > cap:
            raise UserError(f"{name} is {v}: more than {cap:,}, no real OpenELM has that; refused")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(args, name), bool):
            raise UserError(f"{name} must be true or false, got {getattr(args, name)!r:.80}")
    for name in ("rms_norm_eps", "rope_freq_constant"):
        if not _is_number(getattr(args, name)) or getattr(args, name) <= 0:
            raise UserError(f"{name} must be a positive number, got {getattr(args, name)!r:.80}")
    for name in ("qkv_multipliers", "ffn_multipliers"):
        v = getattr(args, name)
        values = v if isinstance(v, (list, tuple)) else [v]
        if len(values) > MAX_LAYERS or not all(_is_number(m) and 0 < m <= 1e4 for m in values):
            raise UserError(f"{name} must be positive numbers, got {v!r:.80}")
    for name in ("num_query_heads", "num_kv_heads"):
        v = getattr(args, name)
        ok = v is None or (
            isinstance(v, (list, tuple))
            and len(v) <= MAX_LAYERS
            and all(is_int(n) and 0 < n <= MAX_DIM for n in v)
        )
        if not ok:
            raise UserError(f"{name} must be a list of positive integers, got {v!r:.80}")


def _expand(mult: float | Sequence[float], num_layers: int, name: str) -> list[float]:
    """A scalar, a (min, max) range or a per-layer list -> one multiplier per layer."""
    if isinstance(mult, (int, float)):
        return [float(mult)] * num_layers
    mult = [float(m) for m in mult]
    if len(mult) == num_layers:
        return mult
    if len(mult) == 2:
        # np.linspace + round(., 2), as the reference does: the rounding decides some layer sizes.
        return [round(float(m), 2) for m in np.linspace(mult[0], mult[1], num=num_layers)]
    raise UserError(
        f"{name} must be a number, a [min, max] pair or one value per layer "
        f"({num_layers}), got {len(mult)} values"
    )


@dataclass
class ModelArgs:
    """An OpenELM's shape. Field names follow the Hugging Face `config.json` so it round-trips."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    vocab_size: int = 32000
    max_context_length: int = 2048
    num_gqa_groups: int = 4
    # alpha_min, alpha_max: attention width of the first and last layer, as a fraction of model_dim
    qkv_multipliers: Any = (0.5, 1.0)
    # beta_min, beta_max: FFN width of the first and last layer, as a multiple of model_dim
    ffn_multipliers: Any = (0.5, 4.0)
    ffn_dim_divisor: int = 256
    num_query_heads: list[int] | None = None
    num_kv_heads: list[int] | None = None
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    model_type: str = MODEL_TYPE
    # Not part of the checkpoint: a benchmark switch to the paper's unfused RMSNorm.
    naive_rms_norm: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise UserError(
                f"model_type is {self.model_type!r}, not {MODEL_TYPE!r}: "
                "this is not an OpenELM config"
            )
        _check_fields(self)
        L = self.num_transformer_layers
        if self.num_query_heads is None or self.num_kv_heads is None:
            qkv = _expand(self.qkv_multipliers, L, "qkv_multipliers")
            q_div = self.head_dim * self.num_gqa_groups
            self.num_query_heads = [
                int(make_divisible(self.model_dim * m, q_div)) // self.head_dim for m in qkv
            ]
            self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        self.num_query_heads = [int(n) for n in self.num_query_heads]
        self.num_kv_heads = [int(n) for n in self.num_kv_heads]
        self.ffn_multipliers = _expand(self.ffn_multipliers, L, "ffn_multipliers")
        if isinstance(self.qkv_multipliers, (list, tuple)):
            self.qkv_multipliers = [float(m) for m in self.qkv_multipliers]
        for name in ("num_query_heads", "num_kv_heads"):
            if len(getattr(self, name)) != L:
                raise UserError(f"{name} has {len(getattr(self, name))} entries for {L} layers")
        for i, (nq, nkv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if nq <= 0 or nkv <= 0 or nq % nkv:
                raise UserError(f"layer {i}: {nq} query heads can't share {nkv} kv heads")
        widths = [self.model_dim, *self.ffn_dims, max(self.num_query_heads) * self.head_dim]
        if max(widths) > MAX_DIM or self.num_parameters() > MAX_PARAMETERS:
            raise UserError(
                f"this config builds {self.num_parameters():,} parameters, widths up to "
                f"{max(widths):,}: past what any OpenELM has ({MAX_DIM:,} wide, "
                f"{MAX_PARAMETERS:,} parameters); refused"
            )

    @property
    def ffn_dims(self) -> list[int]:
        """Hidden width of each layer's FFN (`proj_1` outputs twice this with GLU)."""
        return [
            int(make_divisible(m * self.model_dim, self.ffn_dim_divisor))
            for m in self.ffn_multipliers
        ]

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d + d  # embeddings + final norm
        if not self.share_input_output_layers:
            total += self.vocab_size * d
        for nq, nkv, f in zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims):
            total += d * (nq + 2 * nkv) * hd + nq * hd * d  # qkv_proj, out_proj
            total += 2 * hd if self.normalize_qk_projections else 0
            total += d * f * (2 if self.ffn_with_glu else 1) + f * d  # proj_1, proj_2
            total += 2 * d  # attn_norm, ffn_norm
        return total

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """Build from a `config.json` dict, ignoring keys that are not ours (as mlx-lm does)."""
        known = inspect.signature(cls).parameters
        missing = [
            k for k in ("num_transformer_layers", "model_dim", "head_dim") if k not in params
        ]
        if params.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise UserError(
                f"model_type is {params.get('model_type')!r}, not {MODEL_TYPE!r}: "
                "this is not an OpenELM config"
            )
        if missing:
            raise UserError(f"OpenELM config is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` form: expanded per-layer lists, readable by mlx-lm too."""
        d = asdict(self)
        d.pop("naive_rms_norm")
        d["qkv_multipliers"] = (
            list(d["qkv_multipliers"])
            if isinstance(d["qkv_multipliers"], (list, tuple))
            else d["qkv_multipliers"]
        )
        d.update(
            architectures=["OpenELMForCausalLM"],
            bos_token_id=1,
            eos_token_id=2,
            activation_fn_name="swish",
            normalization_layer_name="rms_norm",
        )
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        try:
            params = read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"No config.json at {path}") from None
        if not isinstance(params, dict):
            raise UserError(f"{path} is not a JSON object")
        try:
            return cls.from_dict(params)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None


# The four released sizes (Apple's Hugging Face configs); every other field is the default above.
PRESETS: dict[str, dict[str, Any]] = {
    "270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """A released size by name ("270M", "OpenELM-450M", "apple/OpenELM-3B-Instruct" all work)."""
    key = name.split("/")[-1].removeprefix("OpenELM-").removesuffix("-Instruct")
    if key not in PRESETS:
        raise UserError(f"Unknown OpenELM preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[key], **overrides})
