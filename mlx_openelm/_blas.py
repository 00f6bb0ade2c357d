"""Point MLX's Linux CPU back end at an optimised BLAS.

The `mlx[cpu]` wheel bundles the reference (netlib) BLAS, far slower than an optimised one
(docs/performance.md, "Linux: the BLAS"). Loading a library that exports `cblas_*` with RTLD_GLOBAL
before `mlx.core` is imported makes MLX bind to it. This must run before any `import mlx.core`, so
`mlx_openelm/__init__.py` calls it first.

MLX_OPENELM_BLAS picks: `auto` (the default, below), `mkl`, `openblas`, `scipy-openblas`, `blis`,
`none`, or a path to a shared library. `auto` tries MKL, then OpenBLAS (the system's, then PyPI's),
then BLIS, except on AMD CPUs, where it tries both OpenBLAS first, then MKL. MKL comes from PyPI
with this package on x86-64 Linux, so no system package is needed, and on Intel it ran the prefill
products twice as fast as OpenBLAS. MKL picks its code path by CPU vendor, and AMD gets a generic
one: there, Debian's OpenBLAS ran the 270M's prefill ~1.3x faster, and PyPI's (`scipy-openblas32`,
which pip installs with this package) ~1.2x (docs/performance.md). PyPI's names its symbols
`scipy_cblas_*`, which MLX does not bind to: a forwarding library of three functions (`SHIM`) is
compiled for it once. Decode does not care which one is loaded when the CPU kernels (`kernels/`)
are on, since they run the one-row products. The OpenMP build of OpenBLAS comes first: its idle
threads spin only as long as `GOMP_SPINCOUNT` says (set below).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._cpuinfo import cpuinfo

log = logging.getLogger(__name__)

CANDIDATES = {
    # Intel's MKL from PyPI: libmkl_rt lands in the environment's lib folder, off the loader's path.
    "mkl": [
        os.path.join(sys.prefix, "lib", "libmkl_rt.so.3"),
        os.path.join(sys.prefix, "lib", "libmkl_rt.so.2"),
        "libmkl_rt.so.3",
        "libmkl_rt.so.2",
    ],
    "openblas": [
        "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "libopenblas.so.0",  # other distributions: whatever the loader finds
    ],
    "blis": [
        "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
        "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
        "libblis.so.4",
    ],
}
AUTO = ("mkl", "openblas", "scipy-openblas", "blis")
AUTO_AMD = ("openblas", "scipy-openblas", "mkl", "blis")

# The cblas functions that MLX's CPU back end calls (`nm -D libmlx.so`), forwarded to PyPI's
# OpenBLAS. Its LAPACK calls stay with MLX's bundled LAPACK.
SHIM = """
typedef int I;
#define GEMM(T, S, name)                                                                          \\
  extern void scipy_##name(I, I, I, I, I, I, S, const T*, I, const T*, I, S, T*, I);              \\
  void name(I o, I ta, I tb, I m, I n, I k, S al, const T* a, I lda, const T* b, I ldb, S be,     \\
            T* c, I ldc) { scipy_##name(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
GEMM(float, float, cblas_sgemm)
GEMM(double, double, cblas_dgemm)
GEMM(void, const void*, cblas_cgemm)
"""
# Each library reads its own variable; a launcher that shares cores between processes sets them all.
THREAD_VARS = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS")

# What was loaded, for reports: a library path, or None.
loaded: str | None = None


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap every supported BLAS at `threads` threads."""
    return {name: str(threads) for name in THREAD_VARS}


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-openelm"


def scipy_openblas_shim() -> str | None:
    """The forwarding library for PyPI's scipy-openblas32, compiled on first use; None without
    the package or a C compiler (then `auto` goes on to the next library)."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    target = lib_dir / "libscipy_openblas.so"
    compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    cc = next((c for c in compilers if c and shutil.which(c)), None)
    if not target.is_file() or cc is None:
        return None
    key = hashlib.sha256(f"{SHIM}{target}{target.stat().st_mtime_ns}{cc}".encode()).hexdigest()
    out = user_cache_dir() / "blas" / f"libcblas-scipy-openblas-{key[:16]}.so"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        built = Path(tmp) / out.name
        cmd = [cc, "-O2", "-shared", "-fPIC", "-x", "c", "-", "-o", str(built), f"-L{lib_dir}",
               "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"]  # fmt: skip
        result = subprocess.run(cmd, input=SHIM, capture_output=True, text=True)
        if result.returncode != 0:
            log.debug("building the scipy-openblas32 shim failed: %s", result.stderr)
            return None
        os.replace(built, out)  # whole or not at all, also with two processes building at once
    return str(out)


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or "" where unknown."""
    return cpuinfo("vendor_id")


def auto_order(vendor: str) -> tuple[str, ...]:
    """The libraries `auto` tries, fastest first on this vendor's CPUs (docs/performance.md)."""
    return AUTO_AMD if vendor == "AuthenticAMD" else AUTO


def _paths(lib: str) -> list[str]:
    if lib == "scipy-openblas":
        shim = scipy_openblas_shim()
        return [shim] if shim else []
    return CANDIDATES[lib]


def _load_gomp() -> bool:
    try:
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def bundled_blas_bound() -> bool:
    """Whether MLX's CPU matmuls run on the reference BLAS that its wheel bundles: it is mapped
    (`mlx_cpu.libs/libblas-*`) and none of the libraries above is, to take its symbols first."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            maps = f.read()
    except OSError:
        return False
    fast = ("libmkl_rt", "libopenblas", "libscipy_openblas", "libblis")
    return "mlx_cpu.libs/libblas" in maps and not any(name in maps for name in fast)


def _warn_if_too_late() -> None:
    """A script that imports mlx.core before mlx_openelm leaves MLX on its reference BLAS, and a
    prefill then runs 10-100x slower with nothing to say why: say it, once."""
    global _warned
    if _warned or os.environ.get("MLX_OPENELM_BLAS") == "none" or not bundled_blas_bound():
        return
    _warned = True
    log.warning(
        "mlx-openelm: mlx.core was imported before mlx_openelm, so MLX's CPU matmuls run on the "
        "slow reference BLAS its wheel bundles; import mlx_openelm first"
    )


_warned = False


def load_fast_blas() -> str | None:
    global loaded
    if not sys.platform.startswith("linux"):
        return loaded
    if "mlx.core" in sys.modules:
        _warn_if_too_late()
        return loaded
    # GNU OpenMP (OpenBLAS's OpenMP build, and MKL below) spins ~300k rounds between parallel
    # regions by default: on a shared 2-core machine those spinning threads took the cores from
    # the ones with work (docs/kernels.md, "Threads").
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    choice = os.environ.get("MLX_OPENELM_BLAS", "auto")
    if choice == "none":
        return None
    if choice == "auto":
        # lazily: the shim is looked for (and built) only when the libraries before it are absent
        names = (name for lib in auto_order(cpu_vendor()) for name in _paths(lib))
    else:
        names = _paths(choice) if choice in (*CANDIDATES, "scipy-openblas") else [choice]
    for name in names:
        if "blis" in name:
            # BLIS runs single-threaded unless told otherwise.
            os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
        if "mkl" in name and _load_gomp():
            # One OpenMP runtime for MKL and our kernels (mlx_openelm/kernels, GNU OpenMP): with
            # MKL's own (Intel's), its idle threads spin 200 ms after each call and starve ours.
            os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None
