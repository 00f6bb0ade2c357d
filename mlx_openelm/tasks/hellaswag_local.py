"""HellaSwag's validation set from `data/hellaswag_val.jsonl.xz`, prepared as lm-eval's `hellaswag`.

Each line is `{"ctx": "<activity label>: <ctx_a> <ctx_b>", "endings": [4], "label": 0-3}`.
lm-eval builds its prompt as `preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())`; the
file keeps ctx_a and ctx_b joined, so the trailing fragment after the last sentence end stands in
for ctx_b when it starts in lower case (3,243 items: ActivityNet's "... on a roof. he").
"""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "hellaswag_val.jsonl.xz"
_SENTENCE_END = re.compile(r"[.!?] ")


def preprocess(text: str) -> str:
    # lm-eval's hellaswag `preprocess`: drops WikiHow's bracketed artefacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def query(ctx: str) -> str:
    label, sep, body = ctx.partition(": ")
    if not sep:
        label, body = "", ctx
    ends = list(_SENTENCE_END.finditer(body))
    start = ends[-1].end() if ends else 0
    tail = body[start:]
    if tail[:1].islower():
        body = body[:start] + tail.capitalize()
    return preprocess(f"{label}{sep}{body}")


def read_docs(path: str | Path = DATA, limit: int | None = None) -> list[dict[str, Any]]:
    """The items as lm-eval's hellaswag task sees them: query, choices, label (gold index)."""
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(docs) >= limit:
                break
            d = json.loads(line)
            docs.append(
                {
                    "query": query(d["ctx"]),
                    "choices": [preprocess(e) for e in d["endings"]],
                    "label": int(d["label"]),
                }
            )
    return docs


def load_dataset(**_: Any):
    """lm-eval's `custom_dataset` hook: a DatasetDict with the one `validation` split."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_docs())})
