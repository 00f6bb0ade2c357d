"""CoreNet checkpoints: a flat `.pt` state dict plus the training YAML that describes the model.

The YAML's `model.language_modeling.general_gpt` section names the model (`model_name:
OpenELM-270M`, as CoreNet's `GPTConfig.from_name` reads it) and gives `vocab_size` (the padded
embedding rows, 32128 for the released models), `max_context_length` and `padding_index`. As our
extension, the section may also give the shape fields of `config.json` (`num_transformer_layers`,
`model_dim`, ...): they override the named size, or describe a model without a name.

The state dict's keys are the Hugging Face names without the `transformer.` prefix (an untied head
is `classifier.weight`). CoreNet appends the padding token after the tokenizer's pieces, so the
rows from `padding_index` on are not tokens and are dropped: 32128 -> 32000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mlx_openelm.config import ModelArgs, preset
from mlx_openelm.errors import UserError

from .readers import read_weights_file
from .tensors import TensorRef

SECTION = "model.language_modeling.general_gpt"
SHAPE_FIELDS = (
    "num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups", "qkv_multipliers",
    "num_query_heads", "num_kv_heads", "ffn_multipliers", "ffn_dim_divisor", "ffn_with_glu",
    "normalize_qk_projections", "share_input_output_layers", "rope_freq_constant",
    "rope_max_length", "max_context_length", "rms_norm_eps",
)  # fmt: skip
# CoreNet options our model does not implement other values of.
FIXED = {"activation_fn_name": ("swish", "silu"), "normalization_layer_name": ("rms_norm",)}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def read_yaml(path: str | Path) -> tuple[ModelArgs, int]:
    """(the model's config with the real vocab, the embedding rows in the checkpoint)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"No CoreNet YAML at {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {_one_line(e)}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    lm = model.get("language_modeling") if isinstance(model, dict) else None
    if not isinstance(lm, dict) or not isinstance(lm.get("general_gpt"), dict):
        raise UserError(f"{path} has no {SECTION} section: is it a CoreNet OpenELM training YAML?")
    if lm.get("name", "general_gpt") != "general_gpt":
        raise UserError(f"{path} trains {lm['name']!r}, not general_gpt (OpenELM)")
    section: dict[str, Any] = lm["general_gpt"]
    for key, allowed in FIXED.items():
        if section.get(key, allowed[0]) not in allowed:
            raise UserError(f"{path}: {key} {section[key]!r} is not supported (only {allowed[0]})")

    fields = {k: section[k] for k in SHAPE_FIELDS if k in section}
    rows = section.get("vocab_size")
    if not isinstance(rows, int) or rows <= 0:
        raise UserError(f"{path}: {SECTION}.vocab_size must be a positive integer, got {rows!r}")
    pad = section.get("padding_index")
    vocab = pad if isinstance(pad, int) and 0 < pad < rows else rows
    name = section.get("model_name")
    try:
        if name is None:
            return ModelArgs.from_dict({**fields, "vocab_size": vocab}), rows
        try:
            preset(str(name))
        except ValueError:
            raise UserError(
                f"model_name {name!r} is not an OpenELM size (OpenELM-270M, -450M, -1_1B, -3B); "
                "give the shape fields (num_transformer_layers, model_dim, head_dim, ...) instead"
            ) from None
        return preset(str(name), **fields, vocab_size=vocab), rows  # fields override the size
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {SECTION}: {_one_line(e)}") from None


def _hf_name(key: str) -> str:
    if key == "classifier.weight":
        return "lm_head.weight"
    if key.startswith("transformer.") or key == "lm_head.weight":
        return key
    return "transformer." + key


def read_corenet(
    pt: str | Path, config_yaml: str | Path
) -> tuple[ModelArgs, dict[str, TensorRef], list[str]]:
    """A CoreNet checkpoint as Hugging Face names, padding rows dropped; its config; notes."""
    args, rows = read_yaml(config_yaml)
    pt = Path(pt)
    state = read_weights_file(pt)
    emb = state.get("token_embeddings.weight", state.get("transformer.token_embeddings.weight"))
    if emb is not None and emb.shape[:1] != (rows,):
        raise UserError(
            f"{pt}: the embedding has {emb.shape[0]} rows but {config_yaml} says vocab_size "
            f"{rows}: is this the YAML the checkpoint was trained with?"
        )
    tensors = {}
    for key, ref in state.items():
        name = _hf_name(key)
        if name in ("transformer.token_embeddings.weight", "lm_head.weight"):
            if rows > args.vocab_size and ref.shape[:1] == (rows,):
                ref = ref.first_rows(args.vocab_size)
        tensors[name] = ref
    notes = []
    if rows > args.vocab_size:
        notes.append(f"dropped vocab rows {args.vocab_size}..{rows - 1} (padding)")
    return args, tensors, notes
