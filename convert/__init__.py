"""PyTorch OpenELM checkpoints (Hugging Face or CoreNet) -> MLX model folders, without torch."""

from .pipeline import convert, read_source

__all__ = ["convert", "read_source"]
