"""Data parallelism over mx.distributed, with two local ranks on the ring back end (TCP): two ranks
give one process's weights and write each file once, a checkpoint resumes under another world
size, and a dead or silent peer stops the others with an error instead of a hang.

Multi-process runs use `mlx.launch` as a user would, or start the ranks by hand the way it does
(MLX_RANK + MLX_HOSTFILE) where a test needs each rank's own exit code. Ports come from the OS,
so parallel test runs don't collide on mlx.launch's fixed default (32323).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx  # noqa: I001  (conftest imports mlx_openelm first, which picks the BLAS)
import numpy as np
import pytest
from conftest import make_model_folder, tiny_args
from mlx_openelm.bench.distributed import free_ports
from typer.testing import CliRunner

from mlx_openelm._blas import thread_env
from mlx_openelm.cli import app
from mlx_openelm.train import distributed
from mlx_openelm.train.checkpoint import latest_checkpoint

DATA = Path(__file__).parent / "data" / "lora"
TEXT = Path(__file__).parent / "data" / "persuasion.txt"
CLI = ["-m", "mlx_openelm.cli"]
# Dropout 0: each rank draws its own dropout noise, so only without it do N ranks equal one process.
LORA = ["--rank", "8", "--alpha", "16", "--dropout", "0", "--batch-size", "8",
        "--learning-rate", "1e-2", "--warmup-steps", "1", "--max-seq-length", "128",
        "--steps-per-report", "1"]  # fmt: skip
SHORT = ["--iters", "4", "--steps-per-eval", "2", "--steps-per-save", "2"]
STATE = "checkpoints/step_0000004/state.json"
# fp32, 4 AdamW steps: two ranks sum the gradients in another order. LoRA at lr 1e-2 (adapter
# values up to ~0.2): measured 1.1e-6 (2 ranks) and 2e-8 (resumed under 2 ranks). Pretraining at
# lr 1e-3 (weights up to ~0.5): measured 3.8e-6 (AdamW magnifies noise on near-zero gradients).
ATOL_LORA, ATOL_PRETRAIN = 1e-5, 2e-5
# One BLAS thread per rank: two ranks share this machine's cores.
ENV = {**os.environ, **thread_env(1), "PYTHONUNBUFFERED": "1"}


def launch(args: list[str], cwd: Path, n: int = 2, timeout: float = 300) -> str:
    """`mlx.launch -n N --backend ring ... -- python -m mlx_openelm.cli ARGS`; its output."""
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    cmd = [launcher, "-n", str(n), "--backend", "ring", "-p", str(free_ports(n)),
           "--python", sys.executable, "--", *CLI, *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    output = r.stdout + r.stderr
    # mlx.launch exits 0 even when a rank fails: its warning is the sign.
    assert r.returncode == 0 and "exited with code" not in output, output
    return output


def start_ranks(args: list[str], tmp: Path, timeouts=("60", "60"), extra=(None, None)):
    """Two ranks started by hand, as mlx.launch does; each with its own log and watchdog timeout."""
    port = free_ports(2)
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(2)]))
    procs = []
    for rank in range(2):
        env = {**ENV, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
               distributed.TIMEOUT_ENV: timeouts[rank]}  # fmt: skip
        log = open(tmp / f"rank{rank}.log", "w")
        cmd = [sys.executable, *CLI, *args, *(extra[rank] or [])]
        procs.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=log))
    return procs


def read_log(tmp: Path, rank: int) -> str:
    return (tmp / f"rank{rank}.log").read_text()


def run_ranks(args: list[str], tmp: Path, extra=(None, None), timeout: float = 240) -> list[int]:
    """`start_ranks`, then their exit codes (any rank still running at `timeout` is killed)."""
    procs = start_ranks(args, tmp, extra=extra)
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        kill_all(procs)


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for_step(metrics: Path, step: int, procs, timeout: float = 240) -> None:
    """Until rank 0 has logged `step` (the ranks are past start-up and compilation)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert all(p.poll() is None for p in procs), "a rank ended early"
        if metrics.is_file():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} after {timeout} s")


