"""The Python API as docs/python.md shows it: its examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "python.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_package_exports_mlx_lm_shaped_generation():
    import mlx_openelm
    from mlx_openelm import generate, load, stream_generate

    assert (load, generate, stream_generate) == (
        mlx_openelm.loading.load,
        mlx_openelm.generation.generate,
        mlx_openelm.generation.stream_generate,
    )


@pytest.mark.slow
def test_the_documented_examples_run(tmp_path):
    first, tuning = _examples()
    # The same code, with its paths in this test's folder and a short LoRA run.
    script = (first + tuning).replace("/tmp/", f"{tmp_path}/")
    script = script.replace('"data/"', repr(str(ROOT / "tests" / "data" / "lora")))
    script = script.replace("iters=200, batch_size=4", "iters=3, batch_size=2")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines[0]) > 20  # the greedy continuation
    assert re.search(r"tok/s, finish reason (stop|length)$", lines[-1])
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
    assert (tmp_path / "openelm-austen-tuned" / "config.json").is_file()
