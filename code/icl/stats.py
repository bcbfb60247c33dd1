"""Small statistics helpers shared by experiments: bootstrap intervals over prompts."""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 with a percentile-bootstrap interval, resampling rows (prompts).

    ``values``: [n_prompts, ...]. Returns (mean, low, high), each of shape ``values.shape[1:]``.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n < 2:
        raise ValueError("a bootstrap interval needs at least two prompts")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return values.mean(axis=0), low, high


def first_at_least(values: np.ndarray, threshold: float) -> int | None:
    """Index of the first entry of a 1-d curve that reaches ``threshold`` (None if none does): the
    "first layer where X works" of the logit-lens, patching and ablation chapters."""
    hits = np.nonzero(np.asarray(values) >= threshold)[0]
    return int(hits[0]) if len(hits) else None
