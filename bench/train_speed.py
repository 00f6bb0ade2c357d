"""Pretraining throughput: mlx-openelm's trainer against PyTorch eager on the same model, one run.

    python -m mlx_openelm.bench.train_speed --config demo/train_config.json --batch 8 --seq 256

The MLX side is `train.trainer.train` itself (the loop `mlx-openelm pretrain` runs: compiled step,
AdamW, clipping, and on a Linux CPU the native kernels with their backward passes), timed per
optimizer step through its `on_step` hook. The PyTorch side is `reference.OpenELM`
in train mode with AdamW and `clip_grad_norm_`, the same recipe. Every trial is a fresh process
(torch and MLX never share one), the rows take turns in rounds, and the report gives each row's
median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {"mlx-openelm": {}, "torch-reference": {}}  # row: its environment


def _batches(vocab: int, batch: int, seq: int, count: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq + 1)) for _ in range(count)]


def mlx_steps(folder: str, batch: int, seq: int, steps: int, warmup: int) -> list[float]:
    import mlx.core as mx  # noqa: I001
    import numpy as np

    import mlx_openelm
    from mlx_openelm.train.trainer import TrainingArgs, train

    model, _, config = mlx_openelm.load(folder)
    rows = [b for chunk in _batches(config.vocab_size, batch, seq, steps + warmup) for b in chunk]
    examples = [(r.astype("int32"), np.ones(len(r), bool)) for r in rows]  # every token a target
    stamps: list[float] = []
    args = TrainingArgs(batch_size=batch, iters=steps + warmup, warmup_steps=1,
                        weight_decay=0.1, max_seq_length=seq + 1, steps_per_eval=0,
                        steps_per_save=10**9, steps_per_report=10**9)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        train(model, examples, None, Path(out) / "run", args, weights_file="model.safetensors",
              on_step=lambda *_: stamps.append(time.perf_counter()), progress=False)  # fmt: skip
    mx.eval(model.parameters())
    return [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]


def torch_steps(folder: str, batch: int, seq: int, steps: int, warmup: int) -> list[float]:
    import torch
    import torch.nn.functional as F
    from mlx_openelm.bench.reference import OpenELM

    model = OpenELM.from_pretrained(folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    vocab = model.config["vocab_size"]
    for i, b in enumerate(_batches(vocab, batch, seq, steps + warmup)):
        t = time.perf_counter()
        ids = torch.from_numpy(b)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def _trial(row: str, folder: str, batch: int, seq: int, steps: int, warmup: int) -> list[float]:
    """One trial of `row` in a fresh interpreter; step times in seconds."""
    code = (
        "import json, sys; from mlx_openelm.bench import train_speed as t; "
        f"fn = t.torch_steps if {row!r} == 'torch-reference' else t.mlx_steps; "
        f"print(json.dumps(fn({folder!r}, {batch}, {seq}, {steps}, {warmup})))"
    )
    env = {**os.environ, **ROWS[row]}
    with tempfile.TemporaryDirectory() as cwd:  # the installed package, not a source tree in cwd
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, cwd=cwd)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{row} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo/train_config.json", help="a config.json of the shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per trial")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)

    from mlx_openelm.bench.weights import random_folder

    import mlx_openelm  # noqa: F401  (picks the BLAS before mlx.core)
    from mlx_openelm.config import ModelArgs

    args = ModelArgs.from_file(a.config)
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(random_folder(args, Path(tmp) / "model"))
        for r in range(a.trials):
            for row in ROWS:
                t = _trial(row, folder, a.batch, a.seq, a.steps, a.warmup)
                times[row].append(a.batch * a.seq / statistics.median(t))
                print(
                    f"round {r + 1}/{a.trials}: {row} {times[row][-1]:,.0f} tok/s", file=sys.stderr
                )
    report = {
        "config": a.config, "parameters": args.num_parameters(), "batch": a.batch, "seq": a.seq,
        "steps": a.steps, "trials": a.trials,
        "tokens_per_sec": {row: statistics.median(v) for row, v in times.items()},
        "trials_tokens_per_sec": times,
    }  # fmt: skip
    tps = report["tokens_per_sec"]
    print(f"pretraining {a.config} ({args.num_parameters():,} parameters), batch {a.batch} x "
          f"{a.seq}, AdamW + clipping, fp32, median of {a.trials} trials:")  # fmt: skip
    for row, v in tps.items():
        print(f"  {row:<24} {v:>9,.0f} tok/s   {v / tps['torch-reference']:.2f}x PyTorch")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
