"""Rebuild `demo/data/austen.jsonl`, the demo model's training text, from pd-english.tar.xz.

Jane Austen's six novels (Project Gutenberg texts via Debian's r-cran-janeaustenr; see the corpus
README), one JSON record per chapter: `{"text": ...}`. Headings and the front and back matter are
dropped, and each paragraph's hard-wrapped lines are joined into one line (paragraphs are
separated by a blank line), so the model learns prose rather than Gutenberg's line breaks.

    python demo/build_data.py ../shared/corpus/pd-english.tar.xz demo/data/austen.jsonl
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

HEADING = re.compile(r"^\s*(CHAPTER|Chapter|VOLUME|Volume)\b.*$")
THE_END = re.compile(r"^\s*(THE END|FINIS|Finis)\s*$")


def chapters(text: str) -> list[str]:
    """The chapters of one novel, each as paragraphs joined by blank lines."""
    out: list[list[str]] = []
    para: list[str] = []

    def end_paragraph() -> None:
        if para and out:
            out[-1].append(re.sub(r"\s+", " ", " ".join(para)).strip())
        para.clear()

    for line in text.splitlines():
        if THE_END.match(line):
            break  # Northanger Abbey's publisher's note follows
        if HEADING.match(line):
            end_paragraph()
            if line.strip().upper().startswith("CHAPTER"):
                out.append([])
            continue
        if line.strip():
            para.append(line.strip())
        else:
            end_paragraph()
    end_paragraph()
    return ["\n\n".join(c) for c in out if c]


def main(archive: str, out: str) -> None:
    records = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.startswith("pd-english/austen/") and m.isfile()),
            key=lambda m: m.name,
        )
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8")
            records += [{"text": c} for c in chapters(text)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(records)} chapters, {sum(len(r['text']) for r in records):,} characters -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python demo/build_data.py PD_ENGLISH_TAR_XZ OUT.jsonl")
    main(sys.argv[1], sys.argv[2])
