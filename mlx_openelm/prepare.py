"""What `generate` and `chat` do before the first token: check the options, load the model (and
adapters), pick the chat template, build the sampler, seed."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .chat_template import ChatTemplate, template_for_chat
from .errors import UserError, check_seed, check_utf8
from .tokenizer import Tokenizer, require_tokenizer

log = logging.getLogger(__name__)

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# The OpenELM model cards generate with repetition_penalty=1.2.
DEFAULT_REPETITION_PENALTY = 1.2


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are drawn, one spelling for `generate`, `chat`, the server and Python callers:
    mlx-lm's sampler and repetition penalty. temp 0 is greedy; top_p 1, top_k 0, min_p 0 and
    repetition_penalty 1 switch those off."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def check(self) -> None:
        checks = [
            (
                math.isfinite(self.temp) and self.temp >= 0,
                f"temp must be >= 0 (0 is greedy), got {self.temp}",
            ),  # fmt: skip
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def build(self, vocab_size: int | None = None) -> tuple[Sampler, list[LogitsProcessor]]:
        """mlx-lm's sampler and logits processors, after `check`."""
        self.check()
        top_k = self.top_k
        if vocab_size is not None and top_k >= vocab_size:
            top_k = 0  # keeping every token is no filter (and mlx-lm's top-k rejects it)
        sampler = make_sampler(temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=top_k)
        penalty = None if self.repetition_penalty == 1 else self.repetition_penalty
        return sampler, make_logits_processors(repetition_penalty=penalty)


def cpu_speed_notes(model: nn.Module, name: str = "the model") -> list[str]:
    """Hints when MLX runs on the CPU without what makes it fast there.

    On the CPU, float32 goes through the BLAS and the native kernels (`kernels`), and quantised
    weights through the kernels when float32 is all around them; 16-bit activations take MLX's own
    scalar code, ~7x slower (docs/convert.md, "dtype and quantisation"). Without a BLAS
    library to load (`_blas.py`), MLX on Linux uses its bundled reference BLAS, ~30x slower.
    """
    from mlx.utils import tree_flatten

    from . import _blas, kernels
    from .loading import HALF, product_scales

    if mx.default_device() != mx.cpu:
        return []
    notes = []
    if sys.platform.startswith("linux") and _blas.loaded is None:
        notes.append(
            "MLX is running on its bundled reference BLAS, ~30x slower: `pip install mkl` "
            "(x86-64) or `apt-get install libopenblas0-openmp`, unless MLX_OPENELM_BLAS=none "
            "was meant"
        )
    params = tree_flatten(model.parameters())
    quantised = any(key.endswith(".scales") for key, _ in params)
    scales = product_scales(model)  # the kernels take them in 16 bits (`float32_on_cpu`)
    half = any(p.dtype in HALF for key, p in params if key not in scales)
    fast_quantised = quantised and not half and kernels.available()
    kind = "16-bit" if half else "quantised" if quantised and not fast_quantised else None
    if kind:
        why = "" if half or sys.platform == "darwin" else f" (CPU kernels {kernels.status()})"
        notes.append(
            f"{name} has {kind} weights, which MLX's CPU back end runs ~7x slower than float32"
            f"{why}: convert the original checkpoint with `--dtype float32` (the CPU default)"
            + (" and -q" if quantised else "")
            + " for speed"
        )
    return notes


def load_for_generation(path: str, adapter_path: str | None = None) -> tuple[nn.Module, Tokenizer]:
    """`load` a folder (and adapters) and insist on a tokenizer whose ids fit the vocabulary."""
    from .loading import load

    model, tokenizer, args = load(path, adapter_path=adapter_path, run_on_cpu=True)
    tokenizer = require_tokenizer(tokenizer, path)
    for note in cpu_speed_notes(model, path):
        log.warning("note: %s", note)
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only "
            f"{args.vocab_size} embeddings: is it the right tokenizer?"
        )
    return model, tokenizer


@dataclass
class Prepared:
    model: nn.Module
    tokenizer: Tokenizer
    sampler: Sampler
    processors: list[LogitsProcessor]
    max_tokens: int
    template: ChatTemplate | None = None  # with `chat`
    template_origin: str = ""


def prepare(
    model: str,
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions = SamplingOptions(),
    seed: int | None = None,
    adapter_path: str | None = None,
    system: str | None = None,
    chat: bool = False,
    chat_template: str | None = None,
) -> Prepared:
    """Check the options (before loading anything), load, and build the sampler; with `chat`, the
    chat template too (`chat_template`, else the adapters' or the folder's: `template_for_chat`).
    """
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    sampling.check()  # fail fast, before loading
    check_seed(seed)
    check_utf8(system or "", "--system")
    m, tokenizer = load_for_generation(model, adapter_path)
    template, origin = None, ""
    if chat:
        source, origin = template_for_chat(
            model, tokenizer.path.parent, chat_template, adapter_path
        )
        template = ChatTemplate(source, tokenizer)
    sampler, processors = sampling.build(tokenizer.vocab_size)
    if seed is not None:
        mx.random.seed(seed)
    return Prepared(m, tokenizer, sampler, processors, max_tokens, template, origin)
