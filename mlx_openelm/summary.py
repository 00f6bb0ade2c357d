"""`mlx-openelm info`: a model's layer-wise shape, to check a checkpoint or design a new size."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import hub
from .config import ModelArgs
from .config import preset as preset_args
from .errors import UserError


def resolve_args(model: str | None, preset: str | None, config: Path | None) -> ModelArgs:
    """Exactly one of a model folder (or Hub id), a preset name or a config.json."""
    given = [x for x in (model, preset, config) if x is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --model, --preset or --config")
    if preset is not None:
        return preset_args(preset)
    path = (
        Path(config) if config is not None else hub.resolve(model, ["config.json"]) / "config.json"
    )
    return ModelArgs.from_file(path)


def describe(
    model: str | None = None, preset: str | None = None, config: Path | None = None
) -> None:
    args = resolve_args(model, preset, config)
    table = Table(title="OpenELM layer-wise scaling")
    for col in ("layer", "query heads", "kv heads", "attn width", "ffn width", "parameters"):
        table.add_column(col, justify="right")
    d, hd = args.model_dim, args.head_dim
    glu = 2 if args.ffn_with_glu else 1
    for i, (nq, nkv, f) in enumerate(zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)):
        n = d * (nq + 2 * nkv) * hd + nq * hd * d + (glu + 1) * d * f
        table.add_row(str(i), str(nq), str(nkv), str(nq * hd), str(f), f"{n / 1e6:.2f} M")
    console = Console()
    console.print(table)
    total = args.num_parameters()
    tied = "tied" if args.share_input_output_layers else "separate lm_head"
    console.print(
        f"model_dim {d}, head_dim {hd}, vocab {args.vocab_size} ({tied}), "
        f"context {args.max_context_length}: {total:,} parameters "
        f"({total * 4 / 2**30:.2f} GiB fp32, {total * 2 / 2**30:.2f} GiB bf16)"
    )
