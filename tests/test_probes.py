"""Ridge probes find planted linear structure and only chance in shuffled labels."""

import numpy as np

from icl.probes import ridge_probe_accuracy


def test_a_planted_class_direction_is_found_and_shuffled_labels_are_at_chance():
    rng = np.random.default_rng(0)
    n, d = 600, 40
    labels = rng.integers(0, 5, n)
    means = rng.normal(0, 1, (5, d)) * 1.5
    X = means[labels] + rng.normal(0, 1, (n, d))
    groups = np.repeat(np.arange(n // 10), 10)
    shuffled = labels[rng.permutation(n)]
    acc = ridge_probe_accuracy(X, np.stack([labels, shuffled, labels % 2], 1), groups, n_folds=4, lam=0.1)
    assert acc[0] > 0.9
    assert abs(acc[1] - 0.2) < 0.08
    assert acc[2] > 0.8  # a coarser property of the same classes


def test_folds_keep_groups_together():
    # every sample of a group carries the group's own random label: a probe that memorised groups would
    # score, but held-out groups are never seen in training, so it cannot
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(60), 8)
    group_label = rng.integers(0, 4, 60)
    X = rng.normal(0, 1, (60, 30))[groups] + 0.01 * rng.normal(0, 1, (480, 30))
    acc = ridge_probe_accuracy(X, group_label[groups], groups, n_folds=4, lam=0.1)
    assert acc[0] < 0.45
