"""The lm-evaluation-harness backend `mlx-openelm`: lm-eval's `LM` interface over our MLX models.

Importing this module registers the backend with lm-eval (which must be installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own backends first: its registry fills itself only when empty)
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from rich.console import Console
from rich.progress import track

from ..errors import UserError
from ..tokenizer import Tokenizer, require_tokenizer
from .scoring import ScoreStats, score, score_rolling

NAME = "mlx-openelm"


@register_model(NAME)
class MLXOpenELM(TemplateLM):
    """An MLX OpenELM model for lm-eval (`--model mlx-openelm --model_args model=DIR`).

    Args:
        model: the MLX model folder or Hub repo id (`pretrained` is accepted too, as in lm-eval's
          HF backend).
        adapter_path: a LoRA/DoRA adapter folder to apply.
        batch_size: sequences per forward pass when scoring.
        max_length: the scoring window (default: the model's context window).
        max_gen_toks: tokens to generate when a task does not say.
        loaded: an already loaded (model, tokenizer) pair instead of a folder.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        adapter_path: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        loaded: tuple[Any, Tokenizer] | None = None,
        device: str | None = None,  # lm-eval passes these two to every backend; MLX picks
        max_batch_size: int | None = None,  # its device, and batch_size is never "auto" here
    ) -> None:
        super().__init__()
        path = model or pretrained
        if loaded is None:
            if path is None:
                raise UserError("Name the model folder: --model_args model=PATH")
            from ..loading import load

            loaded_model, tokenizer, _ = load(path, adapter_path=adapter_path, run_on_cpu=True)
            loaded = (loaded_model, require_tokenizer(tokenizer, path))
        self.model, self.tokenizer = loaded
        self.path, self.adapter_path = path, adapter_path
        # lm-eval passes a number or "auto[:N]" as text; "auto" means our default.
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = 16 if auto else int(batch_size)
        self._max_length = int(max_length or self.model.args.max_context_length)
        self.max_gen_toks = int(max_gen_toks)
        self.stats = ScoreStats()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # an empty context reads BOS, as OpenELM was trained

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(Path(self.tokenizer.path).resolve()).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        results = score(
            self.model,
            [(ctx, cont) for _, ctx, cont in requests],
            batch_size=self.batch_size,
            max_length=self.max_length,
            stats=self.stats,
            progress=not disable_tqdm,
        )
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        texts = [req.args[0] for req in requests]
        totals = score_rolling(
            self.model,
            [self.tok_encode(t, add_special_tokens=False) for t in texts],
            prefix=self.prefix_token_id,
            context=self.max_length,
            batch_size=self.batch_size,
            stats=self.stats,
            progress=not disable_tqdm,
        )
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        # One request at a time through `generate` (greedy unless the task asks to sample).
        from mlx_lm.sample_utils import make_sampler

        from ..generation import generate

        out = []
        for req in track(
            requests, "Generating", disable=disable_tqdm, console=Console(stderr=True)
        ):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if max_gen >= self.max_length:
                raise UserError(
                    f"max_gen_toks {max_gen} leaves no room in {self.max_length} tokens"
                )
            temp = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :]
            text = generate(
                self.model,
                self.tokenizer,
                ids,
                max_tokens=max_gen,
                stop=until,
                sampler=make_sampler(temp=temp) if temp > 0 else None,
            )
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
