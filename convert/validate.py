"""Check a checkpoint against its config before anything is read or written."""

from __future__ import annotations

import re

from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import UserError
from mlx_openelm.model import Model

from .tensors import FLOAT_DTYPES, TensorRef

LAYER = re.compile(r"transformer\.layers\.(\d{1,6})\.")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter `Model(args)` has, by name. MLX is lazy: no weight is allocated."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def _few(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def validate(tensors: dict[str, TensorRef], args: ModelArgs, source: str) -> None:
    """Raise one UserError (one line) naming every missing, unknown or misshapen tensor."""
    # Layer counts first, from the names: building a model of a config's (maybe absurd) size
    # only to list its missing tensors can take minutes.
    layers = {int(m[1]) for k in tensors if (m := LAYER.match(k))}
    if len(layers) != args.num_transformer_layers:
        raise UserError(
            f"{source} holds {len(layers)} transformer layers but its config says "
            f"{args.num_transformer_layers}: wrong config for this checkpoint"
        )
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in tensors]
    unknown = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} is {ref.shape}, expected {expected[k]}"
        for k, ref in tensors.items()
        if k in expected and ref.shape != expected[k]
    ]
    not_float = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if unknown:
        hint = ""
        if "lm_head.weight" in unknown and args.share_input_output_layers:
            hint = " [config.json ties the head to the embeddings: share_input_output_layers]"
        elif any(k.endswith(".scales") for k in unknown):
            hint = " [already quantised? convert the original checkpoint]"
        problems.append(f"{len(unknown)} unknown ({_few(unknown)}){hint}")
    if wrong:
        problems.append(f"wrong shape: {_few(wrong, 3)}")
    if not_float:
        problems.append(f"not floating point: {_few(not_float)}")
    if problems:
        raise UserError(
            f"{source} does not match its config ({args.num_transformer_layers} layers, "
            f"model_dim {args.model_dim}, vocab {args.vocab_size}): " + "; ".join(problems)
        )
