"""Run, fine-tune and benchmark Apple's OpenELM models with MLX."""

from ._blas import load_fast_blas

load_fast_blas()  # before anything imports mlx.core

from .config import ModelArgs, preset  # noqa: E402
from .loading import load, save_model  # noqa: E402
from .model import Model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "ModelArgs", "load", "preset", "save_model"]
