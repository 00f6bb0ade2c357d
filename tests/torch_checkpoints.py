"""Random PyTorch OpenELMs and the checkpoint files Apple publishes them in, for tests.

`random_model` builds a `reference.OpenELM` with weights scaled so its logits are near unit size;
`save_hf` writes it as a Hugging Face folder (safetensors or `pytorch_model.bin`, sharded or not)
and `save_corenet` as a CoreNet `.pt` + YAML pair: the converter's inputs, made offline. Like
`reference.py`, it imports torch and never mlx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from mlx_openelm.bench.reference import DTYPE_NAMES, OpenELM, expand_config

from mlx_openelm.errors import UserError

# CoreNet's `gpt_configs` names for the released sizes (every other field is a default below).
CORENET_MODELS: dict[str, dict[str, Any]] = {
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}
# What a CoreNet model name fixes: the model must agree on all of these to be saved under it.
SHAPE_KEYS = (
    "num_transformer_layers", "model_dim", "head_dim", "num_query_heads", "num_kv_heads",
    "ffn_multipliers", "ffn_dim_divisor", "ffn_with_glu", "normalize_qk_projections",
    "share_input_output_layers", "rope_freq_constant",
)  # fmt: skip


@torch.no_grad()
def random_model(config: dict[str, Any], seed: int = 0) -> OpenELM:
    """Random fp32 weights scaled so logits are near unit size; norms are 1 + 0.1 * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    model = OpenELM(config)
    d, n = model.config["model_dim"], model.config["num_transformer_layers"]
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(("out_proj.weight", "proj_2.weight")):
            # CoreNet's residual-branch scale keeps the stream from growing with depth.
            p.normal_(0.0, d**-0.5 * (2 * n) ** -0.5, generator=gen)
        else:
            # Embeddings d^-1/2 (so tied logits ~ N(0,1)); linears fan_in^-1/2.
            p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval()


def _hf_config(model: OpenELM, dtype: torch.dtype) -> dict[str, Any]:
    cfg = dict(model.config)
    cfg.update(
        architectures=["OpenELMForCausalLM"],
        activation_fn_name="swish",
        normalization_layer_name="rms_norm",
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype=DTYPE_NAMES[dtype],
        auto_map={
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
    )
    return cfg


def _shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def save_hf(
    model: OpenELM,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
    max_shard_bytes: int | None = None,
) -> None:
    """Write a Hugging Face OpenELM folder (what apple/OpenELM-* on the Hub hold).

    Args:
        model: the model to save.
        folder: created if needed.
        dtype: weights dtype (torch.float32, torch.bfloat16 or torch.float16).
        fmt: "safetensors" or "bin" (`torch.save`'s zip format).
        max_shard_bytes: split into `model-0000N-of-0000M.*` shards plus an index when the
            weights exceed this; None writes one file.
    """
    if fmt not in ("safetensors", "bin"):
        raise UserError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if dtype not in DTYPE_NAMES:
        raise UserError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Tied models have no lm_head parameter, so no lm_head.weight is written.
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    shards = _shards(state, max_shard_bytes)

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)

    if len(shards) == 1:
        write(state, f"{stem}.{ext}")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
            write(shard, name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = _hf_config(model, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_CORENET_YAML = """\
# OpenELM training config (CoreNet layout), written by mlx_openelm.bench.reference.
taskname: '+ [{title}]'

_anchor_context_length: &_anchor_context_length {context}
_anchor_vocab_size: &_anchor_vocab_size {vocab}
{padding_anchor}
text_tokenizer:
  name: "sentence_piece"

model:
  activation_checkpointing: false
  language_modeling:
    name: "general_gpt"
    general_gpt:
{fields}"""


@torch.no_grad()
def save_corenet(
    model: OpenELM,
    pt_path: str | Path,
    yaml_path: str | Path,
    *,
    model_name: str | None = None,
    padded_vocab: int | None = None,
) -> None:
    """Write a CoreNet checkpoint: a flat `.pt` state dict plus its training YAML.

    Keys lose the `transformer.` prefix (an untied head is CoreNet's `classifier.weight`), and the
    vocab rows are padded with random rows up to `padded_vocab` (32128 for the released models,
    whose id 32000 is the padding index).

    Args:
        model: the model to save; its dtype is kept.
        pt_path: the `.pt` file to write.
        yaml_path: the YAML to write (`model.language_modeling.general_gpt` section).
        model_name: a CoreNet name ("OpenELM-270M", ...) when the model has that shape; None
            writes the shape fields explicitly (our extension: CoreNet itself only knows names).
        padded_vocab: rows in the saved embedding; None keeps the model's vocab_size.
    """
    cfg = model.config
    vocab = cfg["vocab_size"]
    padded = vocab if padded_vocab is None else padded_vocab
    if padded < vocab:
        raise UserError(f"padded_vocab ({padded}) is smaller than vocab_size ({vocab})")
    if model_name is not None:
        named = CORENET_MODELS.get(model_name)
        if named is None or any(expand_config(named)[k] != cfg[k] for k in SHAPE_KEYS):
            raise UserError(
                f"model_name {model_name!r} does not name this model's shape: use one of "
                f"{', '.join(CORENET_MODELS)} for a released size, or None to write the fields"
            )
    gen = torch.Generator().manual_seed(1)
    state = {}
    for k, v in model.state_dict().items():
        k = "classifier.weight" if k == "lm_head.weight" else k.removeprefix("transformer.")
        v = v.detach().cpu()
        if k in ("token_embeddings.weight", "classifier.weight") and padded > vocab:
            extra = torch.randn(padded - vocab, v.shape[1], generator=gen) * float(v.float().std())
            v = torch.cat([v, extra.to(v.dtype)])
        state[k] = v.contiguous()
    Path(pt_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, pt_path)

    fields: dict[str, Any] = {}
    if model_name is not None:
        fields["model_name"] = model_name
    else:
        keys = [
            "num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups",
            "qkv_multipliers", "num_query_heads", "num_kv_heads", "ffn_multipliers",
            "ffn_dim_divisor", "ffn_with_glu", "normalize_qk_projections",
            "share_input_output_layers", "rope_freq_constant", "rope_max_length",
        ]  # fmt: skip
        fields.update({k: cfg[k] for k in keys})
        fields.update(activation_fn_name="swish", normalization_layer_name="rms_norm")
    # JSON values are valid YAML and keep the per-layer lists on one line.
    lines = [f"{k}: {json.dumps(v)}" for k, v in fields.items()] + [
        "vocab_size: *_anchor_vocab_size",
        "max_context_length: *_anchor_context_length",
    ]
    padding_anchor = ""
    if padded > vocab:
        lines.append("padding_index: *_anchor_padding_index")
        padding_anchor = f"_anchor_padding_index: &_anchor_padding_index {vocab}\n"
    text = _CORENET_YAML.format(
        title=model_name or "OpenELM-custom",
        context=cfg["max_context_length"],
        vocab=padded,
        padding_anchor=padding_anchor,
        fields="".join(f"      {line}\n" for line in lines),
    )
    Path(yaml_path).parent.mkdir(parents=True, exist_ok=True)
    Path(yaml_path).write_text(text)
