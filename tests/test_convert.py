"""The converter: each source format gives exactly the source weights, the folder loads in mlx-lm
with our logits, quantised folders stay close to fp32, torch is not needed, and every bad input
fails with exit code 1, one line on stderr and no output folder.

Source checkpoints are written here with torch from random weights whose names and shapes follow
the Hugging Face layout in OPENELM.md (not our model's code).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import mlx_openelm  # isort: skip  (first: it loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_openelm.convert.corenet import read_yaml
from mlx_openelm.convert.torch_zip import read_torch_zip
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.config import ModelArgs, preset
from mlx_openelm.tokenizer import Tokenizer

torch = pytest.importorskip("torch", reason="tests write their source checkpoints with torch")
from safetensors.torch import save_file  # noqa: E402

TINY = dict(
    num_transformer_layers=3, model_dim=128, head_dim=16, vocab_size=300, ffn_dim_divisor=32
)
PADDED = 384  # CoreNet pads the vocab (32000 -> 32128); here 300 -> 384, padding_index 300
PROMPT = [[1, 17, 250, 3, 99, 42, 7, 180, 299, 64, 5, 2]]
# Quantised logits vs fp32: max abs diff as a fraction of the fp32 logits' max abs value (~90).
# Measured with group 64 on these random Gaussian weights (quantisation's worst case): 4-bit 0.17,
# 8-bit 0.008; groups 32/128 give 0.10/0.14 and 0.008/0.007. A broken scale or bias gives > 1.
Q_BOUND = {4: 0.3, 8: 0.03}


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The Hugging Face checkpoint's tensors, from the key list in OPENELM.md."""
    d, hd = args.model_dim, args.head_dim
    shapes = {"transformer.token_embeddings.weight": (args.vocab_size, d)}
    per_layer = zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims, strict=True)
    for i, (nq, nkv, f) in enumerate(per_layer):
        p = f"transformer.layers.{i}."
        shapes[p + "attn.qkv_proj.weight"] = ((nq + 2 * nkv) * hd, d)
        shapes[p + "attn.q_norm.weight"] = (hd,)
        shapes[p + "attn.k_norm.weight"] = (hd,)
        shapes[p + "attn.out_proj.weight"] = (d, nq * hd)
        shapes[p + "ffn.proj_1.weight"] = (2 * f, d)
        shapes[p + "ffn.proj_2.weight"] = (d, f)
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    shapes["transformer.norm.weight"] = (d,)
    return shapes


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs(**TINY)


@pytest.fixture(scope="module")
def state(args) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in hf_shapes(args).items():
        if len(shape) == 1:  # norm weights near 1
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            std = 1.0 if "token_embeddings" in name else shape[1] ** -0.5
            out[name] = std * torch.randn(shape, generator=gen)
    return out


def train_spm(path: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    text = (Path(__file__).parent / "data" / "persuasion.txt").read_text()[:40000]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for s in text.splitlines() if s.strip()]),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=300)


