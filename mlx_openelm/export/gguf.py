"""Write an OpenELM as a GGUF file that llama.cpp's `openelm` architecture loads.

It writes what llama.cpp's own converter (`convert_hf_to_gguf.py`, class `OpenELMModel`) writes:
the same metadata keys, tensor names and tensor types, `proj_1` split into `ffn_gate` (its first
half, the one through SiLU) and `ffn_up`, and the SentencePiece vocabulary with scores and token
types. The writer is the `gguf` package (llama.cpp's gguf-py), an optional extra.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
from ..errors import MissingDependency, UserError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Ids past the control pieces map to one character each in the placeholder vocabulary (below).
PLACEHOLDER_BASE = 0x10000


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependency(
            "GGUF export needs the gguf package: pip install 'mlx-openelm[export]'"
        ) from None
    return gguf


def check_representable(args: ModelArgs) -> None:
    """Refuse a model that llama.cpp's `openelm` graph would load and then compute wrongly."""
    if not args.share_input_output_layers:
        raise UserError(
            "share_input_output_layers is false (an untied lm_head): llama.cpp's openelm "
            "architecture always uses token_embeddings as the output layer"
        )
    if not args.normalize_qk_projections:
        raise UserError(
            "normalize_qk_projections is false: llama.cpp's openelm architecture needs q/k norms"
        )
    if not args.ffn_with_glu:
        raise UserError("ffn_with_glu is false: llama.cpp's openelm architecture needs a GLU FFN")


# ---- tensors -------------------------------------------------------------------------------------


def check_shapes(weights: dict[str, mx.array], args: ModelArgs) -> None:
    """Refuse weights that llama.cpp would not load against this config: misshapen or not float
    (an MLX quantised layer's packed uint32 weight is (N, K * bits / 32))."""
    from ..convert.validate import expected_shapes

    expected = expected_shapes(args)
    for key, w in weights.items():
        dtype = str(w.dtype).split(".")[-1]
        if key in expected and (
            tuple(w.shape) != expected[key] or not mx.issubdtype(w.dtype, mx.floating)
        ):
            raise UserError(
                f"{key} is {dtype} {tuple(w.shape)} but the config needs float {expected[key]}: "
                "quantised weights must be dequantised first "
                "(mlx_lm.utils.dequantize_model)"
            )


TensorPlan = list[tuple[str, str, slice | None]]


def tensor_plan(args: ModelArgs) -> TensorPlan:
    """(GGUF name, our parameter name, rows of it) for every tensor, in the file's order."""
    gguf = require_gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    plan = [
        (names[T.TOKEN_EMBD] + ".weight", "transformer.token_embeddings.weight", None),
        (names[T.OUTPUT_NORM] + ".weight", "transformer.norm.weight", None),
    ]
    for i, ff in enumerate(args.ffn_dims):
        ours = f"transformer.layers.{i}."
        for tensor, key, rows in (
            (T.ATTN_NORM, "attn_norm", None),
            (T.ATTN_QKV, "attn.qkv_proj", None),
            (T.ATTN_Q_NORM, "attn.q_norm", None),
            (T.ATTN_K_NORM, "attn.k_norm", None),
            (T.ATTN_OUT, "attn.out_proj", None),
            (T.FFN_NORM, "ffn_norm", None),
            (T.FFN_GATE, "ffn.proj_1", slice(0, ff)),  # SiLU(first half) * second half
            (T.FFN_UP, "ffn.proj_1", slice(ff, 2 * ff)),
            (T.FFN_DOWN, "ffn.proj_2", None),
        ):
            plan.append((names[tensor].format(bid=i) + ".weight", ours + key + ".weight", rows))
    return plan


def tensor_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """The GGML type of one tensor, chosen as llama.cpp's tools choose it."""
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32  # llama.cpp reads norms and 1-D tensors in F32 only
    if gguf_type == "q4_0" and gguf_name.startswith("token_embd"):
        # The tied embedding is also the output layer: `llama-quantize ... Q4_0` gives it more
        # bits (Q6_K); here Q8_0, as `llama-quantize --token-embedding-type q8_0 ... Q4_0` does.
        qtype = Q.Q8_0
    else:
        qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[
            gguf_type
        ]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16  # rows that don't fill whole blocks: the converter's fallback
    return qtype


def _to_numpy(w: mx.array) -> np.ndarray:
    return np.array(w.astype(mx.float32))


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# ---- vocabulary ----------------------------------------------------------------------------------


def sentencepiece_vocab(
    tokenizer_file: str | Path, vocab_size: int
) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """Tokens, scores and token types as llama.cpp's converter reads them, padded to `vocab_size`
    rows; and the special ids."""
    import sentencepiece as spm

    gguf = require_gguf()
    TT = gguf.TokenType
    sp = spm.SentencePieceProcessor()
    sp.Load(str(tokenizer_file))
    if sp.vocab_size() > vocab_size:
        raise UserError(
            f"{tokenizer_file} has {sp.vocab_size()} pieces but the model only {vocab_size} "
            "embedding rows: is it the model's own tokenizer?"
        )
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(TT.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TT.CONTROL)
        elif sp.IsUnused(i):
            types.append(TT.UNUSED)
        elif sp.IsByte(i):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
    for i in range(1, vocab_size - sp.vocab_size() + 1):  # e.g. CoreNet's padding rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TT.UNUSED)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return tokens, scores, types, {k: v for k, v in special.items() if v >= 0}


