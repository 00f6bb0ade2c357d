"""The PyTorch reference OpenELM (bench/reference.py): caches, checkpoints, and parity with MLX."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch_checkpoints as C
import yaml
from mlx_lm.models.cache import make_prompt_cache
from mlx_openelm.bench import reference as R

import mlx_openelm  # noqa: F401  (loads a fast BLAS before mlx.core)
from mlx_openelm.config import ModelArgs, preset
from mlx_openelm.model import Model

# Layer-wise scaling that actually varies at this size: 4/6/6/8 query heads, GQA 2, FFN 64..256.
TINY = dict(
    num_transformer_layers=4,
    model_dim=128,
    head_dim=16,
    vocab_size=256,
    num_gqa_groups=2,
    qkv_multipliers=[0.5, 1.0],
    ffn_multipliers=[0.5, 2.0],
    ffn_dim_divisor=32,
)
# The other branches: multi-head attention, no q/k norm, untied head, plain FFN, other RoPE base.
PLAIN = dict(
    num_transformer_layers=2,
    model_dim=64,
    head_dim=16,
    vocab_size=100,
    num_gqa_groups=1,
    qkv_multipliers=1.0,
    ffn_multipliers=2.0,
    ffn_dim_divisor=32,
    normalize_qk_projections=False,
    share_input_output_layers=False,
    ffn_with_glu=False,
    rope_freq_constant=500000,
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> R.OpenELM:
    return C.random_model(TINY, seed=0)


def tokens(n: int, vocab: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_stepwise(model: R.OpenELM, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache, outs, start = R.KVCache(), [], 0
    for n in chunks:
        outs.append(model(ids[:, start : start + n], cache))
        start += n
    assert cache.offset == ids.shape[1]
    return torch.cat(outs, dim=1)


def test_layerwise_shapes(tiny):
    cfg = tiny.config
    assert cfg["num_query_heads"] == [4, 6, 6, 8]
    assert cfg["num_kv_heads"] == [2, 3, 3, 4]
    ffn = [layer.ffn.proj_2.in_features for layer in tiny.transformer.layers]
    assert ffn == [64, 128, 192, 256]
    args = ModelArgs.from_dict(TINY)
    assert args.num_query_heads == cfg["num_query_heads"]
    assert args.ffn_dims == ffn
    assert R.num_parameters(tiny) == args.num_parameters()


@pytest.mark.parametrize("config", [TINY, PLAIN], ids=["tiny", "plain"])
def test_cache_matches_full_forward(config):
    model = C.random_model(config, seed=1)
    ids = tokens(24, config["vocab_size"], batch=2)
    with torch.no_grad():
        full = model(ids)
    assert full.shape == (2, 24, config["vocab_size"])
    # Random weights are scaled to keep logits near unit size, so the tolerances mean something.
    assert 0.5 < full.std() < 2 and full.abs().max() < 8
    assert torch.allclose(decode_stepwise(model, ids, [1] * 24), full, atol=5e-5, rtol=0)
    # Chunked prefill: the second chunk needs the offset causal mask.
    assert torch.allclose(decode_stepwise(model, ids, [10, 14]), full, atol=5e-5, rtol=0)
    assert torch.allclose(decode_stepwise(model, ids, [7, 9, 1, 7]), full, atol=5e-5, rtol=0)


def test_offset_mask_is_causal(tiny):
    # Changing a later token of the second chunk must not change earlier logits of that chunk.
    a, b = tokens(16, 256, seed=3), tokens(16, 256, seed=3)
    b[0, 15] = (b[0, 15] + 1) % 256
    la, lb = decode_stepwise(tiny, a, [8, 8]), decode_stepwise(tiny, b, [8, 8])
    assert torch.equal(la[:, :15], lb[:, :15])
    assert not torch.allclose(la[:, 15], lb[:, 15])


def test_greedy_generate_matches_uncached_argmax(tiny):
    prompt = tokens(8, 256, seed=4)[0].tolist()
    new = R.greedy_generate(tiny, prompt, 10)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt) :]


def state_equal(a: R.OpenELM, b: R.OpenELM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "fmt,max_shard_bytes,files",
    [
        ("safetensors", None, ["model.safetensors"]),
        ("safetensors", 400_000, ["model.safetensors.index.json", "model-00001-of-"]),
        ("bin", None, ["pytorch_model.bin"]),
        ("bin", 400_000, ["pytorch_model.bin.index.json", "pytorch_model-00001-of-"]),
    ],
)
def test_save_hf_round_trip(tiny, tmp_path, fmt, max_shard_bytes, files):
    C.save_hf(tiny, tmp_path, fmt=fmt, max_shard_bytes=max_shard_bytes)
    names = sorted(p.name for p in tmp_path.iterdir())
    for f in files:
        assert any(n.startswith(f) for n in names), (f, names)
    if max_shard_bytes:
        index = json.loads((tmp_path / files[0]).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2 and shards <= set(names)
        assert index["weight_map"].keys() == tiny.state_dict().keys()
        assert index["metadata"]["total_size"] == 4 * R.num_parameters(tiny)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "openelm" and config["torch_dtype"] == "float32"
    assert config["num_query_heads"] == [4, 6, 6, 8] and len(config["ffn_multipliers"]) == 4
    state_equal(R.OpenELM.from_pretrained(tmp_path), tiny)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_hf_half_precision(tiny, tmp_path, dtype):
    C.save_hf(tiny, tmp_path, dtype=dtype)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied
        assert f.get_tensor("transformer.norm.weight").dtype == dtype
    loaded = R.OpenELM.from_pretrained(tmp_path, dtype=dtype)
    ref = C.random_model(TINY, seed=0).to(dtype)
    state_equal(loaded, ref)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    # The half-precision model runs, its cache still agrees, and it stays near fp32.
    ids = tokens(12, 256, seed=5)
    with torch.no_grad():
        half, full = loaded(ids), tiny(ids)
    assert half.dtype == dtype
    assert (half.float() - full).abs().max() < 0.25
    assert (decode_stepwise(loaded, ids, [6, 6]).float() - half.float()).abs().max() < 0.1


def test_untied_round_trip(tmp_path):
    model = C.random_model(PLAIN, seed=2)
    assert "lm_head.weight" in model.state_dict()
    C.save_hf(model, tmp_path)
    state_equal(R.OpenELM.from_pretrained(tmp_path), model)


def test_from_pretrained_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        R.OpenELM.from_pretrained(tmp_path)
    C.save_hf(tiny, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        R.OpenELM.from_pretrained(tmp_path)
    config = {**TINY, "num_transformer_layers": 5}
    C.save_hf(tiny, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        R.OpenELM.from_pretrained(tmp_path)


def test_270m_preset_on_meta():
    config = preset("270M").to_dict()
    with torch.device("meta"):
        model = R.OpenELM(
            {k: config[k] for k in ("num_transformer_layers", "model_dim", "head_dim")}
        )
    assert R.num_parameters(model) == 271_527_168
    cfg = model.config
    # OPENELM.md: query heads 12x5, 16x7, 20x4 (GQA 4); ffn_dim 768 -> 5120.
    assert cfg["num_query_heads"] == [12] * 5 + [16] * 7 + [20] * 4
    assert cfg["num_kv_heads"] == [3] * 5 + [4] * 7 + [5] * 4
    ffn = [layer.ffn.proj_2.in_features for layer in model.transformer.layers]
    assert ffn[:8] == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816]
    assert ffn[8:] == [3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120]
    assert cfg["ffn_multipliers"] == config["ffn_multipliers"]


@pytest.mark.parametrize("name,count", [("450M", 457.18e6), ("1_1B", 1079.89e6), ("3B", 3036.65e6)])
def test_other_presets_on_meta(name, count):
    args = preset(name)
    with torch.device("meta"):
        model = R.OpenELM(args.to_dict())
    assert model.config["num_query_heads"] == args.num_query_heads
    assert R.num_parameters(model) == args.num_parameters()
    assert abs(R.num_parameters(model) - count) < 0.01e6


def test_save_corenet(tmp_path):
    model = C.random_model(PLAIN, seed=2)
    C.save_corenet(model, tmp_path / "m.pt", tmp_path / "m.yaml", padded_vocab=128)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert not any(k.startswith("transformer.") for k in state)
    assert state["token_embeddings.weight"].shape == (128, 64)
    assert state["classifier.weight"].shape == (128, 64)
    assert torch.equal(
        state["token_embeddings.weight"][:100], model.transformer.token_embeddings.weight
    )
    assert state["token_embeddings.weight"][100:].abs().sum() > 0  # random padding rows
    assert torch.equal(
        state["layers.1.attn.qkv_proj.weight"], model.transformer.layers[1].attn.qkv_proj.weight
    )
    gpt = yaml.safe_load((tmp_path / "m.yaml").read_text())["model"]["language_modeling"]
    assert gpt["name"] == "general_gpt"
    gpt = gpt["general_gpt"]
    assert gpt["vocab_size"] == 128 and gpt["padding_index"] == 100
    assert "model_name" not in gpt and gpt["max_context_length"] == 2048
    # The explicit fields rebuild the same model once the padding rows are cut.
    rebuilt = R.OpenELM({**gpt, "vocab_size": gpt["padding_index"]})
    assert rebuilt.config["num_query_heads"] == model.config["num_query_heads"]
    assert R.num_parameters(rebuilt) == R.num_parameters(model)


def test_save_corenet_named(tmp_path, monkeypatch):
    with torch.device("meta"):
        model = R.OpenELM(dict(num_transformer_layers=16, model_dim=1280, head_dim=64))
    with pytest.raises(ValueError, match="OpenELM-270M"):
        C.save_corenet(model, tmp_path / "x.pt", tmp_path / "x.yaml", model_name="OpenELM-450M")
    tiny = C.random_model(TINY)
    with pytest.raises(ValueError, match="padded_vocab"):
        C.save_corenet(tiny, tmp_path / "x.pt", tmp_path / "x.yaml", padded_vocab=10)
    with pytest.raises(ValueError, match="model_name"):
        C.save_corenet(tiny, tmp_path / "x.pt", tmp_path / "x.yaml", model_name="OpenELM-270M")
    # A named model writes the short section of CoreNet's own YAMLs: the name fixes the shape.
    monkeypatch.setitem(C.CORENET_MODELS, "OpenELM-tiny", TINY)
    C.save_corenet(tiny, tmp_path / "t.pt", tmp_path / "t.yaml", model_name="OpenELM-tiny")
    gpt = yaml.safe_load((tmp_path / "t.yaml").read_text())["model"]["language_modeling"]
    assert gpt["general_gpt"] == {
        "model_name": "OpenELM-tiny",
        "vocab_size": 256,
        "max_context_length": 2048,
    }
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert state.keys() == {k.removeprefix("transformer.") for k in tiny.state_dict()}


def test_reference_does_not_import_mlx():
    path = str(REPO / "bench" / "reference.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('reference', {path!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not [k for k in sys.modules if k.startswith('mlx')], 'mlx imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- parity with the MLX model


def to_mlx(model: R.OpenELM) -> Model:
    mlx_model = Model(ModelArgs.from_dict(model.config))
    weights = [(k, mx.array(v.detach().float().numpy())) for k, v in model.state_dict().items()]
    mlx_model.load_weights(weights)  # strict: every key must match
    mx.eval(mlx_model.parameters())
    return mlx_model


@pytest.mark.parametrize("config", [TINY, PLAIN], ids=["tiny", "plain"])
def test_matches_mlx(config):
    model = C.random_model(config, seed=3)
    mlx_model = to_mlx(model)
    ids = tokens(20, config["vocab_size"], seed=6, batch=2)
    with torch.no_grad():
        ref = model(ids).numpy()
    full = np.array(mlx_model(mx.array(ids.numpy())))
    diff_full = np.abs(full - ref).max()
    # Through the caches: an 8-token prefill, a 5-token chunk, then one token at a time.
    cache = make_prompt_cache(mlx_model)
    steps, start = [], 0
    for n in [8, 5] + [1] * 7:
        steps.append(np.array(mlx_model(mx.array(ids[:, start : start + n].numpy()), cache=cache)))
        start += n
    diff_cache = np.abs(np.concatenate(steps, axis=1) - ref).max()
    print(f"max |logit diff| vs MLX: full {diff_full:.2e}, cached {diff_cache:.2e}")
    assert diff_full < 1e-4 and diff_cache < 1e-4


def test_hf_folder_loads_in_mlx(tiny, tmp_path):
    # A save_hf folder is also a valid MLX folder (same keys, same config.json).
    C.save_hf(tiny, tmp_path)
    mlx_model, _, args = mlx_openelm.load(tmp_path)
    assert args.num_query_heads == tiny.config["num_query_heads"]
    ids = tokens(10, 256, seed=7)
    with torch.no_grad():
        ref = tiny(ids).numpy()
    assert np.abs(np.array(mlx_model(mx.array(ids.numpy()))) - ref).max() < 1e-4
