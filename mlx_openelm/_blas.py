"""Point MLX's Linux CPU back end at an optimised BLAS.

The `mlx[cpu]` wheel bundles the reference (netlib) BLAS: a 2048^2 fp32 matmul runs at ~5 GFLOP/s
on a 2-core x86 VM, ~180 GFLOP/s with OpenBLAS. Loading a library that exports `cblas_*` with
RTLD_GLOBAL before `mlx.core` is imported makes MLX bind to it. This must run before any
`import mlx.core`, so `mlx_openelm/__init__.py` calls it first.

MLX_OPENELM_BLAS picks: `auto` (default: OpenBLAS, else BLIS), `openblas`, `blis`, `none`, or a
path to a shared library. Measured on the 2-core VM: OpenBLAS is ~1.6x faster for big matmuls
(prefill, training), BLIS ~1.3x faster for one-row products (decode).
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = {
    "openblas": [
        "libopenblas.so.0",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ],
    "blis": [
        "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
        "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
        "libblis.so.4",
    ],
}
INSTALL_HINT = (
    "apt-get install libopenblas0-pthread (Debian/Ubuntu) makes MLX's CPU matmuls ~30x faster"
)

# What was loaded, for reports: a library path, or None.
loaded: str | None = None


def load_fast_blas() -> str | None:
    global loaded
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    choice = os.environ.get("MLX_OPENELM_BLAS", "auto")
    if choice == "none":
        return None
    names = {"auto": CANDIDATES["openblas"] + CANDIDATES["blis"]}.get(choice) or CANDIDATES.get(
        choice, [choice]
    )
    for name in names:
        if "blis" in name:
            # BLIS runs single-threaded unless told otherwise.
            os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None
