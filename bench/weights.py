"""Random weights for the benchmark: the same folder goes to every implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def random_weights(model: Any, seed: int = 0) -> None:
    """Random weights with which a random model emits varied greedy tokens with clear margins.

    Like `torch_checkpoints.random_model` (linears N(0, 1/fan_in), residual outputs scaled by
    1/sqrt(2 * layers), norms 1 + 0.1 N(0, 1)) with three changes, because a random model tends to
    repeat one token under greedy decoding (MLX's default init does it every step), and then a
    token check proves little. The residual stream carries each token's own embedding to the tied
    head, which favours that token: embeddings at 1/4 scale (the final norm x8 keeps logits at
    std ~2, so the argmax clears the runner-up by far more than fp32 rounding). And attention,
    which at random averages a context that barely moves from one step to the next: its output
    projection at half scale.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    d, n = model.args.model_dim, model.args.num_transformer_layers
    weights = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        key = mx.random.key(seed * 1_000_003 + i)
        w = mx.random.normal(p.shape, key=key)
        if "norm" in name:
            w = (8 if name == "transformer.norm.weight" else 1) * (1 + 0.1 * w)
        elif name.endswith(("out_proj.weight", "proj_2.weight")):
            w = w * (d**-0.5 * (2 * n) ** -0.5) * (0.5 if "out_proj" in name else 1)
        elif "embeddings" in name or name.startswith("lm_head"):
            w = w * 0.25 * d**-0.5
        else:
            w = w * p.shape[1] ** -0.5
        weights.append((name, w.astype(p.dtype)))
        mx.eval(weights[-1][1])
    model.update(tree_unflatten(weights))


def random_folder(args: Any, folder: str | Path, seed: int = 0) -> Path:
    """Save an fp32 MLX model folder of shape `args` with `random_weights`."""
    import mlx.core as mx  # noqa: I001

    import mlx_openelm

    model = mlx_openelm.Model(args)
    random_weights(model, seed)
    mx.eval(model.parameters())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mlx_openelm.save_model(folder, model, args)
    del model
    mx.clear_cache()  # don't hold the weights in this process while the workers run
    return folder


def uniform_twin(args: Any) -> Any:
    """A Llama/OLMo-like twin: every layer the same width, parameter count as close as it gets."""
    from mlx_openelm.config import ModelArgs

    base = args.to_dict()
    q_mid = sum(args.qkv_multipliers) / len(args.qkv_multipliers)
    best = None
    for k in range(1, 64):
        ffn = k * args.ffn_dim_divisor / args.model_dim
        cand = ModelArgs.from_dict(
            {**base, "num_query_heads": None, "num_kv_heads": None,
             "qkv_multipliers": q_mid, "ffn_multipliers": ffn}
        )  # fmt: skip
        gap = abs(cand.num_parameters() - args.num_parameters())
        if best is None or gap < best[0]:
            best = (gap, cand)
    return best[1]
