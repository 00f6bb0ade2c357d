"""Training: data, the one training loop, LoRA/DoRA adapters, export to Hugging Face format."""

from .data import load_data_folder, read_jsonl, tokenize
from .trainer import TrainingArgs, evaluate, masked_loss, train

__all__ = [
    "TrainingArgs",
    "evaluate",
    "load_data_folder",
    "masked_loss",
    "read_jsonl",
    "tokenize",
    "train",
]
