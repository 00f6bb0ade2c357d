"""Peak memory and time of `mlx-openelm convert` on checkpoints of the released sizes.

Writes a random-weight Hugging Face checkpoint of a preset (one safetensors file or shards past
5 GiB, and optionally a zip64 `pytorch_model.bin` through torch), converts it to float32,
bfloat16 and 4-bit in a fresh process each, and reports peak RSS against the checkpoint's size:

    python -m mlx_openelm.bench.convert_memory --preset 1_1B --formats safetensors,bin \
        --work /tmp/convert-memory --out bench/results/convert-memory-1_1B
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_openelm.convert.tensors import TensorRef
from mlx_openelm.convert.writer import write_weights

import mlx_openelm

TARGETS = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "4-bit": ["-q", "--q-bits", "4"]}


def _random_refs(args, folder: Path, seed: int = 0) -> dict[str, TensorRef]:
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(mlx_openelm.Model(args).parameters())}

    def make(i: int, shape: tuple[int, ...]):
        rng = np.random.default_rng(seed + i)
        return lambda: rng.standard_normal(shape, dtype=np.float32) * 0.02

    return {
        k: TensorRef(s, "float32", folder, make(i, s)) for i, (k, s) in enumerate(shapes.items())
    }


def write_checkpoint(preset: str, folder: Path, fmt: str) -> int:
    """A random fp32 checkpoint of `preset` in `folder`; returns its weights' bytes."""
    args = mlx_openelm.preset(preset)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(args.to_dict()))
    refs = _random_refs(args, folder)
    if fmt == "safetensors":
        return write_weights(folder, refs, mx.float32)  # a file per 5 GiB, as HF shards
    import torch  # the reference extra: torch.save writes zip64 past 4 GiB

    torch.save(
        {k: torch.from_numpy(r.read()) for k, r in refs.items()}, folder / "pytorch_model.bin"
    )
    return sum(r.nbytes for r in refs.values())


def measure(src: Path, out: Path, options: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one conversion in a fresh process."""
    cmd = ["/usr/bin/time", "-f", "%M %e", "mlx-openelm", "convert", str(src), str(out)]
    cmd += ["--no-tokenizer", "--overwrite", *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"convert failed: {done.stderr.strip().splitlines()[-1]}")
    kb, seconds = done.stderr.strip().splitlines()[-1].split()
    shutil.rmtree(out)
    return int(kb) * 1024 / 1e9, float(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1_1B")
    p.add_argument("--formats", default="safetensors", help="safetensors,bin")
    p.add_argument("--work", type=Path, default=Path("/tmp/convert-memory"))
    p.add_argument("--out", type=Path, help="write OUT.txt and OUT.json")
    a = p.parse_args()
    rows, lines = [], ["| checkpoint | size GB | to | peak RSS GB | x checkpoint | seconds |"]
    lines.append("|---|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        src = a.work / f"{a.preset}-{fmt}"
        size = write_checkpoint(a.preset, src, fmt)
        for target, options in TARGETS.items():
            rss, seconds = measure(src, a.work / "out", options)
            row = dict(preset=a.preset, format=fmt, size_gb=size / 1e9, target=target)
            rows.append({**row, "peak_rss_gb": rss, "ratio": rss / (size / 1e9), "s": seconds})
            lines.append(
                f"| {a.preset} fp32 {fmt} | {size / 1e9:.2f} | {target} | {rss:.2f} | "
                f"{rss / (size / 1e9):.2f} | {seconds:.0f} |"
            )
            print(lines[-1], flush=True)
        shutil.rmtree(src)
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".txt").write_text(f"{text}\n")
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
