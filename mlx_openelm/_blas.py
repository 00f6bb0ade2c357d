"""Point MLX's Linux CPU back end at an optimised BLAS.

The `mlx[cpu]` wheel bundles the reference (netlib) BLAS, far slower than an optimised one
(docs/performance.md, "Linux: the BLAS"). Loading a library that exports `cblas_*` with RTLD_GLOBAL
before `mlx.core` is imported makes MLX bind to it. This must run before any `import mlx.core`, so
`mlx_openelm/__init__.py` calls it first.

MLX_OPENELM_BLAS picks: `auto` (the default, below), `mkl`, `openblas`, `blis`, `none`, or a path
to a shared library. `auto` tries MKL, then OpenBLAS, then BLIS, except on AMD CPUs, where it tries
OpenBLAS first. MKL comes from PyPI with this package on x86-64 Linux, so no system package is
needed, and on Intel it ran the prefill products twice as fast as OpenBLAS. MKL picks its code
path by CPU vendor, and AMD gets a generic one: there, Debian's OpenBLAS ran 270M prefill ~1.4x
faster (docs/performance.md). Decode does not care which one is loaded when the CPU kernels
(`kernels/`) are on, since they run the one-row products. The OpenMP build of OpenBLAS comes
first: its idle threads spin only as long as `GOMP_SPINCOUNT` says (set below).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

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
AUTO = ("mkl", "openblas", "blis")
AUTO_AMD = ("openblas", "mkl", "blis")
# Each library reads its own variable; a launcher that shares cores between processes sets them all.
THREAD_VARS = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS")

# What was loaded, for reports: a library path, or None.
loaded: str | None = None


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap every supported BLAS at `threads` threads."""
    return {name: str(threads) for name in THREAD_VARS}


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or "" where unknown."""
    return cpuinfo("vendor_id")


def auto_order(vendor: str) -> tuple[str, ...]:
    """The libraries `auto` tries, fastest first on this vendor's CPUs (docs/performance.md)."""
    return AUTO_AMD if vendor == "AuthenticAMD" else AUTO


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
    fast = ("libmkl_rt", "libopenblas", "libblis")
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
        names = [name for lib in auto_order(cpu_vendor()) for name in CANDIDATES[lib]]
    else:
        names = CANDIDATES.get(choice, [choice])
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
