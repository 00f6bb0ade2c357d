"""Run, fine-tune and benchmark Apple's OpenELM models with MLX."""

from ._blas import load_fast_blas

load_fast_blas()  # before anything imports mlx.core

__version__ = "0.1.0"
__all__ = [
    "Model", "ModelArgs", "generate", "load", "preset", "save_model", "stream_generate"
]  # fmt: skip

# Imported on first use, so `mlx_openelm.bench.reference` (torch only) works where MLX is absent.
_LAZY = {
    "Model": "model",
    "ModelArgs": "config",
    "preset": "config",
    "load": "loading",
    "save_model": "loading",
    "generate": "generation",
    "stream_generate": "generation",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
