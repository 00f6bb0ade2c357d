"""Data-parallel training speed at 1, 2, ... local ranks, and the ring all-reduce bandwidth.

    python -m mlx_openelm.bench.distributed [--ranks 1,2] [--steps 20] [--json out.json]

For each world size N it starts `mlx.launch -n N --backend ring` on this machine, and every rank
runs the real training loop (`trainer.train`: compiled step, `average_gradients`) on a tiny random
OpenELM with the same global batch, in two modes: `full` (every weight trains, as in pretraining:
the gradient all-reduce is the whole model) and `lora`. tokens/s is global (all ranks together),
timed over `--steps` steps after as many warm-up steps. Then `all_sum` of a `--allreduce-mb` fp32
buffer is timed; bus bandwidth = 2 (N-1)/N x bytes / time, the traffic each link carries in a ring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlx_openelm._blas import thread_env
from mlx_openelm.errors import UserError

MODEL = dict(
    num_transformer_layers=4, model_dim=128, head_dim=32, vocab_size=512,
    ffn_dim_divisor=32, max_context_length=512,
)  # fmt: skip


def _worker(mode: str, steps: int, batch: int, seq: int, allreduce_mb: float) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_openelm.adapters import adapter_config, apply_lora
    from mlx_openelm.config import ModelArgs
    from mlx_openelm.model import Model
    from mlx_openelm.train.trainer import TrainingArgs, train

    group = mx.distributed.init()
    mx.random.seed(0)
    model = Model(ModelArgs(**MODEL))
    if mode == "lora":
        apply_lora(model, adapter_config(len(model.layers), rank=8, alpha=16, dropout=0.0))
    rng = np.random.default_rng(0)
    data = [
        (rng.integers(3, MODEL["vocab_size"], seq + 1).astype(np.int32), np.ones(seq + 1, bool))
        for _ in range(batch * 8)
    ]
    args = TrainingArgs(
        batch_size=batch, iters=2 * steps, warmup_steps=1, max_seq_length=seq,
        steps_per_report=steps, steps_per_eval=0, steps_per_save=10**9,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        # The last report covers the timed steps only (the first window holds the compilation).
        result = train(model, data, None, Path(out) / "run", args, progress=False)
    grads = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))

    times, buf = [], mx.ones((int(allreduce_mb * 2**20) // 4,), mx.float32)
    if group.size() > 1:
        for i in range(8):
            mx.eval(mx.distributed.all_sum(mx.array(0.0)))  # line up the ranks
            tic = time.perf_counter()
            mx.eval(mx.distributed.all_sum(buf))
            if i >= 2:  # the first ones set up buffers
                times.append(time.perf_counter() - tic)
    if group.rank() == 0:
        record = {
            "mode": mode,
            "ranks": group.size(),
            "tokens_per_sec": result["tokens_per_sec"],
            "step_ms": 1e3 * batch * seq / result["tokens_per_sec"],
            "gradient_bytes": grads,
            "allreduce_bytes": buf.nbytes,
            "allreduce_s": statistics.median(times) if times else None,
        }
        print("RESULT " + json.dumps(record), flush=True)


def free_ports(n: int) -> int:
    """A first port p such that p .. p+n-1 are free (mlx.launch gives rank r port p+r)."""
    for _ in range(50):
        socks = []
        try:
            socks.append(socket.create_server(("127.0.0.1", 0)))
            p = socks[0].getsockname()[1]
            socks += [socket.create_server(("127.0.0.1", p + r)) for r in range(1, n)]
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def run(
    ranks: list[int],
    steps: int,
    batch: int,
    seq: int,
    allreduce_mb: float,
    threads: int | None = None,
    hostfile: Path | None = None,
) -> list[dict[str, Any]]:
    """Start each world size under `mlx.launch` (local ranks, or the hosts of `hostfile` for
    every N > 1) and collect rank 0's records."""
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    cores = os.cpu_count() or 1
    records = []
    for n in ranks:
        if batch % n:
            raise UserError(f"--batch {batch} is not divisible by {n} ranks")
        per_rank = threads or max(1, cores // n)  # local ranks share the cores
        env = {**os.environ, **thread_env(per_rank)}
        for mode in ("full", "lora"):
            worker = ["-m", "mlx_openelm.bench.distributed", "worker", mode, str(steps),
                      str(batch), str(seq), str(allreduce_mb)]  # fmt: skip
            where = ["--hostfile", str(hostfile)] if hostfile else ["-n", str(n)]
            # One rank runs bare: under `mlx.launch -n 1` (mlx 0.32) init() fails on the empty
            # hostfile the launcher writes.
            cmd = [sys.executable, *worker] if n == 1 else [
                launcher, *where, "--backend", "ring", "-p", str(free_ports(n)),
                "--python", sys.executable, "--", *worker]  # fmt: skip
            # A neutral working directory: see bench.run_worker.
            with tempfile.TemporaryDirectory() as cwd:
                r = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=cwd
                )
            lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
            records.append({**json.loads(lines[-1][7:]), "threads_per_rank": per_rank})
            print(_row(records[-1], records), flush=True)
    return records


def _row(r: dict[str, Any], records: list[dict[str, Any]]) -> str:
    base = next(x for x in records if x["mode"] == r["mode"])
    bw = ""
    if r["allreduce_s"]:
        algo = r["allreduce_bytes"] / r["allreduce_s"]
        bus = algo * 2 * (r["ranks"] - 1) / r["ranks"]
        bw = f"{r['allreduce_s'] * 1e3:8.1f} ms {bus / 1e9:6.2f} GB/s"
    return (
        f"| {r['mode']:4} | {r['ranks']:5} | {r['threads_per_rank']:7} | "
        f"{r['tokens_per_sec']:10,.0f} | {r['tokens_per_sec'] / base['tokens_per_sec']:5.2f}x | "
        f"{r['step_ms']:8.1f} | {r['gradient_bytes'] / 1e6:8.2f} | {bw:>22} |"
    )


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        mode, steps, batch, seq, mb = sys.argv[2:7]
        _worker(mode, int(steps), int(batch), int(seq), float(mb))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="1,2", help="world sizes to run, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after as many warm-up)")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--allreduce-mb", type=float, default=64, help="all_sum buffer size (MiB)")
    p.add_argument("--threads", type=int, help="BLAS threads per rank (default: cores / ranks)")
    p.add_argument("--hostfile", type=Path, help="run N > 1 on these hosts (mlx.launch's format)")
    p.add_argument("--json", type=Path, help="also write the records here")
    a = p.parse_args()
    import mlx.core as mx

    ranks = [int(x) for x in a.ranks.split(",")]
    if a.hostfile:  # one local rank, then every host of the file
        hosts = json.loads(a.hostfile.read_text())
        ranks = [1, len(hosts["hosts"] if isinstance(hosts, dict) else hosts)]
    where = f"hosts of {a.hostfile}" if a.hostfile else "local ranks"
    print(
        f"mlx {mx.__version__}, {platform.platform()}, {os.cpu_count()} cores; ring back end, "
        f"{where}; model {MODEL}; global batch {a.batch} x {a.seq} tokens\n"
        f"command: python -m mlx_openelm.bench.distributed {' '.join(sys.argv[1:])}\n\n"
        "| mode | ranks | threads | tokens/s   | vs 1  | step ms  | grads MB | all_sum "
        f"{a.allreduce_mb:g} MiB, bus bw |\n|---|---|---|---|---|---|---|---|"
    )
    records = run(ranks, a.steps, a.batch, a.seq, a.allreduce_mb, a.threads, a.hostfile)
    if a.json:
        a.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
