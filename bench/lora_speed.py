"""LoRA fine-tuning throughput: `mlx-openelm lora` on an fp32 and a 4-bit base (QLoRA) against
the same LoRA written out in PyTorch, on the same batches, one run.

    python -m mlx_openelm.bench.lora_speed --preset 270M --batch 2 --data tests/data/lora

The MLX rows are `train.lora.lora` itself (what `mlx-openelm lora` runs: the paper's five targets,
rank 32, dropout 0.1, AdamW, clipping), its per-step tokens/s read from `metrics.jsonl`. The
PyTorch row is `reference.OpenELM` with the same adapters on the same layers (A random, B zero,
scale alpha / rank, dropout on the adapter input) and the same recipe, fed the batches the trainer
draws (`batch_indices`, `collate`). Random weights with the demo's tokenizer; every trial is a
fresh process, the rows take turns in rounds, and the report gives each row's median tokens/s
and peak memory (MLX's own count, and every row's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("mlx-openelm fp32", "mlx-openelm 4-bit", "torch-reference fp32")
TOKENIZER = Path(__file__).parent.parent / "demo" / "OpenELM-austen" / "tokenizer.model"
RANK, ALPHA, DROPOUT, LR = 32, 32.0, 0.1, 3e-4


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def mlx_steps(folder: str, data: str, batch: int, steps: int, warmup: int) -> dict:
    from mlx_openelm.train.lora import lora

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapters"
        lora(folder, data, out, iters=steps + warmup, batch_size=batch, steps_per_report=1,
             steps_per_eval=0, warmup_steps=1, progress=False)  # fmt: skip
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in log if "tokens_per_sec" in m][warmup:]
    return {"tokens_per_sec": [m["tokens_per_sec"] for m in timed],
            "peak_memory_bytes": max(m["peak_memory_bytes"] for m in timed),
            "peak_rss_bytes": _rss()}  # fmt: skip


def torch_steps(folder: str, batches: str, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mlx_openelm.bench.reference import OpenELM
    from torch import nn

    scale = ALPHA / RANK

    class LoRA(nn.Module):  # mlx-lm's LoRALinear: base(x) + scale * (dropout(x) @ A) @ B
        def __init__(self, base: nn.Module, d_in: int, d_out: int):
            super().__init__()
            self.base, self.dropout = base, nn.Dropout(DROPOUT)
            self.a = nn.Parameter(torch.empty(d_in, RANK).uniform_(-(d_in**-0.5), d_in**-0.5))
            self.b = nn.Parameter(torch.zeros(RANK, d_out))

        def forward(self, x):
            return self.base(x) + scale * (self.dropout(x) @ self.a) @ self.b

        def as_linear(self, h):  # mlx-lm's LoRAEmbedding.as_linear: the tied head
            return h @ self.base.weight.T + scale * (self.dropout(h) @ self.b.T) @ self.a.T

        def lookup(self, ids):  # and its __call__
            return self.base(ids) + scale * self.dropout(F.embedding(ids, self.a) @ self.b)

    model = OpenELM.from_pretrained(folder).train()
    model.requires_grad_(False)
    for layer in model.transformer.layers:
        for parent, name in ((layer.attn, "qkv_proj"), (layer.attn, "out_proj"),
                             (layer.ffn, "proj_1"), (layer.ffn, "proj_2")):  # fmt: skip
            base = getattr(parent, name)
            setattr(parent, name, LoRA(base, base.in_features, base.out_features))
    emb = LoRA(model.transformer.token_embeddings, *model.transformer.token_embeddings.weight.shape)
    params = [p for p in model.parameters() if p.requires_grad] + [emb.a, emb.b]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    data = np.load(batches)
    times, tokens = [], []
    for i in range(steps + warmup):
        t = time.perf_counter()
        ids, targets = (torch.from_numpy(data[f"{k}{i}"]).long() for k in ("inputs", "targets"))
        mask = torch.from_numpy(data[f"mask{i}"]).flatten()
        L = ids.shape[1]
        cos, sin = model._rope_table(ids.device, L)
        h = emb.lookup(ids)
        for layer in model.transformer.layers:
            h = layer(h, cos[:L], sin[:L], None)
        logits = emb.as_linear(model.transformer.norm(h))
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (losses * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            tokens.append(int(data[f"tokens{i}"]))
    return {"tokens_per_sec": [n / s for n, s in zip(tokens, times)], "peak_rss_bytes": _rss()}


def _trial(row: str, work: dict) -> dict:
    """One trial of `row` in a fresh interpreter."""
    call = (f"t.torch_steps({work['folders']['fp32']!r}, {work['batches']!r}, {work['steps']}, "
            f"{work['warmup']})" if row.startswith("torch") else
            f"t.mlx_steps({work['folders'][row.split()[-1]]!r}, {work['data']!r}, "
            f"{work['batch']}, {work['steps']}, {work['warmup']})")  # fmt: skip
    code = f"import json; from mlx_openelm.bench import lora_speed as t; print(json.dumps({call}))"
    with tempfile.TemporaryDirectory() as cwd:  # the installed package, not a source tree in cwd
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{row} failed: {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _folders(preset: str, tmp: Path) -> dict[str, str]:
    """fp32 and 4-bit (group 64, `convert -q`'s default) folders of random weights."""
    import mlx.nn as nn
    from mlx_openelm.bench.weights import random_folder

    from mlx_openelm.config import preset as preset_args
    from mlx_openelm.loading import load, save_model

    fp32 = random_folder(preset_args(preset), tmp / "fp32")
    shutil.copy(TOKENIZER, fp32 / "tokenizer.model")
    model, _, args = load(fp32)
    nn.quantize(model, group_size=64, bits=4)
    save_model(tmp / "q4", model, args, quantization={"group_size": 64, "bits": 4})
    shutil.copy(TOKENIZER, tmp / "q4" / "tokenizer.model")
    return {"fp32": str(fp32), "4-bit": str(tmp / "q4")}


def _batches(folder: str, data: str, batch: int, count: int, out: Path) -> None:
    """The batches the trainer draws for its first `count` steps (seed 0), as numpy arrays."""
    import numpy as np

    import mlx_openelm
    from mlx_openelm.chat_template import template_for_training
    from mlx_openelm.train.data import batch_indices, collate, load_data_folder, tokenize
    from mlx_openelm.train.trainer import TrainingArgs

    _, tokenizer, _ = mlx_openelm.load(folder)
    template = template_for_training(Path(folder), None)
    train_set, _ = tokenize(load_data_folder(data, require_valid=False)["train"], tokenizer,
                            TrainingArgs().max_seq_length, template)  # fmt: skip
    arrays = {}
    for i in range(count):
        examples = [train_set[j] for j in batch_indices(len(train_set), batch, i, 0)]
        arrays[f"inputs{i}"], arrays[f"targets{i}"], arrays[f"mask{i}"] = collate(examples)
        arrays[f"tokens{i}"] = np.array(sum(len(ids) - 1 for ids, _ in examples))
    np.savez(out, **arrays)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="270M")
    p.add_argument("--data", default="tests/data/lora", help="a folder with train.jsonl")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    rows = a.rows.split(",")

    import mlx_openelm  # noqa: F401  (picks the BLAS before mlx.core)

    results: dict[str, list[dict]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        folders = _folders(a.preset, Path(tmp))
        batches = Path(tmp) / "batches.npz"
        _batches(folders["fp32"], a.data, a.batch, a.steps + a.warmup, batches)
        work = dict(folders=folders, batches=str(batches), data=str(Path(a.data).resolve()),
                    batch=a.batch, steps=a.steps, warmup=a.warmup)  # fmt: skip
        for r in range(a.trials):
            for row in rows:
                results[row].append(_trial(row, work))
                tps = statistics.median(results[row][-1]["tokens_per_sec"])
                print(f"round {r + 1}/{a.trials}: {row} {tps:,.1f} tok/s", file=sys.stderr)
    report = {
        "preset": a.preset, "data": a.data, "batch": a.batch, "steps": a.steps,
        "warmup": a.warmup, "trials": a.trials, "lora": dict(rank=RANK, alpha=ALPHA),
        "tokens_per_sec": {row: statistics.median(t for res in v for t in res["tokens_per_sec"])
                           for row, v in results.items()},
        "peak_rss_bytes": {row: max(res["peak_rss_bytes"] for res in v)
                           for row, v in results.items()},
        "mlx_peak_memory_bytes": {row: max(res["peak_memory_bytes"] for res in v)
                                  for row, v in results.items() if row.startswith("mlx")},
        "per_trial": results,
    }  # fmt: skip
    tps = report["tokens_per_sec"]
    print(f"LoRA on the {a.preset} shape (random weights), batch {a.batch}, {a.data}, median of "
          f"{a.steps} steps x {a.trials} trials:")  # fmt: skip
    for row, v in tps.items():
        mem = report["mlx_peak_memory_bytes"].get(row)
        note = f", MLX peak {mem / 1e9:.2f} GB" if mem else ""
        print(f"  {row:<22} {v:>7.1f} tok/s, peak RSS {report['peak_rss_bytes'][row] / 1e9:.2f} "
              f"GB{note}")  # fmt: skip
    for row in rows[1:]:
        print(f"  {rows[0]} / {row}: {tps[rows[0]] / tps[row]:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