def write_config(folder: Path, args: ModelArgs, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {**args.to_dict(), "torch_dtype": "float32", **extra}
    (folder / "config.json").write_text(json.dumps(config))


def write_hf(folder: Path, state, args: ModelArgs) -> Path:
    write_config(folder, args)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_sharded_bf16(folder: Path, state, args: ModelArgs, n_shards: int = 3) -> Path:
    write_config(folder, args, torch_dtype="bfloat16")
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        shard_name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {k: state[k].bfloat16() for k in names[i::n_shards]}
        save_file(shard, str(folder / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_bin(folder: Path, state, args: ModelArgs) -> tuple[Path, dict]:
    """pytorch_model.bin whose tensors exercise storage offsets, strides, sharing and fp16."""
    write_config(folder, args)
    saved = dict(state)
    # Two tensors viewing one storage at different offsets.
    a, b = "transformer.layers.0.ffn.proj_1.weight", "transformer.layers.0.ffn.proj_2.weight"
    flat = torch.cat([state[a].flatten(), state[b].flatten()])
    saved[a] = flat[: state[a].numel()].view(state[a].shape)
    saved[b] = flat[state[a].numel() :].view(state[b].shape)
    # A transposed (non-contiguous) view.
    c = "transformer.layers.1.attn.out_proj.weight"
    saved[c] = state[c].t().contiguous().t()
    assert not saved[c].is_contiguous()
    # An fp16 tensor (fp16 -> fp32 is exact).
    e = "transformer.layers.2.ffn.proj_1.weight"
    saved[e] = state[e].half()
    torch.save(saved, folder / "pytorch_model.bin")
    return folder, saved


def write_corenet(folder: Path, state, args: ModelArgs, training=False) -> tuple[Path, Path]:
    """A flat CoreNet state dict (no `transformer.` prefix, padded vocab) and its YAML.

    `training` writes a training checkpoint instead: the weights under `model_state_dict`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    emb = sd["token_embeddings.weight"]
    pad = torch.randn(PADDED - args.vocab_size, args.model_dim, generator=gen)
    sd["token_embeddings.weight"] = torch.cat([emb, pad])
    if training:
        optim = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}}}
        sd = {"model_state_dict": sd, "optim_state_dict": optim, "iterations": 10}
    torch.save(sd, folder / "model.pt")
    # A named size whose shape fields are overridden (our extension of CoreNet's YAML).
    yaml_text = textwrap.dedent(f"""\
        taskname: '+ [OpenELM-tiny]'
        _anchor_vocab_size: &_anchor_vocab_size {PADDED}
        _anchor_padding_index: &_anchor_padding_index {args.vocab_size}
        model:
          language_modeling:
            name: "general_gpt"
            general_gpt:
              model_name: "OpenELM-270M"
              num_transformer_layers: {args.num_transformer_layers}
              model_dim: {args.model_dim}
              head_dim: {args.head_dim}
              ffn_dim_divisor: {args.ffn_dim_divisor}
              vocab_size: *_anchor_vocab_size
              max_context_length: 512
              padding_index: *_anchor_padding_index
        """)
    (folder / "config.yaml").write_text(yaml_text)
    return folder / "model.pt", folder / "config.yaml"


def run_convert(source, out, *extra) -> object:
    return CliRunner().invoke(app, ["convert", str(source), str(out), *map(str, extra)])


def convert_ok(source, out, *extra) -> object:
    result = run_convert(source, out, *extra)
    assert result.exit_code == 0, result.output
    return result


def loaded_weights(folder: Path) -> dict[str, mx.array]:
    model, _, _ = mlx_openelm.load(folder)
    return dict(tree_flatten(model.parameters()))


def assert_exact(weights: dict[str, mx.array], source: dict[str, torch.Tensor]) -> None:
    assert set(weights) == set(source)
    for k, t in source.items():
        w = weights[k]
        if t.dtype == torch.bfloat16:  # bit-exact: compare the raw bits
            assert w.dtype == mx.bfloat16, k
            got = np.array(w.view(mx.uint16))
            want = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            got, want = np.array(w), t.float().numpy()
        assert got.shape == want.shape, k
        assert np.array_equal(got, want), k


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory, state, args, tokenizer_model) -> Path:
    tmp = tmp_path_factory.mktemp("fp32")
    src = write_hf(tmp / "hf", state, args)
    (src / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    result = convert_ok(src, tmp / "mlx", "--dtype", "float32")
    assert "parameters" in result.stderr and "wrote" in result.stderr  # progress on stderr
    assert result.stdout == ""
    return tmp / "mlx"


# ---- every source format gives exactly the source weights


def test_hf_safetensors_fp32(fp32_folder, state, args, tokenizer_model):
    assert_exact(loaded_weights(fp32_folder), state)
    assert ModelArgs.from_file(fp32_folder / "config.json") == args
    # The source folder's tokenizer comes along, with the HF files mlx-lm needs to load it.
    assert (fp32_folder / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    assert (fp32_folder / "tokenizer_config.json").exists()
    _, mlx_lm_tokenizer = mlx_lm.load(str(fp32_folder))
    text = "Anne Elliot walked on."
    assert mlx_lm_tokenizer.encode(text) == Tokenizer(tokenizer_model).encode(text)


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path, state, args, tokenizer_model):
    src = write_hf(tmp_path / "hf", state, args)
    big = tmp_path / "big.model"
    train_spm(big, vocab_size=args.vocab_size + 50)
    result = run_convert(src, tmp_path / "mlx", "--tokenizer", big)
    assert result.exit_code == 1 and "wrong tokenizer" in result.output
    assert not (tmp_path / "mlx").exists()


def test_hf_config_with_ranges_fp16(tmp_path, state, args):
    # A hand-written config.json: 2-element ranges instead of the expanded per-layer lists.
    src = write_hf(tmp_path / "hf", state, args)
    config = {"model_type": "openelm", **TINY, "qkv_multipliers": [0.5, 1.0]}
    (src / "config.json").write_text(json.dumps({**config, "ffn_multipliers": [0.5, 4.0]}))
    convert_ok(src, tmp_path / "mlx", "--dtype", "float16")
    assert ModelArgs.from_file(tmp_path / "mlx" / "config.json") == args
    weights = loaded_weights(tmp_path / "mlx")
    assert {w.dtype for w in weights.values()} == {mx.float16}
    assert_exact(weights, {k: v.half() for k, v in state.items()})


def test_default_dtype_is_float32_on_a_cpu(tmp_path, state, args):
    convert_ok(write_hf(tmp_path / "hf", state, args), tmp_path / "mlx")
    expected = mx.bfloat16 if mx.metal.is_available() or mx.cuda.is_available() else mx.float32
    assert {w.dtype for w in loaded_weights(tmp_path / "mlx").values()} == {expected}


def test_hf_sharded_bf16(tmp_path, state, args):
    src = write_sharded_bf16(tmp_path / "hf", state, args)
    convert_ok(src, tmp_path / "mlx", "--dtype", "bfloat16")
    assert_exact(loaded_weights(tmp_path / "mlx"), {k: v.bfloat16() for k, v in state.items()})


def test_a_model_past_the_shard_size_is_written_in_shards(tmp_path, state, args, monkeypatch):
    from mlx_lm.utils import load_model
    from mlx_openelm.convert import writer

    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 400_000)  # 5 GiB for real models, as mlx-lm
    convert_ok(write_hf(tmp_path / "hf", state, args), tmp_path / "mlx", "--dtype", "float32")
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "mlx").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(f.stat().st_size < 400_000 + 200_000 for f in shards)  # no tensor is > 200 kB
    assert_exact(loaded_weights(tmp_path / "mlx"), state)
    theirs = dict(tree_flatten(load_model(tmp_path / "mlx")[0].parameters()))
    assert_exact(theirs, state)


def test_pytorch_model_bin(tmp_path, state, args):
    src, saved = write_bin(tmp_path / "hf", state, args)
    convert_ok(src, tmp_path / "mlx", "--dtype", "float32")
    assert_exact(loaded_weights(tmp_path / "mlx"), saved)


@pytest.mark.parametrize("training", [False, True], ids=["weights", "training_checkpoint"])
def test_corenet_pt_and_yaml(tmp_path, state, args, tokenizer_model, training):
    pt, yaml_path = write_corenet(tmp_path / "corenet", state, args, training)
    result = convert_ok(
        pt, tmp_path / "mlx", "--config-yaml", yaml_path, "--tokenizer", tokenizer_model,
        "--dtype", "float32",
    )  # fmt: skip
    assert "dropped vocab rows 300..383" in result.stderr
    got = ModelArgs.from_file(tmp_path / "mlx" / "config.json")
    assert got.vocab_size == 300 and got.max_context_length == 512
    assert got.num_query_heads == args.num_query_heads and got.ffn_dims == args.ffn_dims
    assert_exact(loaded_weights(tmp_path / "mlx"), state)  # padding rows dropped
    assert (tmp_path / "mlx" / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()


CORENET_270M_YAML = """\
_anchor_context_length: &_anchor_context_length 2048
_anchor_vocab_size: &_anchor_vocab_size 32128
_anchor_padding_index: &_anchor_padding_index 32000
model:
  activation_checkpointing: false
  language_modeling:
    name: "general_gpt"
    general_gpt:
      model_name: "OpenELM-270M"
      vocab_size: *_anchor_vocab_size
      max_context_length: *_anchor_context_length
      padding_index: *_anchor_padding_index
"""


def test_corenet_yaml_released_and_explicit(tmp_path):
    # CoreNet's own 270M pretraining YAML (model section as released).
    (tmp_path / "a.yaml").write_text(CORENET_270M_YAML)
    args, rows = read_yaml(tmp_path / "a.yaml")
    assert rows == 32128 and args == preset("270M")
    assert args.num_parameters() == 271_527_168
    # No model name: the fields alone (defaults are the released models' values).
    fields = "\n".join(f"      {k}: {v}" for k, v in TINY.items() if k != "vocab_size")
    text = CORENET_270M_YAML.replace('      model_name: "OpenELM-270M"', fields)
    (tmp_path / "b.yaml").write_text(text)
    args, rows = read_yaml(tmp_path / "b.yaml")
    assert args == ModelArgs(**{**TINY, "vocab_size": 32000, "max_context_length": 2048})
    # A CoreNet name that is not an OpenELM size, and another model family.
    (tmp_path / "c.yaml").write_text(CORENET_270M_YAML.replace("OpenELM-270M", "gpt-test"))
    with pytest.raises(ValueError, match="not an OpenELM size"):
        read_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(CORENET_270M_YAML.replace('name: "general_gpt"', "name: x"))
    with pytest.raises(ValueError, match="not general_gpt"):
        read_yaml(tmp_path / "d.yaml")


@pytest.mark.parametrize("fn", [os.system, eval, subprocess.call])
def test_unpickler_refuses_code(tmp_path, fn):
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w')" if fn is eval else f"touch {marker}"
    write_pickle_zip(tmp_path / "x.pt", {"w": Evil(fn, payload)})
    with pytest.raises(ValueError, match=f"refused to load `{fn.__module__}.{fn.__name__}`"):
        read_torch_zip(tmp_path / "x.pt")
    assert not marker.exists()


# ---- mlx-lm compatibility and quantisation


def test_mlx_lm_loads_with_same_logits(fp32_folder):
    from mlx_lm.utils import load_model

    ours, _, _ = mlx_openelm.load(fp32_folder)
    theirs, _ = load_model(Path(fp32_folder))
    a, b = logits(ours), logits(theirs)
    assert np.abs(a).max() > 1  # not trivially zero
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized(tmp_path, fp32_folder, state, args, bits):
    from mlx_lm.utils import load_model, quantize_model

    src = write_hf(tmp_path / "hf", state, args)
    out = tmp_path / "mlx"
    convert_ok(src, out, "--dtype", "float32", "--quantize", "--q-bits", bits, "--q-group-size", 64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    model, _, _ = mlx_openelm.load(out)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) >= 3 * args.num_transformer_layers
    assert isinstance(model.transformer.token_embeddings, nn.QuantizedEmbedding)

    ref = logits(mlx_openelm.load(fp32_folder)[0])
    got = logits(model)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"{bits}-bit: max abs logit diff {np.abs(got - ref).max():.4f}, relative {rel:.4f}")
    assert rel < Q_BOUND[bits]
    if bits == 8:
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    # mlx-lm reads the same quantised folder to the same logits.
    np.testing.assert_allclose(logits(load_model(out)[0]), got, atol=1e-4, rtol=1e-4)
    # Written tensor by tensor, the folder holds what quantising the whole model gives.
    whole, _ = quantize_model(mlx_openelm.load(fp32_folder)[0], {}, 64, bits)
    want, have = dict(tree_flatten(whole.parameters())), dict(tree_flatten(model.parameters()))
    assert set(want) == set(have)
    assert all(mx.array_equal(want[k], have[k]).item() for k in want)


# ---- torch is not needed

NO_TORCH = """\
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
try:
    import torch
    raise SystemExit("torch is still importable")
except ImportError:
    pass
from mlx_openelm.cli import app
codes = [app(argv, standalone_mode=False) for argv in {argvs!r}]
loaded = [m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod is not None]
assert not loaded, loaded
print("codes", codes)
"""


def test_convert_without_torch(tmp_path, state, args):
    bin_src, saved = write_bin(tmp_path / "hf", state, args)
    pt, yaml_path = write_corenet(tmp_path / "corenet", state, args)
    argvs = [
        ["convert", str(bin_src), str(tmp_path / "a"), "--dtype", "float32"],
        ["convert", str(pt), str(tmp_path / "b"), "--config-yaml", str(yaml_path), "--dtype",
         "float32"],
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(argvs=argvs)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "codes [None, None]" in proc.stdout or "codes [0, 0]" in proc.stdout, proc.stdout
    assert_exact(loaded_weights(tmp_path / "a"), saved)
    assert_exact(loaded_weights(tmp_path / "b"), state)


# ---- bad inputs: exit code 1, one line, nothing written


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def write_pickle_zip(path: Path, obj) -> None:
    """A zip laid out like torch.save's, holding an arbitrary pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")


def bad_missing_shard(tmp, state, args):
    src = write_sharded_bf16(tmp / "hf", state, args)
    (src / "model-00002-of-00003.safetensors").unlink()
    return [src], "model-00002-of-00003.safetensors"


def bad_truncated(tmp, state, args):
    src = write_hf(tmp / "hf", state, args)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [src], "truncated"


def bad_header(tmp, state, args):
    src = write_hf(tmp / "hf", state, args)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return [src], "bad safetensors header"


def bad_shape(tmp, state, args):
    name = "transformer.layers.1.attn.qkv_proj.weight"
    src = write_hf(tmp / "hf", {**state, name: state[name][:-16]}, args)
    return [src], f"{name} is (176, 128), expected (192, 128)"


def bad_unknown_tensor(tmp, state, args):
    src = write_hf(tmp / "hf", {**state, "transformer.extra.weight": torch.zeros(3)}, args)
    return [src], "1 unknown (transformer.extra.weight)"


def bad_missing_tensor(tmp, state, args):
    src = write_hf(tmp / "hf", {k: v for k, v in state.items() if "norm.weight" != k[-11:]}, args)
    return [src], "missing"


def bad_model_type(tmp, state, args):
    src = write_hf(tmp / "hf", state, args)
    config = {**json.loads((src / "config.json").read_text()), "model_type": "llama"}
    (src / "config.json").write_text(json.dumps(config))
    return [src], "not an OpenELM config"


def bad_os_system(tmp, state, args):
    write_config(tmp / "hf", args)
    marker = tmp / "pwned"
    write_pickle_zip(tmp / "hf" / "pytorch_model.bin", {"x": Evil(os.system, f"touch {marker}")})
    return [tmp / "hf"], "refused to load `posix.system`"


def bad_truncated_bin(tmp, state, args):
    src, _ = write_bin(tmp / "hf", state, args)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) - 1000])
    return [src], "truncated or corrupt zip"