def weights(folder: Path, name: str) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / name)).items()}


def assert_same_weights(a: Path, b: Path, name="adapters.safetensors", atol=ATOL_LORA) -> None:
    wa, wb = weights(a, name), weights(b, name)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=atol, rtol=0, err_msg=k)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def metrics(folder: Path) -> list[dict]:
    keep = ("step", "train_loss", "val_loss", "learning_rate", "grad_norm")
    return [
        {k: v for k, v in json.loads(line).items() if k in keep}
        for line in (folder / "metrics.jsonl").read_text().splitlines()
    ]


def assert_same_state(one: Path, two: Path) -> None:
    """The checkpoints' state.json agree but for the world size they were saved under."""
    state = [json.loads((d / STATE).read_text()) for d in (one, two)]
    assert (state[0].pop("world_size"), state[1].pop("world_size")) == (1, 2)
    assert state[0] == state[1]


def pretrain_args(tmp: Path, spm_model: Path, *extra: str) -> list[str]:
    """A 4-step pretraining of the tiny shape on the shipped text (no --out)."""
    config = tmp / "tiny.json"
    config.write_text(json.dumps(tiny_args().to_dict()))
    return ["pretrain", "--data", str(TEXT), "--config", str(config), "--tokenizer",
            str(spm_model), "--doc-separator", "\\n\\n", "--val-fraction", "0.05",
            "--seq-length", "64", "--batch-size", "4", "--warmup-steps", "1", *SHORT,
            *extra]  # fmt: skip


def lora_cli(out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["lora", *extra, "--adapter-path", str(out)])
    assert result.exit_code == 0, result.output


# ---- fast: no second process


