"""Evaluation: batched log-likelihood scoring, sliding-window perplexity, and an
lm-evaluation-harness backend (`mlx-openelm`, in `lm.py`; needs `pip install mlx-openelm[eval]`).
"""

from .scoring import ScoreStats, rolling_windows, score, score_rolling

__all__ = ["ScoreStats", "rolling_windows", "score", "score_rolling"]
