"""Compile the CPU kernels on first use into a cache folder.

Why at first use, not at `pip install`: the package stays pure Python (one wheel for every
platform, and a Mac installs nothing to build), the kernels are built with `-march=native` for the
CPU they will run on, and the nanobind they are built with is checked against the mlx that is
installed *now*, so upgrading mlx rebuilds them instead of loading an incompatible binary. The
cost is one compile (docs/kernels.md), then a cached load. It needs a C++ compiler,
which MLX's own CPU JIT (`mx.compile`) already needs on Linux.

The cache key covers the sources, the flags, the compiler, the CPU's features and the versions
of Python, mlx and nanobind; builds are atomic (temporary folder, then rename) and serialised with
a file lock, so parallel processes (tests, distributed ranks) build once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from .._blas import user_cache_dir
from .._cpuinfo import cpuinfo

log = logging.getLogger(__name__)

MODULE = "_openelm_kernels"
SOURCES = ["linear.cpp", "quantized_linear.cpp", "quantized_matmul.cpp", "norm.cpp",
           "attention.cpp", "attention_backward.cpp", "kv_cache.cpp", "loss.cpp",
           "bindings.cpp"]  # fmt: skip
CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-std=c++20", "-O3", "-fPIC", "-fvisibility=hidden", "-march=native", "-fopenmp",
         "-DNDEBUG", "-DNB_DOMAIN=mlx", "-DNB_COMPACT_ASSERTIONS"]  # fmt: skip


def _flags() -> list[str]:
    """FLAGS, then any in MLX_OPENELM_KERNEL_FLAGS: `-mno-avx2 -mno-fma` builds the portable
    path that a CPU without AVX2 runs (the tests check it that way on x86)."""
    return FLAGS + os.environ.get("MLX_OPENELM_KERNEL_FLAGS", "").split()


class BuildError(RuntimeError):
    """The kernels could not be built here; the message says why in one line."""


def cache_root() -> Path:
    if os.environ.get("MLX_OPENELM_KERNEL_CACHE"):
        return Path(os.environ["MLX_OPENELM_KERNEL_CACHE"])
    return user_cache_dir() / "kernels"


def _compiler() -> str:
    for name in [os.environ.get("CXX"), "g++", "c++", "clang++"]:
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (install g++, or set CXX)")


def _cpu_features() -> str:
    """The CPU's instruction-set flags, space-separated: builds use `-march=native`."""
    return cpuinfo("flags", "Features")


def _paths() -> tuple[Path, Path]:
    """mlx's package folder (headers, libmlx) and nanobind's."""
    try:
        import nanobind
    except ImportError:
        raise BuildError("nanobind is not installed (pip install 'nanobind>=3,<4')") from None
    import mlx.core as mx

    mlx_dir = Path(mx.__file__).parent
    if not (mlx_dir / "include" / "mlx" / "primitives.h").is_file():
        raise BuildError(f"mlx at {mlx_dir} ships no C++ headers")
    return mlx_dir, Path(nanobind.__file__).parent


def _key(cxx: str, mlx_dir: Path, nb_dir: Path) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in [
        version,
        _cpu_features(),
        " ".join(_flags()),
        sys.version,
        str(mlx_dir),
        importlib.metadata.version("mlx"),
        importlib.metadata.version("nanobind"),
    ]:
        h.update(part.encode() + b"\0")
    for src in sorted(CSRC.iterdir()):
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:16]


def _run_all(commands: list[list[str]]) -> None:
    """Run the compile commands in parallel; raise BuildError with the first error line."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]  # fmt: skip
    failed = []
    for cmd, proc in zip(commands, procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append((cmd, out.strip() or f"{cmd[0]} exited with status {proc.returncode}"))
    if failed:
        cmd, out = failed[0]
        first = next((ln for ln in out.splitlines() if "error" in ln), out[-300:])
        target = Path(cmd[cmd.index("-o") + 1]).name
        raise BuildError(f"compiling {target} failed: {first.strip()}")


def target_path() -> Path:
    """Where this CPU, compiler, mlx and these sources' build lives in the cache (built or not)."""
    folder = cache_root() / _key(_compiler(), *_paths())
    return folder / (MODULE + importlib.machinery.EXTENSION_SUFFIXES[0])


def build(verbose: bool = True) -> Path:
    """The path of the compiled extension module, building it first if the cache lacks it."""
    cxx = _compiler()
    mlx_dir, nb_dir = _paths()
    target = target_path()
    folder = target.parent
    if target.is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # another process built it while we waited
            return target
        if verbose:
            log.info("mlx-openelm: building the CPU kernels (once, about a minute)...")
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
            includes = [
                f"-I{mlx_dir / 'include'}",
                f"-I{nb_dir / 'include'}",
                f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
                f"-I{sysconfig.get_paths()['include']}",
                f"-I{CSRC}",
            ]
            objects, commands = [], []
            sources = [CSRC / s for s in SOURCES] + [nb_dir / "src" / "nb_combined.cpp"]
            for src in sources:
                obj = Path(tmp) / (src.stem + ".o")
                extra = ["-fno-strict-aliasing"] if src.stem == "nb_combined" else []
                commands.append([cxx, str(src), "-c", "-o", str(obj), *_flags(), *extra, *includes])
                objects.append(str(obj))
            _run_all(commands)
            lib = mlx_dir / "lib"
            out = Path(tmp) / target.name
            _run_all([[cxx, "-shared", "-fopenmp", *objects, "-o", str(out), f"-L{lib}", "-lmlx",
                       f"-Wl,-rpath,{lib}", "-Wl,--gc-sections"]])  # fmt: skip
            staged = Path(tmp) / "module"
            staged.mkdir()
            out.rename(staged / target.name)
            if folder.exists():
                shutil.rmtree(folder)
            staged.rename(folder)
    return target