class FakeGroup:
    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_a_batch_the_world_size_does_not_divide_is_a_clear_error(tmp_path, spm_model, monkeypatch):
    base = make_model_folder(tmp_path / "base", spm_model, seed=1)
    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: FakeGroup(2))
    # Rank 0 of a pretend world: its broadcasts return its own value.
    monkeypatch.setattr(distributed, "_json_from_rank0", lambda obj, group: obj)
    result = CliRunner().invoke(
        app, ["lora", "--model", str(base), "--data", str(DATA), *LORA, "--batch-size", "3",
              "--adapter-path", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "batch size 3 is not divisible by the 2 processes" in result.output


def test_timeout_option(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.collective_timeout() == 12.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="give seconds"):
        distributed.collective_timeout()


def test_guard_turns_a_lost_peer_into_a_clear_error(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")  # no watchdog thread here
    with pytest.raises(ConnectionError, match="rank 1 lost contact .* --resume"):
        with distributed.guard(FakeGroup(2, rank=1)):
            raise RuntimeError("[ring] connection to a peer was lost")
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through unchanged
        with distributed.guard(FakeGroup(2)):
            raise RuntimeError("unrelated")


def test_watchdog_ends_a_process_that_stops_progressing(tmp_path):
    # The main thread sleeps as if blocked in a collective; heartbeats first keep it alive.
    script = (
        "import time, mlx_openelm\n"
        "from mlx_openelm.train import distributed as d\n"
        "class G:\n    size = lambda self: 2\n    rank = lambda self: 1\n"
        "with d.guard(G()):\n"
        "    for _ in range(6):\n        time.sleep(0.5); d.heartbeat()\n"
        "    print('alive', flush=True); time.sleep(60)\n"
    )
    env = {**ENV, distributed.TIMEOUT_ENV: "2"}
    tic = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 1 and "alive" in r.stdout, r.stdout + r.stderr
    assert "error: rank 1: no progress for 2 s" in r.stderr
    assert time.monotonic() - tic < 30


# ---- two local ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spm_model) -> Path:
    """4 LoRA steps (checkpoints at 2 and 4) by one process and by two ranks under mlx.launch."""
    tmp = tmp_path_factory.mktemp("dist")
    base = make_model_folder(tmp / "base", spm_model, seed=1)
    opts = ["--model", str(base), "--data", str(DATA), *LORA, *SHORT]
    lora_cli(tmp / "one", *opts)
    out = launch(["lora", *opts, "--adapter-path", str(tmp / "two")], cwd=tmp)
    (tmp / "two.log").write_text(out)
    return tmp


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_write_once(runs):
    one, two = runs / "one", runs / "two"
    assert_same_weights(one, two)
    assert max(np.abs(w).max() for w in weights(one, "adapters.safetensors").values()) > 0.01
    assert files(one) == files(two)  # one copy of each file, nothing left half-written
    m1, m2 = metrics(one), metrics(two)
    assert [r.keys() for r in m1] == [r.keys() for r in m2]
    for r1, r2 in zip(m1, m2, strict=True):  # the figures are global: loss over all ranks
        assert r1 == pytest.approx(r2, rel=1e-5)
    assert_same_state(one, two)
    # Rank 0 alone prints: the summary and each report appear once.
    out = (runs / "two.log").read_text()
    assert out.count("trainable parameters") == 1 and out.count("step 4: val loss") == 1, out


@pytest.mark.slow
def test_resume_across_world_sizes(runs, tmp_path):
    opts = ["--model", str(runs / "base"), "--data", str(DATA), *LORA, *SHORT, "--resume"]
    for src, dst in (("two", "two_then_one"), ("one", "one_then_two")):
        shutil.copytree(runs / src, tmp_path / dst)
        shutil.rmtree(tmp_path / dst / "checkpoints/step_0000004")  # as if stopped at step 2
        assert latest_checkpoint(tmp_path / dst).name == "step_0000002"
    lora_cli(tmp_path / "two_then_one", *opts)  # saved by 2 ranks, continued by 1
    launch(["lora", *opts, "--adapter-path", str(tmp_path / "one_then_two")], cwd=tmp_path)
    for dst in ("two_then_one", "one_then_two"):
        assert_same_weights(runs / "one", tmp_path / dst)
        assert [r["step"] for r in metrics(tmp_path / dst)] == [0, 1, 2, 2, 3, 4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_silent_peer_stops_the_other(how, runs, tmp_path):
    """SIGKILL: the ring sees the socket close. SIGSTOP (a hung or unreachable machine): the ring
    would wait forever, so rank 0's watchdog (15 s here) ends it."""
    args = ["lora", "--model", str(runs / "base"), "--data", str(DATA), *LORA,
            "--iters", "100000", "--steps-per-eval", "0", "--steps-per-save", "100000",
            "--adapter-path", str(tmp_path / "out")]  # fmt: skip
    procs = start_ranks(args, tmp_path, timeouts=("15", "600"))
    try:
        wait_for_step(tmp_path / "out" / "metrics.jsonl", 2, procs)
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        tic = time.monotonic()
        code = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - tic
    finally:
        kill_all(procs)
    log = read_log(tmp_path, 0)
    assert code == 1, log
    if how == "kill":
        assert "rank 0 lost contact with the other processes" in log, log
        assert elapsed < 15
    else:
        assert "error: rank 0: no progress for" in log, log
        assert 15 <= elapsed < 45


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_both_with_a_checkpoint(runs, tmp_path):
    # On two machines, Ctrl-C reaches only the one whose terminal it was typed in.
    out = tmp_path / "out"
    args = ["lora", "--model", str(runs / "base"), "--data", str(DATA), *LORA,
            "--iters", "100000", "--steps-per-eval", "0", "--steps-per-save", "100000",
            "--adapter-path", str(out)]  # fmt: skip
    procs = start_ranks(args, tmp_path)
    try:
        wait_for_step(out / "metrics.jsonl", 2, procs)
        os.kill(procs[1].pid, signal.SIGINT)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        kill_all(procs)
    assert codes == [130, 130], read_log(tmp_path, 0) + read_log(tmp_path, 1)
    step = json.loads((latest_checkpoint(out) / "state.json").read_text())["step"]
    assert step >= 2 and (out / "adapters.safetensors").is_file()
    assert f"interrupted at step {step}: saved" in read_log(tmp_path, 0)


@pytest.mark.slow
def test_resume_needs_the_folder_on_rank_0_only(runs, tmp_path):
    # Two machines without a shared folder: only rank 0's has the run; rank 1's path is empty.
    shutil.copytree(runs / "two", tmp_path / "rank0")
    shutil.rmtree(tmp_path / "rank0" / "checkpoints/step_0000004")  # as if stopped at step 2
    args = ["lora", "--model", str(runs / "base"), "--data", str(DATA), *LORA, *SHORT, "--resume"]
    extra = (["--adapter-path", str(tmp_path / "rank0")], ["--adapter-path", str(tmp_path / "x")])
    codes = run_ranks(args, tmp_path, extra)
    assert codes == [0, 0], read_log(tmp_path, 0) + read_log(tmp_path, 1)
    assert_same_weights(runs / "one", tmp_path / "rank0")
    assert not (tmp_path / "x").exists()  # rank 1 wrote nothing


@pytest.mark.slow
def test_a_folder_error_on_rank_0_stops_every_rank(runs, tmp_path):
    # Rank 0's folder has nothing to resume: both ranks stop with its error, not a hang.
    shutil.copytree(runs / "two", tmp_path / "rank1")
    args = ["lora", "--model", str(runs / "base"), "--data", str(DATA), *LORA, *SHORT, "--resume"]
    extra = (["--adapter-path", str(tmp_path / "x")], ["--adapter-path", str(tmp_path / "rank1")])
    assert run_ranks(args, tmp_path, extra, timeout=120) == [1, 1]
    for rank in range(2):
        assert f"nothing to resume: {tmp_path / 'x'} has no checkpoint" in read_log(tmp_path, rank)


@pytest.mark.slow
def test_ranks_with_other_options_refuse_to_start(runs, tmp_path):
    args = ["lora", "--model", str(runs / "base"), "--data", str(DATA), *LORA, *SHORT,
            "--adapter-path", str(tmp_path / "out")]  # fmt: skip
    assert run_ranks(args, tmp_path, extra=(None, ["--learning-rate", "1e-3"])) == [1, 1]
    for rank in range(2):
        assert "rank(s) [1] run with other options, data or model than rank 0" in read_log(
            tmp_path, rank
        )


@pytest.mark.slow
def test_pretraining_on_two_ranks_equals_one_process(tmp_path, spm_model):
    args = pretrain_args(tmp_path, spm_model, "--steps-per-report", "1")
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    out = launch([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_weights(one, two, "model.safetensors", ATOL_PRETRAIN)
    assert files(one) == files(two)
    for r1, r2 in zip(metrics(one), metrics(two), strict=True):
        assert r1 == pytest.approx(r2, rel=1e-5)
    assert_same_state(one, two)
    summary = [json.loads((d / "pretrain.json").read_text()) for d in (one, two)]
    assert summary[0]["val_loss"] == pytest.approx(summary[1]["val_loss"], rel=1e-5)
    assert out.count("step 4: val loss") == 1, out


@pytest.mark.slow
def test_average_last_on_two_ranks_needs_the_folder_on_rank_0_only(tmp_path, spm_model):
    # Rank 0 averages its checkpoints and hands the result over: rank 1 has no folder at all, and
    # the final validation (summed over both ranks) equals one process's.
    args = pretrain_args(tmp_path, spm_model, "--average-last", "2")
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    extra = (["--out", str(tmp_path / "rank0")], ["--out", str(tmp_path / "x")])
    codes = run_ranks(args, tmp_path, extra)
    assert codes == [0, 0], read_log(tmp_path, 0) + read_log(tmp_path, 1)
    assert not (tmp_path / "x").exists()  # rank 1 wrote nothing
    assert_same_weights(tmp_path / "one", tmp_path / "rank0", "model.safetensors", ATOL_PRETRAIN)
    summary = [json.loads((tmp_path / d / "pretrain.json").read_text()) for d in ("one", "rank0")]
    assert summary[1]["averaged_checkpoints"] == 2
    assert summary[0]["val_loss"] == pytest.approx(summary[1]["val_loss"], rel=1e-5)
