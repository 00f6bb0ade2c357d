"""`mlx-openelm kernels` and the kernel build as a first run meets it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.kernels.build import MODULE


def run(*args: str) -> object:
    return CliRunner().invoke(app, ["kernels", *args])


def test_an_unknown_action_is_one_line_and_exit_1():
    result = run("rebuild")
    assert result.exit_code == 1 and "unknown action 'rebuild'" in result.output


def test_status_of_an_empty_cache_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OPENELM_KERNEL_CACHE", str(tmp_path))
    result = run("status")
    assert result.exit_code == 0, result.output
    assert "not built yet" in result.output and "(0 build(s))" in result.output
    assert list(tmp_path.iterdir()) == []


def test_clear_removes_builds_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OPENELM_KERNEL_CACHE", str(tmp_path))
    for name in ("0123abcd", "4567ef01"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{MODULE}.so").write_bytes(b"")
    (tmp_path / ".build-x1").mkdir()  # a build that was killed
    (tmp_path / "notes").mkdir()  # not ours
    result = run("clear")
    assert result.exit_code == 0 and "removed 3 build(s)" in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernels build on Linux only")
def test_a_silenced_first_run_prints_nothing_then_status_says_on(tmp_path, tiny_folder):
    """The kernel build included: a library caller who silenced our logger sees no output."""
    code = f"""
import logging
logging.getLogger("mlx_openelm").disabled = True
import mlx_openelm
from mlx_openelm.generation import generate
model, tokenizer, _ = mlx_openelm.load({str(tiny_folder)!r}, run_on_cpu=True)
text = generate(model, tokenizer, "the", max_tokens=4)
from mlx_openelm import kernels
assert kernels.available(), kernels.status()
"""
    env = {**os.environ, "MLX_OPENELM_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout, done.stderr) == ("", "")
    status = subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "kernels"], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert status.stdout.startswith("CPU kernels: on ("), status.stdout + status.stderr
