"""Machine facts for benchmark reports: the CPU, package versions, memory bandwidth, and the
median timer the profiler shares."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from mlx_openelm._cpuinfo import cpuinfo


def cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def median_time(fn: Callable[[], Any], trials: int) -> float:
    """Median seconds of `trials` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(
    nbytes: int = 2**30, trials: int = 5, on_gpu: bool = False
) -> dict[str, float]:
    """Memory read bandwidth (bytes/s) by streaming kernels over an `nbytes` fp32 array.

    On the CPU the roofline uses the best of several kernels (a bound must not be set by a slow
    one); on a GPU, MLX's own sum on the device.
    """
    import mlx.core as mx  # noqa: I001

    import mlx_openelm  # noqa: F401

    n = nbytes // 4
    out = {}
    x = mx.ones((n,), dtype=mx.float32)
    mx.eval(x)
    out["mlx sum"] = nbytes / median_time(lambda: mx.eval(x.sum()), trials)
    x = None  # free it before numpy allocates its own
    if not on_gpu:
        import numpy as np

        a = np.ones((1024, n // 1024), dtype=np.float32)
        v = np.ones(n // 1024, dtype=np.float32)
        out["numpy sum"] = nbytes / median_time(lambda: a.sum(), trials)
        out["numpy gemv"] = nbytes / median_time(lambda: a @ v, trials)  # multi-threaded BLAS
    return out


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import mlx_openelm._blas as blas

    versions = {}
    for pkg in ("mlx", "mlx-lm", "torch", "numpy", "mlx-openelm"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx_blas": blas.loaded,
        "versions": versions,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info