def placeholder_vocab(vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict]:
    """A vocabulary for weights without a tokenizer (the benchmark's random models): `<unk>`,
    `<s>`, `</s>`, then id i is the one character chr(0x10000 + i). With no pieces longer than a
    character, llama.cpp tokenizes such text one id per character, so any id sequence can be
    written as a prompt and read back from the output."""
    gguf = require_gguf()
    TT = gguf.TokenType
    tokens = [b"<unk>", b"<s>", b"</s>"] + [
        chr(PLACEHOLDER_BASE + i).encode() for i in range(3, vocab_size)
    ]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.NORMAL] * (vocab_size - 3)
    return tokens, [0.0] * vocab_size, types, {"unk": 0, "bos": 1, "eos": 2}


def ids_to_placeholder_text(ids: list[int]) -> str:
    return "".join(chr(PLACEHOLDER_BASE + i) for i in ids)


def placeholder_text_to_ids(text: str) -> list[int]:
    """Inverse of `ids_to_placeholder_text`; characters outside the vocabulary become -1."""
    return [ord(c) - PLACEHOLDER_BASE if ord(c) >= PLACEHOLDER_BASE + 3 else -1 for c in text]


# ---- the file ------------------------------------------------------------------------------------


def write_gguf(
    weights: dict[str, mx.array],
    args: ModelArgs,
    out: str | Path,
    *,
    gguf_type: str = "f16",
    tokenizer_file: str | Path | None = None,
    chat_template: str | None = None,
    name: str | None = None,
    add_bos: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write float OpenELM weights as one GGUF file (atomically: a temporary file, then renamed).

    Args:
        weights: our parameter names -> float arrays (a dequantised, fused model's parameters).
        args: the model's config.
        out: the `.gguf` file to write.
        gguf_type: f32, f16, bf16, q8_0 or q4_0 (norms stay F32, as in llama.cpp's files).
        tokenizer_file: the SentencePiece `tokenizer.model` whose vocabulary goes in; None
            writes a placeholder vocabulary (see `placeholder_vocab`) for tokenizer-less weights.
        chat_template: recorded as `tokenizer.chat_template` (None for a base model).
        name: `general.name` (default: the output file's stem).
        add_bos: llama.cpp prepends BOS to a prompt (off for prompts that are raw ids).
        overwrite: replace an existing `out`.

    Returns:
        The path written.
    """
    gguf = require_gguf()
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    check_representable(args)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: delete it or choose another output path")
    plan = tensor_plan(args)
    missing = sorted({key for _, key, _ in plan} - set(weights))
    if missing:
        raise UserError(f"the weights lack {missing[0]} ({len(missing)} tensors missing)")
    check_shapes(weights, args)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.OPENELM])
    _add_metadata(writer, args, gguf_type, name or out.stem)
    if tokenizer_file is not None:
        vocab = sentencepiece_vocab(tokenizer_file, args.vocab_size)
    else:
        vocab = placeholder_vocab(args.vocab_size)
    _add_vocab(writer, *vocab, placeholder=tokenizer_file is None, chat_template=chat_template,
               add_bos=add_bos)  # fmt: skip

    tensors = _add_tensor_infos(writer, weights, plan, gguf_type)
    _write_file(writer, out, weights, tensors)
    return out


def _add_tensor_infos(
    writer: Any, weights: dict[str, mx.array], plan: TensorPlan, gguf_type: str
) -> list[tuple[str, slice | None, Any]]:
    """Declare every tensor's name, shape and type, which the header holds before any data.

    Returns:
        (our parameter name, rows of it, GGML type) of each tensor, in the order of its data.
    """
    gguf = require_gguf()
    tensors = []
    for gguf_name, key, rows in plan:
        shape = tuple(weights[key].shape)
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        qtype = tensor_type(gguf_name, shape, gguf_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        tensors.append((key, rows, qtype))
    return tensors


def _write_file(
    writer: Any,
    out: Path,
    weights: dict[str, mx.array],
    tensors: list[tuple[str, slice | None, Any]],
) -> None:
    """Write a temporary file beside `out` and rename it, so a failure leaves the old file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, rows, qtype in tensors:  # one tensor in memory at a time
            w = weights[key] if rows is None else weights[key][rows]
            writer.write_tensor_data(_encode(_to_numpy(w), qtype))
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output shouldn't be
        os.replace(tmp, out)
    finally:
        writer.close()
        Path(tmp).unlink(missing_ok=True)


def _add_metadata(writer: Any, args: ModelArgs, gguf_type: str, name: str) -> None:
    gguf = require_gguf()
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(args.num_transformer_layers)
    writer.add_context_length(args.max_context_length)
    writer.add_embedding_length(args.model_dim)
    writer.add_feed_forward_length(args.ffn_dims)  # per layer
    writer.add_head_count(args.num_query_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_rope_freq_base(float(args.rope_freq_constant))
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, tokens, scores, types, special, *, placeholder, chat_template,
               add_bos) -> None:  # fmt: skip
    writer.add_tokenizer_model("llama")  # SentencePiece, as Llama-2's
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id)):  # fmt: skip
        if kind in special:
            add(special[kind])
    writer.add_add_bos_token(add_bos)  # OpenELM was trained with BOS first
    writer.add_add_eos_token(False)
    if placeholder:
        writer.add_add_space_prefix(False)  # one character, one id: no "▁" in front
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def read_tensors(path: str | Path) -> dict[str, tuple[Any, np.ndarray]]:
    """A GGUF file's tensors: name -> (GGML type, float32 array in our (rows, columns) order)."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, np.asarray(data, dtype=np.float32).reshape(
            tuple(int(n) for n in reversed(t.shape))
        ))  # fmt: skip
    return out


def iter_metadata(path: str | Path) -> Iterator[tuple[str, Any]]:
    """A GGUF file's metadata as (key, value) pairs."""
    gguf = require_gguf()
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if not key.startswith("GGUF."):
            yield key, field.contents()
