"""Check a checkpoint against its config before anything is read or written."""

from __future__ import annotations

from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.model import Model

from .tensors import FLOAT_DTYPES, TensorRef


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter `Model(args)` has, by name. MLX is lazy: no weight is allocated."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def _few(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def validate(tensors: dict[str, TensorRef], args: ModelArgs, source: str) -> None:
    """Raise one ValueError (one line) naming every missing, unknown or misshapen tensor."""
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
        raise ValueError(
            f"{source} does not match its config ({args.num_transformer_layers} layers, "
            f"model_dim {args.model_dim}, vocab {args.vocab_size}): " + "; ".join(problems)
        )
