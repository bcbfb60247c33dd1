"""Linear probes: is a property of the answer linearly readable from the residual stream?

A probe here is a ridge-regression classifier: one-hot labels regressed on standardised activations
``X`` ``[n, d]`` in closed form, ``W = (X^T X + lam I)^{-1} X^T Y``, the predicted class the argmax of
``X W``. It needs no iterative optimiser, so every layer, every target and every fold costs one
``d x d`` solve, and several targets share it (their one-hot columns are stacked).

Accuracy is measured on held-out folds grouped by prompt (samples from one prompt are never split
between training and test, so a probe cannot score by recognising a prompt). Its baseline is the
same probe trained on *shuffled labels* (one seeded permutation of the labels over samples): what a
probe of this capacity reaches on these activations when the labels carry no information. Chance
(one over the number of classes) is the floor below both.
"""

from __future__ import annotations

import numpy as np


def ridge_probe_accuracy(X: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_folds: int = 4,
                         lam: float = 1.0) -> np.ndarray:
    """Held-out accuracy of a ridge classifier for each column of ``labels`` ``[n, m]`` (integers).

    ``X`` ``[n, d]``; ``groups`` ``[n]``: samples with one group value are kept in one fold (fold =
    group mod ``n_folds`` over the sorted distinct groups). Features are standardised on the training
    fold; the ridge is ``lam`` times the number of training samples (the mean eigenvalue of ``X^T X``
    for standardised features). Returns ``[m]``."""
    X = np.asarray(X, np.float64)
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    n, d = X.shape
    distinct = np.unique(groups)
    fold_of = {g: i % n_folds for i, g in enumerate(distinct)}
    fold = np.array([fold_of[g] for g in groups])
    classes = [np.unique(labels[:, j]) for j in range(labels.shape[1])]
    blocks = []
    for j, cls in enumerate(classes):
        blocks.append((labels[:, j][:, None] == cls[None]).astype(np.float64))
    Y = np.concatenate(blocks, 1)  # [n, sum of class counts]
    edges = np.cumsum([0] + [len(c) for c in classes])
    correct = np.zeros(labels.shape[1])
    for f in range(n_folds):
        test = fold == f
        train = ~test
        if not test.any() or train.sum() < 2:
            continue
        mu = X[train].mean(0)
        sd = X[train].std(0) + 1e-6
        Xtr, Xte = (X[train] - mu) / sd, (X[test] - mu) / sd
        gram = Xtr.T @ Xtr
        ridge = lam * len(Xtr)  # the mean eigenvalue of X^T X for standardised features
        prior = Y[train].mean(0)
        W = np.linalg.solve(gram + ridge * np.eye(d), Xtr.T @ (Y[train] - prior))
        scores = Xte @ W + prior
        for j, cls in enumerate(classes):
            pred = cls[scores[:, edges[j]:edges[j + 1]].argmax(1)]
            correct[j] += (pred == labels[test, j]).sum()
    return correct / n
