"""A PyTorch OpenELM, faithful to Apple's Hugging Face `modeling_openelm.py`.

The reference for parity tests and the PyTorch (CPU/CUDA) side of the benchmark (the
checkpoint writers the tests use are in `tests/torch_checkpoints.py`). It imports only torch,
numpy and safetensors (never mlx), so it runs on a GPU machine without MLX. Parameter names are
the HF checkpoint keys.

The numerics follow HF: RMSNorm in fp32 cast back before the weight, q/k norm before RoPE, RoPE
applied in fp32 and cast back, GQA by repeat_interleave, SDPA. One difference in form, not in
result: the cache stores keys already rotated (HF rotates all cached keys at every step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Defaults for keys a hand-written config may omit: the released models' values, as in
# mlx_openelm.config.ModelArgs, so one config.json builds the same model on both sides.
DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000,
    max_context_length=2048,
    num_gqa_groups=4,
    qkv_multipliers=[0.5, 1.0],
    ffn_multipliers=[0.5, 4.0],
    ffn_dim_divisor=256,
    ffn_with_glu=True,
    normalize_qk_projections=True,
    share_input_output_layers=True,
    rms_norm_eps=1e-6,
    rope_freq_constant=10000,
    rope_max_length=4096,
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_divisible(v: float, divisor: int) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


def _per_layer(mult: Any, n: int, name: str) -> list[float]:
    if isinstance(mult, (int, float)):
        return [float(mult)] * n
    if len(mult) == n:
        return [float(m) for m in mult]
    if len(mult) == 2:
        return [round(float(m), 2) for m in np.linspace(mult[0], mult[1], num=n)]
    raise ValueError(f"{name} must be a number, a [min, max] pair or {n} values, got {mult!r}")


def expand_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with defaults filled in and per-layer lists expanded."""
    missing = [k for k in ("num_transformer_layers", "model_dim", "head_dim") if k not in config]
    if missing:
        raise ValueError(f"OpenELM config is missing {', '.join(missing)}")
    cfg = {**DEFAULTS, **config}
    n, hd = cfg["num_transformer_layers"], cfg["head_dim"]
    if cfg.get("num_query_heads") is None or cfg.get("num_kv_heads") is None:
        qkv = _per_layer(cfg["qkv_multipliers"], n, "qkv_multipliers")
        groups = cfg["num_gqa_groups"]
        nq = [make_divisible(cfg["model_dim"] * m, hd * groups) // hd for m in qkv]
        cfg["num_query_heads"], cfg["num_kv_heads"] = nq, [q // groups for q in nq]
    cfg["ffn_multipliers"] = _per_layer(cfg["ffn_multipliers"], n, "ffn_multipliers")
    for name in ("num_query_heads", "num_kv_heads"):
        if len(cfg[name]) != n:
            raise ValueError(f"{name} has {len(cfg[name])} entries for {n} layers")
    cfg["model_type"] = "openelm"
    return cfg


# ---- model


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight  # cast back BEFORE the weight, as HF does


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()  # RoPE in fp32, cast back
    return (xf * cos + _rotate_half(xf) * sin).type_as(x)


class KVCache:
    """Per-layer keys and values (B, n_kv_heads, T, head_dim), RoPE applied, grown by concat.

    `offset` is the number of positions already cached; `OpenELM.forward` advances it.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.offset = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = hd = cfg["head_dim"]
        self.n_heads = cfg["num_query_heads"][layer_id]
        self.n_kv_heads = cfg["num_kv_heads"][layer_id]
        d = cfg["model_dim"]
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        if cfg["normalize_qk_projections"]:
            self.q_norm = RMSNorm(hd, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(hd, cfg["rms_norm_eps"])
        else:
            self.q_norm = self.k_norm = None
        self.out_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, heads, L, head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # before RoPE
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        offset = 0
        if cache is not None:
            offset = cache.offset
            k, v = cache.update(self.layer_id, k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        T = k.shape[2]
        if L > 1 and offset > 0:
            # Query i sits at position offset + i and sees keys 0..offset + i.
            qpos = torch.arange(offset, offset + L, device=x.device)[:, None]
            mask = torch.arange(T, device=x.device)[None, :] <= qpos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_id: int):
        super().__init__()
        d = cfg["model_dim"]
        ffn_dim = make_divisible(cfg["ffn_multipliers"][layer_id] * d, cfg["ffn_dim_divisor"])
        self.glu = cfg["ffn_with_glu"]
        self.proj_1 = nn.Linear(d, (2 if self.glu else 1) * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_1(x)
        if self.glu:
            gate, x = x.chunk(2, dim=-1)  # the FIRST half is the gate
            return self.proj_2(F.silu(gate) * x)
        return self.proj_2(F.silu(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg["model_dim"], cfg["rms_norm_eps"])
        self.attn = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg["model_dim"], cfg["rms_norm_eps"])
        self.ffn = FeedForward(cfg, layer_id)

    def forward(self, x, cos, sin, cache):
        h = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg["vocab_size"], cfg["model_dim"])
        n = cfg["num_transformer_layers"]
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(n))
        self.norm = RMSNorm(cfg["model_dim"], cfg["rms_norm_eps"])


class OpenELM(nn.Module):
    """OpenELM for causal LM: token ids (B, L) -> logits (B, L, vocab), in the weights' dtype."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = cfg = expand_config(config)
        self.transformer = Transformer(cfg)
        if not cfg["share_input_output_layers"]:
            self.lm_head = nn.Linear(cfg["model_dim"], cfg["vocab_size"], bias=False)
        # fp32 cos/sin tables per device: plain attributes, so model.to(bf16) can't cast them.
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_table(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rope_tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            hd = self.config["head_dim"]
            base = self.config["rope_freq_constant"]
            inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            n = max(length, self.config["rope_max_length"])
            theta = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
            emb = torch.cat((theta, theta), dim=-1).to(device)
            cached = self._rope_tables[device] = (emb.cos(), emb.sin())
        return cached

    def forward(
        self, input_ids: torch.LongTensor, cache: KVCache | None = None, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits (B, L, vocab); only the last `logits_to_keep` positions' when it is > 0 (as in
        HF's newer models: generation needs only the last, and the head is 1/5 of the 270M)."""
        L = input_ids.shape[1]
        offset = cache.offset if cache is not None else 0
        cos, sin = self._rope_table(input_ids.device, offset + L)
        cos, sin = cos[offset : offset + L], sin[offset : offset + L]
        h = self.transformer.token_embeddings(input_ids)
        for layer in self.transformer.layers:
            h = layer(h, cos, sin, cache)
        h = self.transformer.norm(h[:, -logits_to_keep:] if logits_to_keep else h)
        if cache is not None:
            cache.offset += L
        if self.config["share_input_output_layers"]:
            return F.linear(h, self.transformer.token_embeddings.weight)
        return self.lm_head(h)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> OpenELM:
        """Load a Hugging Face OpenELM folder.

        Args:
            folder: holds `config.json` and `model.safetensors`, sharded safetensors with
                `model.safetensors.index.json`, or `pytorch_model.bin` (sharded or not).
            dtype: the weights' dtype after loading.
            device: where to put the model ("cpu", "cuda", ...).
        """
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"No config.json in {folder}: point at a Hugging Face folder")
        config = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            model = cls(config)
        state = _read_state_dict(folder)
        if model.config["share_input_output_layers"]:
            state.pop("lm_head.weight", None)  # tied: the embedding matrix is the head
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{folder} does not match its config.json: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        state = {k: v.to(dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.to(device=device).eval()


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, load in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load(str(folder / shard)))
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"No model.safetensors, sharded safetensors index or pytorch_model.bin in {folder}"
    )


def _load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def greedy_generate(model: OpenELM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with a KV cache; returns the new token ids (no stop token)."""
    device = next(model.parameters()).device
    cache = KVCache()
    logits = model(torch.tensor([prompt_ids], device=device), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), cache)
    return out


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
