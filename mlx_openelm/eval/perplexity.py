"""`mlx-openelm perplexity`: token-level perplexity of text files with a sliding window.

Each document is scored on its own from BOS, as lm-eval's `loglikelihood_rolling` does; with the
default stride (= the window) the numbers are exactly those of the lm-eval backend.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .report import describe_model, write_report
from .scoring import ScoreStats, score_rolling

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def read_documents(data: str | Path) -> list[tuple[str, str]]:
    """(name, text) of each document: a file is one document, a `.jsonl` file one per line (its
    "text" field), a folder every .txt, .md and .jsonl file under it (sorted)."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist: give a text file or a folder of them")
    files = (
        sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if data.is_dir()
        else [data]
    )
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{f} is not UTF-8 text") from None
        if f.suffix != ".jsonl":
            docs.append((str(f), text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError
                docs.append((f"{f}:{n}", text))
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
                raise UserError(f'{f}:{n}: expected a JSON object with a "text" field') from None
    docs = [(name, text) for name, text in docs if text.strip()]  # whitespace scores no token
    if not docs:
        raise UserError(f"No text found in {data} (looked for {', '.join(TEXT_SUFFIXES)} files)")
    return docs


def _check_options(context: int | None, stride: int | None, batch_size: int) -> None:
    """What can fail before the model is loaded (the stride again once the window is known)."""
    if context is not None and context < 1:
        raise UserError(f"--context must be at least 1, got {context}")
    if stride is not None and not 1 <= stride <= (context or stride):
        raise UserError(f"--stride must be between 1 and the context, got {stride}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def _load(
    model: str, adapter_path: str | Path | None, loaded: tuple[Any, Any] | None
) -> tuple[Any, Any]:
    """(model, tokenizer): the caller's own pair, or loaded for the CPU as well as a GPU."""
    if loaded is not None:
        return loaded
    from ..loading import load
    from ..tokenizer import require_tokenizer

    m, tokenizer, _ = load(model, adapter_path=adapter_path, run_on_cpu=True)
    return m, require_tokenizer(tokenizer, model)


@dataclass
class _Scored:
    """Each document's text, tokens and log-likelihood, and the window that scored them."""

    docs: list[tuple[str, str]]
    ids: list[list[int]]
    totals: list[float]
    context: int
    stride: int

    def figures(self) -> dict[str, Any]:
        """Perplexity per token, bits per byte (comparable across tokenizers), per document."""
        tokens = sum(len(t) for t in self.ids)
        nbytes = sum(len(text.encode("utf-8")) for _, text in self.docs)
        nll = -sum(self.totals)
        return {
            "documents": len(self.docs),
            "tokens": tokens,
            "bytes": nbytes,
            "loglikelihood": sum(self.totals),
            "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / nbytes,
            "context": self.context,
            "stride": self.stride,
            "per_document": [
                {
                    "name": name,
                    "tokens": len(t),
                    "loglikelihood": ll,
                    "perplexity": math.exp(-ll / len(t)),
                }
                for (name, _), t, ll in zip(self.docs, self.ids, self.totals, strict=True)
            ],
        }


def _print_result(report: dict[str, Any]) -> None:
    """The figure on stdout; the speed on stderr, so that the figure can be piped alone."""
    print(
        f"perplexity {report['perplexity']:.4f} ({report['bits_per_byte']:.4f} bits/byte) "
        f"over {report['tokens']} tokens in {report['documents']} document(s); "
        f"window {report['context']}, stride {report['stride']}"
    )
    print(f"{report['speed']['tokens_per_s']:.0f} tokens/s", file=sys.stderr)


def perplexity(
    model: str,
    data: str | Path,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    adapter_path: str | Path | None = None,
    output: str | Path | None = None,
    verbose: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Perplexity of text under a model, with a sliding window.

    Args:
        model: the MLX model folder or Hub repo id.
        data: a text file, a .jsonl file ("text" per line) or a folder of them.
        context: tokens per window (default: the model's context window).
        stride: new tokens scored per window after the first (default: `context`, which gives
          lm-eval's `loglikelihood_rolling`; smaller gives each token more context, slower).
        batch_size: windows per forward pass.
        adapter_path: a LoRA/DoRA adapter folder to apply.
        output: write the report here as JSON.
        verbose: print the result.
        loaded: an already loaded (model, tokenizer) pair instead of `model`.

    Returns:
        The report: perplexity (exp of the mean negative log-likelihood per token), bits per
        byte, counts, per-document figures, the model (folder, adapter, dtype, bits), speed.
    """
    _check_options(context, stride, batch_size)
    docs = read_documents(data)
    m, tokenizer = _load(model, adapter_path, loaded)
    context = context or m.args.max_context_length
    if stride is not None and stride > context:
        raise UserError(f"--stride {stride} is larger than the context {context}")
    ids = [tokenizer.encode(text, add_bos=False) for _, text in docs]
    stats = ScoreStats()
    totals = score_rolling(
        m, ids, prefix=tokenizer.bos_id, context=context, stride=stride,
        batch_size=batch_size, stats=stats, progress=verbose,
    )  # fmt: skip
    if sum(len(t) for t in ids) == 0:
        raise UserError(f"{data} has no text to score (only whitespace)")
    report = {
        "data": str(data),
        **_Scored(docs, ids, totals, context, stride or context).figures(),
        **describe_model(
            m, None if loaded else str(model), None if adapter_path is None else str(adapter_path)
        ),
        "speed": stats.as_dict(),
    }
    write_report(report, output)
    if verbose:
        _print_result(report)
    return report