def bad_legacy_bin(tmp, state, args):
    write_config(tmp / "hf", args)
    torch.save(state, tmp / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return [tmp / "hf"], "legacy"


def bad_out_exists(tmp, state, args):
    src = write_hf(tmp / "hf", state, args)
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return [src], "already exists"


def bad_dtype(tmp, state, args):
    return [write_hf(tmp / "hf", state, args), "--dtype", "float8"], "Unknown dtype"


def bad_q_bits(tmp, state, args):
    return [write_hf(tmp / "hf", state, args), "-q", "--q-bits", "7"], "q_bits"


def bad_pt_without_yaml(tmp, state, args):
    pt, _ = write_corenet(tmp / "corenet", state, args)
    return [pt], "--config-yaml"


def bad_corenet_wrong_vocab(tmp, state, args):
    pt, yaml_path = write_corenet(tmp / "corenet", state, args)
    yaml_path.write_text(yaml_path.read_text().replace(f"vocab_size {PADDED}", "vocab_size 512"))
    return [pt, "--config-yaml", yaml_path], "384 rows but"


def bad_hub_offline(tmp, state, args):
    return ["apple/OpenELM-0M-not-cached"], "apple/OpenELM-0M-not-cached"


BAD = [f for name, f in sorted(globals().items()) if name.startswith("bad_")]


@pytest.mark.parametrize("make", BAD, ids=lambda f: f.__name__[4:])
def test_bad_input(tmp_path, state, args, make, monkeypatch):
    import huggingface_hub.constants

    # Never touch the network: an uncached repo id must fail fast.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (source, *extra), expected = make(tmp_path, state, args)
    out = tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    result = run_convert(source, out, *extra)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    print(lines[0])
    # Nothing written: no output folder (or the user's untouched) and no temporary folder left.
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    assert not list(tmp_path.glob(".out.*"))
    assert not (tmp_path / "pwned").exists()


def test_overwrite_replaces_an_existing_folder_only_when_asked(tmp_path, state, args):
    src = write_hf(tmp_path / "hf", state, args)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    assert run_convert(src, tmp_path / "out").exit_code == 1
    assert (tmp_path / "out" / "old.txt").exists()
    convert_ok(src, tmp_path / "out", "--overwrite")
    assert not (tmp_path / "out" / "old.txt").exists()
    assert_exact(loaded_weights(tmp_path / "out"), state)
