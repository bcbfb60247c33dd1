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
    means = resampled_means(values, idx)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return values.mean(axis=0), low, high


def cluster_bootstrap_mean_ci(values: np.ndarray, clusters: np.ndarray, n_boot: int = 2000,
                              level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 with a percentile-bootstrap interval that resamples whole clusters.

    Rows that share a cluster (windows cut from one document, examples of one prompt) are not
    independent; resampling rows as if they were gives intervals that are too narrow. Here the clusters
    are drawn with replacement and each resample's statistic is the mean over all rows of the drawn
    clusters (total over rows / number of rows). ``values`` ``[n, ...]``, ``clusters`` ``[n]`` labels.
    Returns (mean, low, high), each of shape ``values.shape[1:]``.
    """
    values = np.asarray(values, dtype=np.float64)
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    if len(labels) < 2:
        raise ValueError("a cluster bootstrap needs at least two clusters")
    sums = np.zeros((len(labels),) + values.shape[1:])
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(labels)).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    shape = (n_boot,) + (1,) * (values.ndim - 1)
    means = resampled_means(sums, idx) / counts[idx].mean(axis=1).reshape(shape)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return values.mean(axis=0), low, high


def store_mean_ci(arrays: dict[str, np.ndarray], prefix: str, values: np.ndarray, n_boot: int = 2000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`bootstrap_mean_ci` of ``values``, stored as ``arrays[prefix + ".mean" / ".lo" / ".hi"]`` (the
    layout every chapter's bands read) and returned."""
    mean, lo, hi = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
    arrays[f"{prefix}.mean"], arrays[f"{prefix}.lo"], arrays[f"{prefix}.hi"] = mean, lo, hi
    return mean, lo, hi


CHUNK_ELEMENTS = 1 << 24  # resampled values held at once (128 MiB of float64)


def resampled_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[idx].mean(axis=1)`` for bootstrap indices ``idx`` ``[n_boot, n]``, computed a block of
    resamples at a time so that memory stays bounded however large ``n_boot`` and ``values`` are. Each
    resample's mean is computed exactly as in one block (blocks have at least two rows)."""
    per_row = idx.shape[1] * max(1, int(np.prod(values.shape[1:])))
    rows = max(2, CHUNK_ELEMENTS // max(1, per_row))
    n_boot = idx.shape[0]
    if rows >= n_boot:
        return values[idx].mean(axis=1)
    starts = list(range(0, n_boot, rows))
    if n_boot - starts[-1] < 2:
        starts.pop()  # no block of one row: the last block takes it
    ends = starts[1:] + [n_boot]
    return np.concatenate([values[idx[a:b]].mean(axis=1) for a, b in zip(starts, ends)])


def first_at_least(values: np.ndarray, threshold: float) -> int | None:
    """Index of the first entry of a 1-d curve that reaches ``threshold`` (None if none does): the
    "first layer where X works" of the logit-lens, patching and ablation chapters."""
    hits = np.nonzero(np.asarray(values) >= threshold)[0]
    return int(hits[0]) if len(hits) else None


def first_at_least_range(values: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[np.ndarray, list[int | None]]:
    """The bootstrap distribution of :func:`first_at_least` applied to the mean curve of ``values``
    ``[n, L]`` (resampling the ``n`` rows), and its central ``level`` range. Returns ``[L + 1]`` shares
    (the last one: resamples in which no entry reaches ``threshold``) and ``[lo, hi]``, None standing
    for "none reaches it". A derived quantity such as "the first layer where X" gets its interval so."""
    values = np.asarray(values, dtype=np.float64)
    n, L = values.shape
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    reached = resampled_means(values, idx) >= threshold  # [n_boot, L]
    first = np.where(reached.any(1), reached.argmax(1), L)
    dist = np.bincount(first, minlength=L + 1) / n_boot
    cum = np.cumsum(dist)
    lo, hi = int(np.searchsorted(cum, (1 - level) / 2)), int(np.searchsorted(cum, 1 - (1 - level) / 2))
    return dist, [None if lo >= L else lo, None if hi >= L else hi]


def benjamini_hochberg(p_values: np.ndarray, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg control of the false discovery rate at ``q`` over a family of tests.

    ``p_values`` of any shape. Returns (rejected, adjusted): a bool array, True where the null is
    rejected, and the BH-adjusted p-values (``min_{j >= i} p_(j) m / j``, capped at 1), both of the
    input's shape. A test is rejected exactly when its adjusted p-value is at most ``q``."""
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.ravel()
    m = flat.size
    if m == 0:
        return np.zeros(p.shape, dtype=bool), p.copy()
    if np.any(~np.isfinite(flat)) or np.any(flat < 0) or np.any(flat > 1):
        raise ValueError("p-values must be finite and in [0, 1]")
    order = np.argsort(flat, kind="stable")
    scaled = flat[order] * m / np.arange(1, m + 1)
    adjusted_sorted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return (adjusted <= q).reshape(p.shape), adjusted.reshape(p.shape)
