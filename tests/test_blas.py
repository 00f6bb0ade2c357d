"""Which BLAS MLX is pointed at on Linux (`mlx_openelm/_blas.py`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_openelm import _blas
from mlx_openelm._cpuinfo import cpuinfo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def test_amd_prefers_openblas_and_other_cpus_mkl():
    assert _blas.auto_order("AuthenticAMD")[0] == "openblas"
    assert _blas.auto_order("GenuineIntel")[0] == "mkl"
    assert _blas.auto_order("")[0] == "mkl"
    assert sorted(_blas.auto_order("AuthenticAMD")) == sorted(_blas.AUTO)


def test_cpuinfo_reads_a_field_by_its_whole_key():
    """The vendor, the flags the kernels' build is keyed on, and the model name come from here."""
    if os.uname().machine == "x86_64":
        assert _blas.cpu_vendor() in {"GenuineIntel", "AuthenticAMD"}
        assert "sse2" in cpuinfo("flags", "Features").split()
        assert cpuinfo("model name")
    # a key is matched whole: "flag" is not "flags"
    assert cpuinfo("flag") == cpuinfo("model name ") == cpuinfo("no such key") == ""


def _loaded_in_fresh_process(choice: str) -> str:
    env = {**os.environ, "MLX_OPENELM_BLAS": choice}
    code = "import mlx_openelm._blas as b; print(b.loaded)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_auto_loads_the_first_library_present_in_the_vendors_order():
    present = {
        lib: next((p for p in paths if p.startswith("/") and Path(p).is_file()), None)
        for lib, paths in _blas.CANDIDATES.items()
    }
    present["scipy-openblas"] = _blas.scipy_openblas_shim()
    first = next((lib for lib in _blas.auto_order(_blas.cpu_vendor()) if present[lib]), None)
    if first is None:
        pytest.skip("no BLAS library at a known path here")
    loaded = _loaded_in_fresh_process("auto")
    assert loaded == present[first], (first, loaded)


def test_pypi_openblas_through_its_forwarding_library():
    # scipy-openblas32 prefixes its symbols (scipy_cblas_sgemm); the shim gives MLX cblas_sgemm.
    shim = _blas.scipy_openblas_shim()
    if shim is None:
        pytest.skip("scipy-openblas32 or a C compiler is missing")
    assert _blas.scipy_openblas_shim() == shim  # built once, then found in the cache
    code = """
import mlx_openelm._blas as b, mlx.core as mx, numpy as np
print(b.loaded)
a, c = mx.random.normal((130, 70)), mx.random.normal((70, 90))
d = np.array(a, np.float64) @ np.array(c, np.float64)
print(np.abs(np.array(a @ c) - d).max() / np.abs(d).max())
maps = open("/proc/self/maps").read()
print("libscipy_openblas" in maps, b.bundled_blas_bound())
"""
    env = {**os.environ, "MLX_OPENELM_BLAS": "scipy-openblas"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded, err, mapped = out.stdout.split("\n")[:3]
    assert loaded == shim and float(err) < 1e-5 and mapped == "True False"


def test_none_loads_nothing():
    assert _loaded_in_fresh_process("none") == "None"


def _stderr_of(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_importing_mlx_first_says_the_blas_is_the_slow_one():
    check = "from mlx_openelm import _blas; print(_blas.bundled_blas_bound())"
    probe = subprocess.run([sys.executable, "-c", f"import mlx.core; {check}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.stdout.strip() != "True":
        pytest.skip("this mlx does not bundle the reference BLAS")
    assert "import mlx_openelm first" in _stderr_of("import mlx.core; import mlx_openelm")
    assert "import mlx_openelm first" not in _stderr_of("import mlx_openelm; import mlx.core")
