"""One field of Linux's /proc/cpuinfo, for the three places that pick by CPU: the BLAS (by
vendor), the kernels' build cache (by instruction-set flags) and benchmark reports (by name).

It imports nothing from MLX, since `_blas` calls it before `mlx.core` may be imported.
"""

from __future__ import annotations


def cpuinfo(*keys: str) -> str:
    """The value of the first line whose key is one of `keys` ("flags" on x86, "Features" on ARM),
    or "" where there is no such line or no /proc/cpuinfo (macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return ""
