"""`mlx-openelm export`: GGUF files for llama.cpp read back with gguf's own reader (every tensor,
the metadata its `openelm` loader needs), adapters fused in, refusals, and the Hugging Face folder.
No llama.cpp build is needed (docs/gguf.md has the by-hand checks)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import mlx.core as mx  # noqa: I001  (conftest imports mlx_openelm first, which picks the BLAS)
import mlx.nn as nn
import numpy as np
import pytest
from conftest import SPM_VOCAB, make_model_folder, tiny_model
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import mlx_openelm
from mlx_openelm.adapters import adapter_config, apply_lora
from mlx_openelm.cli import app
from mlx_openelm.errors import UserError
from mlx_openelm.export import export
from mlx_openelm.export import gguf as gguf_export
from mlx_openelm.loading import save_model
from mlx_openelm.tokenizer import CHAT_TEMPLATE

gguf = pytest.importorskip("gguf", reason="GGUF export needs pip install .[export]")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def folder(tmp_path_factory, spm_model) -> Path:
    """A tiny Instruct-style folder (with OpenELM's chat template): 2 layers, FFN 32 and 256."""
    return make_model_folder(tmp_path_factory.mktemp("export") / "m", spm_model, seed=3)


def weights_of(folder: Path) -> dict[str, np.ndarray]:
    model, _, _ = mlx_openelm.load(folder)
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def expected_tensors(w: dict[str, np.ndarray], args) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's names, written out by hand (proj_1 = [gate; up])."""
    out = {
        "token_embd.weight": w["transformer.token_embeddings.weight"],
        "output_norm.weight": w["transformer.norm.weight"],
    }
    for i, ff in enumerate(args.ffn_dims):
        p = f"transformer.layers.{i}."
        proj_1 = w[p + "ffn.proj_1.weight"]
        out |= {
            f"blk.{i}.attn_norm.weight": w[p + "attn_norm.weight"],
            f"blk.{i}.attn_qkv.weight": w[p + "attn.qkv_proj.weight"],
            f"blk.{i}.attn_q_norm.weight": w[p + "attn.q_norm.weight"],
            f"blk.{i}.attn_k_norm.weight": w[p + "attn.k_norm.weight"],
            f"blk.{i}.attn_output.weight": w[p + "attn.out_proj.weight"],
            f"blk.{i}.ffn_norm.weight": w[p + "ffn_norm.weight"],
            f"blk.{i}.ffn_gate.weight": proj_1[:ff],
            f"blk.{i}.ffn_up.weight": proj_1[ff:],
            f"blk.{i}.ffn_down.weight": w[p + "ffn.proj_2.weight"],
        }
    return out


def raw_tensors(path: Path) -> dict[str, tuple[Q, np.ndarray]]:
    return {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


# ---- the file


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_holds_every_tensor_of_the_mlx_model(folder, tmp_path, gguf_type):
    out = tmp_path / "m.gguf"
    export(folder, gguf_path=out, gguf_type=gguf_type)
    args = mlx_openelm.load(folder)[2]
    want = expected_tensors(weights_of(folder), args)
    got = gguf_export.read_tensors(out)
    raw = raw_tensors(out)
    assert list(got) == list(want)  # names and order, 2 + 9 per layer
    for name, w in want.items():
        qtype, data = got[name]
        assert data.shape == w.shape, name
        if w.ndim == 1 or name.endswith("_norm.weight"):
            assert qtype == Q.F32, name
            np.testing.assert_array_equal(data, w, err_msg=name)
            continue
        if gguf_type == "q4_0" and name == "token_embd.weight":
            want_type = Q.Q8_0  # the tied output layer keeps 8 bits
        else:
            want_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
                         "q4_0": Q.Q4_0}[gguf_type]  # fmt: skip
        assert qtype == want_type, name
        if want_type == Q.F32:
            np.testing.assert_array_equal(data, w, err_msg=name)
        elif want_type == Q.F16:
            np.testing.assert_array_equal(data, w.astype(np.float16).astype(np.float32))
        elif want_type == Q.BF16:
            bf16 = np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
            np.testing.assert_array_equal(data, bf16, err_msg=name)
        else:  # the bytes of gguf's numpy quantiser (llama.cpp's converter uses the same)
            np.testing.assert_array_equal(raw[name][1], gguf.quants.quantize(w, want_type))
            step = np.abs(w).max(axis=1, keepdims=True) / (127 if want_type == Q.Q8_0 else 7)
            assert (np.abs(data - w) <= step).all(), name


def test_gguf_metadata_is_what_llama_cpp_loads(folder, tmp_path, spm_model):
    import sentencepiece as spm

    out = tmp_path / "m.gguf"
    export(folder, gguf_path=out, gguf_type="f32")
    meta = dict(gguf_export.iter_metadata(out))
    args = mlx_openelm.load(folder)[2]
    assert meta["general.architecture"] == "openelm"
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {
        "openelm.block_count": 2,
        "openelm.context_length": args.max_context_length,
        "openelm.embedding_length": 64,
        "openelm.feed_forward_length": [32, 256],
        "openelm.attention.head_count": args.num_query_heads,
        "openelm.attention.head_count_kv": args.num_kv_heads,
        "openelm.rope.dimension_count": 16,
        "openelm.attention.key_length": 16,
        "openelm.attention.value_length": 16,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["openelm.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["openelm.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(SPM_VOCAB)]
    np.testing.assert_allclose(meta["tokenizer.ggml.scores"],
                               [sp.get_score(i) for i in range(SPM_VOCAB)])  # fmt: skip
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types[3:259] == [gguf.TokenType.BYTE] * 256  # byte fallback, <0x00>..<0xFF>
    assert set(types[259:]) == {gguf.TokenType.NORMAL}


def test_a_lora_export_differs_from_the_base_by_the_fused_delta(folder, tmp_path):
    model, _, _ = mlx_openelm.load(folder)
    config = adapter_config(2, rank=4, alpha=8)
    apply_lora(model, config)
    mx.random.seed(7)
    adapters = {k: mx.random.normal(v.shape) * 0.05 for k, v in
                tree_flatten(model.trainable_parameters())}  # fmt: skip
    adapter_path = tmp_path / "adapters"
    adapter_path.mkdir()
    mx.save_safetensors(str(adapter_path / "adapters.safetensors"), adapters)
    (adapter_path / "adapter_config.json").write_text(json.dumps(config))

    export(folder, gguf_path=tmp_path / "base.gguf", gguf_type="f32")
    export(folder, gguf_path=tmp_path / "lora.gguf", gguf_type="f32", adapter_path=adapter_path)
    base = gguf_export.read_tensors(tmp_path / "base.gguf")
    adapted = gguf_export.read_tensors(tmp_path / "lora.gguf")

    scale = config["lora_parameters"]["scale"]
    a = {k: np.array(v, dtype=np.float64) for k, v in adapters.items()}
    emb = "transformer.token_embeddings"
    deltas = {"token_embd.weight": scale * a[f"{emb}.lora_a"] @ a[f"{emb}.lora_b"]}
    ffn_dims = mlx_openelm.load(folder)[2].ffn_dims

    def linear(key):  # mlx-lm's LoRALinear: W + scale * (A @ B).T
        return scale * (a[key + ".lora_a"] @ a[key + ".lora_b"]).T

    for i, ff in enumerate(ffn_dims):
        p = f"transformer.layers.{i}."
        proj_1 = linear(p + "ffn.proj_1")
        deltas |= {
            f"blk.{i}.attn_qkv.weight": linear(p + "attn.qkv_proj"),
            f"blk.{i}.attn_output.weight": linear(p + "attn.out_proj"),
            f"blk.{i}.ffn_gate.weight": proj_1[:ff],
            f"blk.{i}.ffn_up.weight": proj_1[ff:],
            f"blk.{i}.ffn_down.weight": linear(p + "ffn.proj_2"),
        }
    assert len(deltas) == 1 + 5 * len(ffn_dims)
    for name, (_, w) in base.items():
        diff = adapted[name][1].astype(np.float64) - w
        want = deltas.get(name, np.zeros_like(diff))
        np.testing.assert_allclose(diff, want, atol=1e-6, rtol=0, err_msg=name)
        assert (name in deltas) == bool(np.abs(diff).max() > 1e-4), name


def test_a_quantised_folder_is_dequantised_first_and_says_so(tmp_path, spm_model, caplog):
    model = tiny_model(seed=5)
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path / "q4"
    folder.mkdir()
    save_model(folder, model, model.args, quantization={"group_size": 32, "bits": 4})
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    with caplog.at_level(logging.INFO, logger="mlx_openelm"):
        export(folder, gguf_path=tmp_path / "m.gguf", gguf_type="f32")
    assert "4-bit MLX weights: they are dequantised first" in caplog.text
    qkv = model.layers[1].attn.qkv_proj
    want = mx.dequantize(qkv.weight, qkv.scales, qkv.biases, group_size=32, bits=4)
    got = gguf_export.read_tensors(tmp_path / "m.gguf")["blk.1.attn_qkv.weight"]
    assert got[0] == Q.F32
    np.testing.assert_array_equal(got[1], np.array(want))


def test_gguf_and_hf_from_one_command(folder, tmp_path):
    gguf_path, hf = tmp_path / "out" / "m.gguf", tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--gguf", str(gguf_path),
                                      "--hf", str(hf), "--hf-dtype", "float16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {gguf_path}" in result.output and f"wrote {hf}" in result.output
    assert gguf_export.read_tensors(gguf_path)["blk.0.attn_qkv.weight"][0] == Q.F16  # default
    config = json.loads((hf / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and (hf / "tokenizer.model").is_file()
    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


# ---- refusals


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"share_input_output_layers": False}, "share_input_output_layers"),
        ({"normalize_qk_projections": False}, "normalize_qk_projections"),
    ],
)
def test_refuses_what_llama_cpp_openelm_cannot_represent(tmp_path, spm_model, overrides, field):
    folder = make_model_folder(tmp_path / "m", spm_model, **overrides)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--gguf", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to write"),
        (["--gguf", "{tmp}/m.gguf", "--gguf-type", "q5_k"], "--gguf-type 'q5_k'"),
        (["--gguf", "{tmp}/exists.gguf"], "already exists"),
        (["--hf", "{tmp}/hf", "--hf-dtype", "int8"], "--hf-dtype 'int8'"),
    ],
)
def test_bad_options_are_one_line_errors(folder, tmp_path, args, message):
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["export", "--model", str(folder), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"


def test_write_gguf_refuses_packed_quantised_weights(tmp_path):
    model = tiny_model(seed=5)
    nn.quantize(model, group_size=32, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match=r"token_embeddings.weight is uint32 "
                       r"\(512, 8\) but the config needs float \(512, 64\)"):  # fmt: skip
        gguf_export.write_gguf(weights, model.args, out)
    assert not out.exists()


def test_a_folder_without_tokenizer_is_refused(tmp_path):
    folder = make_model_folder(tmp_path / "m", None)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        export(folder, gguf_path=tmp_path / "m.gguf")


def test_without_gguf_installed_the_error_names_the_extra(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--gguf",
                                      str(tmp_path / "m.gguf")])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: GGUF export needs the gguf package: pip install 'mlx-openelm[export]'"
    )


def test_a_failed_write_leaves_the_old_file_and_no_temporary(folder, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def fail(data, qtype):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "_encode", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(folder, gguf_path=out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_placeholder_vocabulary_round_trips_ids():
    ids = [3, 4, 1000, 31999, 17]
    text = gguf_export.ids_to_placeholder_text(ids)
    assert len(text) == len(ids)
    assert gguf_export.placeholder_text_to_ids(text) == ids
    assert gguf_export.placeholder_text_to_ids("\n") == [-1]
