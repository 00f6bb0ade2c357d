"""Pretraining an OpenELM from scratch: a config, packed text, the shared loop, an MLX model folder.

The output folder is an MLX model folder (`config.json`, `model.safetensors`, `tokenizer.model`)
that `load` reads at any checkpoint, plus the loop's `checkpoints/`, `metrics.jsonl`, the loss
curve and `pretrain.json` (the run's figures, with unigram and bigram baselines).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..config import PRESETS, ModelArgs
from ..config import preset as preset_args
from ..errors import UserError, check_seed
from ..export.hf import export_hf
from ..files import read_json
from ..model import Model
from ..tokenizer import TOKENIZER_FILE, Tokenizer, write_tokenizer_files
from .checkpoint import CHECKPOINTS, average_checkpoints, check_run_folder, latest_checkpoint
from .distributed import check_on_rank0, guard, weights_from_rank0
from .text_data import encode_documents, pack, read_documents, split_documents
from .tokenizer_training import train_tokenizer
from .trainer import METRICS, TrainingArgs, evaluate, train

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
SUMMARY = "pretrain.json"
# The paper's recipe (AdamW 0.9/0.95, weight decay 0.1, cosine to 10% of the peak, clip 1.0),
# with CoreNet's z-loss.
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    learning_rate=1e-3,  # the paper: 5.3e-3 at 4M-token batches; small batches want less
    weight_decay=0.1,  # matrices only, as CoreNet's no_decay_bn_filter_bias
    z_loss=1e-4,  # CoreNet's OpenELM configs set use_z_loss; 1e-4 is its z_loss_eps default
    adam_betas=(0.9, 0.95),
    min_lr_ratio=0.1,
    grad_clip=1.0,
    batch_size=16,
    iters=1000,
    steps_per_eval=200,
    val_batches=-1,
    steps_per_save=200,
)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["model_dim=256", "ffn_multipliers=[0.5,4]"]` -> a dict; values are JSON, else strings."""
    known = {f.name for f in fields(ModelArgs)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set model_dim=256")
        if key not in known:
            raise UserError(
                f"--set {key}: not an OpenELM config field; choose from {', '.join(sorted(known))}"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
) -> ModelArgs:
    """A `ModelArgs` from a `config.json` or a preset, with overrides; `vocab_size` fills a gap.

    A config file's per-layer head lists are dropped when overrides change the shape, so the
    layer-wise scaling is derived again.
    """
    if (config is None) == (preset is None):
        raise UserError("give exactly one of --config CONFIG.json or --preset NAME")
    overrides = dict(overrides or {})
    if config is not None:
        ModelArgs.from_file(config)  # a clear error for a missing or broken file
        params = read_json(Path(config))
        if overrides and not {"num_query_heads", "num_kv_heads"} & set(overrides):
            params.pop("num_query_heads", None)
            params.pop("num_kv_heads", None)
    else:
        preset_args(preset)  # validates the name
        key = preset.split("/")[-1].removeprefix("OpenELM-").removesuffix("-Instruct")
        params = dict(PRESETS[key])
    params.update(overrides)
    if "vocab_size" not in params and vocab_size is not None:
        params["vocab_size"] = vocab_size
    try:
        return ModelArgs.from_dict(params)
    except TypeError as e:
        raise UserError(f"bad OpenELM config: {e}") from None


def init_weights(model: Model, args: ModelArgs, seed: int = 0) -> None:
    """CoreNet's OpenELM init: N(0, fan_in^-1/2) linears, output projections scaled by (2L)^-1/2."""
    check_seed(seed)
    mx.random.seed(seed)
    out_scale = (2 * args.num_transformer_layers) ** -0.5
    new = {}
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            new[name] = mx.ones_like(w)
        elif name.endswith("token_embeddings.weight"):
            new[name] = mx.random.normal(w.shape) * args.model_dim**-0.5
        else:
            std = w.shape[1] ** -0.5
            if name.endswith(("out_proj.weight", "proj_2.weight")):
                std *= out_scale
            new[name] = mx.random.normal(w.shape) * std
    model.load_weights(list(new.items()))
    mx.eval(model.parameters())


def ngram_baselines(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> dict:
    """Perplexity of add-one unigram and interpolated bigram models on `val_tokens[1:]`.

    The bigram's interpolation weight is the best of a grid on the validation tokens themselves,
    which flatters the baseline, not the model.
    """
    train_tokens, val_tokens = train_tokens.astype(np.int64), val_tokens.astype(np.int64)
    uni = np.bincount(train_tokens, minlength=vocab_size) + 1.0
    uni /= uni.sum()
    prev, nxt = val_tokens[:-1], val_tokens[1:]
    unigram_nll = -np.log(uni[nxt]).mean()
    pair = train_tokens[:-1] * vocab_size + train_tokens[1:]
    keys, counts = np.unique(pair, return_counts=True)
    ctx = np.bincount(train_tokens[:-1], minlength=vocab_size).astype(np.float64)
    idx = np.searchsorted(keys, prev * vocab_size + nxt)
    idx = np.minimum(idx, len(keys) - 1)
    c_pair = np.where(keys[idx] == prev * vocab_size + nxt, counts[idx], 0)
    p_ml = np.divide(c_pair, ctx[prev], out=np.zeros(len(nxt)), where=ctx[prev] > 0)
    best = min(
        -np.log(lam * p_ml + (1 - lam) * uni[nxt]).mean() for lam in np.linspace(0.05, 0.95, 19)
    )
    return {"unigram_ppl": float(math.exp(unigram_nll)), "bigram_ppl": float(math.exp(best))}


def check_out_folder(
    out: Path, resume: bool, overwrite: bool, tokenizer: str | Path | None = None
) -> None:
    """`out` is new, empty, a run to `resume`, or (`overwrite`) one whose contents may go."""
    if overwrite:
        if resume:
            raise UserError("--resume or --overwrite: continue the run in OUT, or replace it")
        if (
            tokenizer is not None
            and out.exists()
            and out.resolve() in Path(tokenizer).resolve().parents
        ):
            raise UserError(f"--overwrite would delete --tokenizer {tokenizer}: copy it elsewhere")
        return
    # An interrupted first session leaves its tokenizer (and metrics) but no checkpoint yet.
    leftovers = {TOKENIZER_FILE, METRICS, CHECKPOINTS}
    if not resume and out.is_dir() and {p.name for p in out.iterdir()} - leftovers:
        if latest_checkpoint(out) is None:
            raise FileExistsError(
                f"{out} is not empty and not a pretraining run (a model folder?): choose "
                "another --out, or pass --overwrite to replace what it holds"
            )
    check_run_folder(out, resume)


def _tokenizer_for(
    out: Path, tokenizer: str | Path | None, data, resume, vocab, doc_separator
) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    path = out / TOKENIZER_FILE
    if resume and path.is_file():
        return path
    if mx.distributed.init().size() > 1:
        raise UserError(
            "a multi-process run needs a tokenizer made beforehand: run `mlx-openelm "
            "train-tokenizer` once and pass --tokenizer"
        )
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(data, path, vocab_size=vocab, doc_separator=doc_separator, overwrite=True)
    return path


def _training_args(training: dict[str, Any], seq_length: int, average_last: int) -> TrainingArgs:
    """The pretraining recipe's `TrainingArgs`, with the caller's changes."""
    opts = {**PRETRAIN_DEFAULTS, **training}
    opts.setdefault("warmup_steps", min(1000, opts["iters"] // 10))
    opts["max_seq_length"] = seq_length
    if average_last > 1:
        opts["keep_checkpoints"] = max(opts.get("keep_checkpoints", 2), average_last)
    try:
        return TrainingArgs(**opts)
    except TypeError as e:
        raise UserError(f"unknown training option: {e}") from None


@dataclass
class _Text:
    """Where the documents come from and how they become packed sequences."""

    data: str | Path
    seq_length: int
    val_fraction: float
    doc_separator: str | None
    min_doc: tuple[int, int]  # (characters, tokens): shorter documents are dropped


@dataclass
class _Corpus:
    """The packed sequences, and the raw tokens that the counts and n-gram baselines need."""

    train_tokens: np.ndarray
    train_set: list
    val_tokens: np.ndarray
    val_set: list
    dropped: int  # documents under the minimum length


def _sequences(
    docs: list[str],
    tok: Tokenizer,
    seq_length: int,
    min_doc: tuple[int, int],
    data: str | Path | None = None,
) -> tuple[np.ndarray, list, dict[str, int]]:
    """(tokens, packed sequences, stats) of the documents; `data` names the training set (None:
    the validation documents) in the error when they fill no sequence."""
    tokens, stats = encode_documents(docs, tok, *min_doc)
    sequences = pack(tokens, seq_length)
    if not sequences and data is not None:
        raise UserError(
            f"{data} gives {len(tokens)} training tokens after filtering ({stats['dropped']} "
            f"documents dropped), fewer than one sequence of {seq_length + 1}: add text or lower "
            "--seq-length / the minimum document length"
        )
    if docs and not sequences:
        raise UserError(
            f"the validation documents give {len(tokens)} tokens, fewer than one sequence of "
            f"{seq_length + 1}: raise --val-fraction or lower --seq-length"
        )
    return tokens, sequences, stats


def _corpus(
    text: _Text, tok: Tokenizer, docs: tuple[list[str], list[str]], validate: bool
) -> _Corpus:
    """Tokenise and pack the (train, validation) documents; without validation none are packed."""
    train_docs, val_docs = docs
    if not validate:
        val_docs = []
    train_tokens, train_set, stats = _sequences(
        train_docs, tok, text.seq_length, text.min_doc, text.data
    )
    val_tokens, val_set, _ = _sequences(val_docs, tok, text.seq_length, text.min_doc)
    return _Corpus(train_tokens, train_set, val_tokens, val_set, stats["dropped"])


def _check_folders(
    out: Path,
    export_hf_path: str | Path | None,
    resume: bool,
    overwrite: bool,
    tokenizer: str | Path | None,
) -> None:
    """Both output folders, before any text is read: a mistake here costs nothing yet."""
    export = None if export_hf_path is None else Path(export_hf_path)
    if export is not None and export.exists() and any(export.iterdir()):
        raise FileExistsError(f"{export} already exists: delete it or choose another path")
    check_out_folder(out, resume, overwrite, tokenizer)


@dataclass
class _ModelSpec:
    """The model's shape and tokenizer as the caller named them, resolved once the text is read."""

    config: str | Path | None
    preset: str | None
    overrides: dict[str, Any] | None
    tokenizer: str | Path | None
    tokenizer_vocab_size: int  # when a tokenizer is trained on the text

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The config; `vocab_size` fills it where neither the file nor the overrides give one."""
        return build_config(self.config, self.preset, self.overrides, vocab_size=vocab_size)

    def for_tokenizer(self, tok: Tokenizer) -> ModelArgs:
        """The config that the tokenizer's ids fit: an embedding too small is the user's error."""
        model_args = self.model_args(tok.vocab_size)
        if model_args.vocab_size < tok.vocab_size:
            raise UserError(
                f"vocab_size {model_args.vocab_size} is smaller than the tokenizer's "
                f"{tok.vocab_size}: raise it or drop it from the config"
            )
        return model_args


@dataclass
class _Run:
    """What a run is made of once its inputs are checked: the shape, the data, the model."""

    out: Path
    args: TrainingArgs
    model_args: ModelArgs
    corpus: _Corpus
    model: Model
    tok_path: Path


def _log_start(run: _Run) -> None:
    """One line with the model's size and the data's, to judge the run by before it starts."""
    model_args, corpus, args = run.model_args, run.corpus, run.args
    per_step = args.batch_size * args.grad_accumulation_steps
    log.info(
        f"OpenELM {model_args.num_parameters() / 1e6:.2f}M parameters "
        f"({model_args.num_transformer_layers} layers, dim {model_args.model_dim}, "
        f"vocab {model_args.vocab_size}); {len(corpus.train_tokens):,} training tokens in "
        f"{len(corpus.train_set)} sequences of {args.max_seq_length}, "
        f"{len(corpus.val_set)} validation sequences; {args.iters} steps of {per_step} sequences "
        f"(~{args.iters * per_step / len(corpus.train_set):.1f} epochs)"
        + (f"; {corpus.dropped} short documents dropped" if corpus.dropped else "")
    )


def _prepare(
    out: Path, text: _Text, spec: _ModelSpec, args: TrainingArgs, resume: bool, overwrite: bool
) -> _Run:
    """Read the text, make or read the tokenizer, pack the sequences and build the model.

    Everything a user can get wrong is checked before the model is built or a file written.
    """
    rank0 = mx.distributed.init().rank() == 0
    docs = read_documents(text.data, text.doc_separator)
    split = split_documents(docs, text.val_fraction, args.seed)
    spec.model_args(spec.tokenizer_vocab_size)  # fail early
    if overwrite and rank0 and out.exists():
        shutil.rmtree(out)
    tok_path = _tokenizer_for(
        out, spec.tokenizer, text.data, resume, spec.tokenizer_vocab_size, text.doc_separator
    )
    tok = Tokenizer(tok_path)
    model_args = spec.for_tokenizer(tok)
    corpus = _corpus(text, tok, split, validate=args.steps_per_eval != 0)
    model = Model(model_args)
    init_weights(model, model_args, args.seed)
    run = _Run(out, args, model_args, corpus, model, tok_path)
    if rank0:
        _log_start(run)
    return run


def _write_model_files(run: _Run, folder: Path, step: int) -> None:
    """At each save the top of `out` becomes an MLX model folder: config, tokenizer, weights."""
    config = json.dumps(run.model_args.to_dict(), indent=2, sort_keys=True)
    (folder / "config.json").write_text(config + "\n")
    if not (folder / "tokenizer_config.json").is_file():
        write_tokenizer_files(folder, run.tok_path, run.model_args.max_context_length)


def _training_summary(run: _Run, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The run's figures so far, adding this session's to those of the sessions before it."""
    out = run.out
    previous = read_json(out / SUMMARY) if (out / SUMMARY).is_file() else {}
    trained_now = not math.isnan(result["train_loss"])  # NaN: the run had already finished
    return {
        "parameters": run.model_args.num_parameters(),
        "train_tokens_available": int(len(run.corpus.train_tokens)),
        "trained_tokens": result["trained_tokens"],
        "steps": result["step"],
        # Wall time of the sessions that trained (an interrupted session is not counted).
        "seconds": round(previous.get("seconds", 0.0) + (seconds if trained_now else 0.0), 1),
        "train_loss": result["train_loss"] if trained_now else previous.get("train_loss"),
        "training": asdict(run.args),
        "seq_length": run.args.max_seq_length,
    }


def _validation_summary(run: _Run) -> dict[str, Any]:
    """Validation loss and perplexity, beside the n-gram baselines that give them a scale."""
    corpus = run.corpus
    with guard(mx.distributed.init()):  # its losses are summed over the ranks
        val_loss = evaluate(run.model, corpus.val_set, run.args.batch_size)
    targets = corpus.val_tokens[: len(corpus.val_set) * run.args.max_seq_length + 1]
    return dict(
        val_tokens=int(len(targets) - 1),
        val_loss=val_loss,
        val_ppl=math.exp(val_loss),
        **ngram_baselines(corpus.train_tokens, targets, run.model_args.vocab_size),
    )


def _load_average(model: Model, out: Path, k: int) -> None:
    """Load the average of the last `k` checkpoints into `model` and save it as the weights.

    Only rank 0 holds the checkpoints: it averages them and hands the result over.
    """
    averaged: dict[str, mx.array] = {}
    check_on_rank0(lambda: averaged.update(average_checkpoints(out, k, WEIGHTS)))
    weights = weights_from_rank0(averaged or None, model, mx.distributed.init())
    model.load_weights(list(weights.items()))
    if mx.distributed.init().rank() == 0:
        mx.save_safetensors(str(out / WEIGHTS), weights)


def _save_summary(
    run: _Run, summary: dict[str, Any], export_hf_path: str | Path | None, hf_dtype: str | None
) -> None:
    """Rank 0 writes the figures and the export: the other machines may not see `out`."""
    (run.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if export_hf_path is not None:
        export_hf(
            run.model,
            run.model_args,
            export_hf_path,
            dtype=hf_dtype,
            tokenizer_file=run.out / TOKENIZER_FILE,
        )


def pretrain(
    data: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_vocab_size: int = 4096,
    seq_length: int = 256,
    val_fraction: float = 0.02,
    doc_separator: str | None = None,
    min_doc_chars: int = 0,
    min_doc_tokens: int = 0,
    average_last: int = 0,
    export_hf_path: str | Path | None = None,
    hf_dtype: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **training: Any,
) -> dict[str, Any]:
    """Train an OpenELM from scratch on plain text or jsonl and save an MLX model folder.

    Args:
        data: a `.txt`/`.jsonl` file or a folder of them (see `text_data`).
        out: the output folder; with `resume`, the run to continue.
        config: a `config.json` giving the shape (layer-wise scaling parameters).
        preset: or a released size by name (270M, 450M, 1_1B, 3B).
        overrides: config fields to change, e.g. `{"num_transformer_layers": 6}`.
        tokenizer: a SentencePiece `tokenizer.model`; default: train one on `data`.
        tokenizer_vocab_size: its size when training one.
        seq_length: tokens per packed training sequence.
        val_fraction: share of documents held out for validation (0: none).
        doc_separator: splits `.txt` files into documents (default: one per file).
        min_doc_chars, min_doc_tokens: drop shorter documents (the paper: 200 and 256).
        average_last: average the last K checkpoints into the final weights (0 or 1: off).
        export_hf_path: also write a Hugging Face OpenELM folder here.
        hf_dtype: float32, float16 or bfloat16 for that export.
        resume: continue from the last checkpoint in `out`.
        overwrite: delete what `out` holds (a model, a finished run) and start afresh.
        progress: show the live bar.
        training: `TrainingArgs` fields (iters, batch_size, learning_rate, warmup_steps, ...);
          the defaults follow the paper's recipe, warm-up is 10% of `iters` (at most 1000).

    Returns:
        The run's figures (also in `out/pretrain.json`): losses, perplexities, tokens, time.
    """
    out = Path(out)
    # The other machines need not see `out`.
    check_on_rank0(lambda: _check_folders(out, export_hf_path, resume, overwrite, tokenizer))
    args = _training_args(training, seq_length, average_last)
    text = _Text(data, seq_length, val_fraction, doc_separator, (min_doc_chars, min_doc_tokens))
    spec = _ModelSpec(config, preset, overrides, tokenizer, tokenizer_vocab_size)
    run = _prepare(out, text, spec, args, resume, overwrite)
    tic = time.perf_counter()
    result = train(run.model, run.corpus.train_set, run.corpus.val_set, out, args,
                   weights_file=WEIGHTS, resume=resume, on_save=partial(_write_model_files, run),
                   progress=progress)  # fmt: skip
    summary = _training_summary(run, result, time.perf_counter() - tic)
    if average_last > 1:
        _load_average(run.model, out, average_last)
        summary["averaged_checkpoints"] = average_last
    if run.corpus.val_set:
        summary.update(_validation_summary(run))
    if mx.distributed.init().rank() == 0:
        _save_summary(run, summary, export_hf_path, hf_dtype)
    return summary
