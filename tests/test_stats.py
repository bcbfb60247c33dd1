import numpy as np
import pytest

from icl.stats import bootstrap_mean_ci


def test_interval_brackets_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=(20, 3))
    large = rng.normal(1.0, 1.0, size=(2000, 3))
    m, lo, hi = bootstrap_mean_ci(small, seed=1)
    assert np.all(lo <= m) and np.all(m <= hi)
    _, lo2, hi2 = bootstrap_mean_ci(large, seed=1)
    assert np.all(hi2 - lo2 < hi - lo)
    # For a normal mean the 95% interval half-width is about 1.96 / sqrt(n).
    assert np.allclose((hi2 - lo2) / 2, 1.96 / np.sqrt(2000), rtol=0.15)


def test_deterministic_and_needs_two_rows():
    x = np.arange(10.0)[:, None]
    assert np.array_equal(np.stack(bootstrap_mean_ci(x, seed=3)), np.stack(bootstrap_mean_ci(x, seed=3)))
    with pytest.raises(ValueError):
        bootstrap_mean_ci(np.ones((1, 4)))


def test_first_at_least():
    from icl.stats import first_at_least

    assert first_at_least(np.array([0.1, 0.4, 0.6, 0.2, 0.9]), 0.5) == 2
    assert first_at_least(np.array([0.1, 0.4]), 0.5) is None
    assert first_at_least(np.array([0.5]), 0.5) == 0


@pytest.mark.parametrize("shape", [(50,), (50, 1), (50, 7), (30, 4, 3), (3, 1)])
def test_resampled_means_in_blocks_equal_one_block(shape, monkeypatch):
    """Large bootstraps run in blocks of resamples (bounded memory); every block size gives exactly
    the values of a single block, so results do not depend on the size of the problem."""
    from icl import stats

    rng = np.random.default_rng(0)
    values = rng.normal(size=shape)
    idx = rng.integers(0, shape[0], size=(101, shape[0]))
    whole = values[idx].mean(axis=1)
    for budget in (1, 7, 300, 10**6):
        monkeypatch.setattr(stats, "CHUNK_ELEMENTS", budget)
        assert np.array_equal(stats.resampled_means(values, idx), whole), budget


def test_cluster_bootstrap_widens_for_correlated_rows():
    """Rows that are copies within a cluster carry the information of one row each: the cluster interval
    matches the row bootstrap of the cluster means, and is wider than the naive row bootstrap."""
    from icl.stats import cluster_bootstrap_mean_ci

    rng = np.random.default_rng(0)
    cluster_means = rng.normal(0.0, 1.0, size=40)
    values = np.repeat(cluster_means, 16)[:, None] + rng.normal(0, 0.01, size=(640, 1))
    clusters = np.repeat(np.arange(40), 16)
    m, lo, hi = cluster_bootstrap_mean_ci(values, clusters, seed=2)
    _, lo_rows, hi_rows = bootstrap_mean_ci(values, seed=2)
    _, lo_c, hi_c = bootstrap_mean_ci(cluster_means[:, None], seed=2)
    assert np.isclose(m[0], values.mean())
    assert (hi - lo)[0] > 3 * (hi_rows - lo_rows)[0]
    assert np.isclose((hi - lo)[0], (hi_c - lo_c)[0], rtol=0.15)
    # unequal cluster sizes: the point estimate is the mean over rows
    m2, _, _ = cluster_bootstrap_mean_ci(np.arange(5.0)[:, None], np.array([0, 0, 0, 1, 1]))
    assert m2[0] == 2.0
    with pytest.raises(ValueError):
        cluster_bootstrap_mean_ci(np.ones((3, 1)), np.zeros(3))


def test_benjamini_hochberg_matches_the_step_up_rule():
    from icl.stats import benjamini_hochberg

    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.2])
    rejected, adjusted = benjamini_hochberg(p, q=0.05)
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.2, 0.5; thresholds i/6 * 0.05: .0083 .0167 .025 .033 .042 .05
    # largest i with p_(i) <= threshold is i = 2, so only 0.005 and 0.01 are rejected
    assert rejected.tolist() == [True, False, False, True, False, False]
    assert np.allclose(adjusted, [0.03, 0.06, 0.06, 0.03, 0.5, 0.24])
    r2, a2 = benjamini_hochberg(p.reshape(2, 3), q=0.05)
    assert r2.shape == (2, 3) and np.allclose(a2.ravel(), adjusted)
    assert benjamini_hochberg(np.ones(4))[0].sum() == 0
    with pytest.raises(ValueError):
        benjamini_hochberg(np.array([0.1, 1.5]))


def test_benjamini_hochberg_controls_false_discoveries_under_the_null():
    from icl.stats import benjamini_hochberg

    rng = np.random.default_rng(0)
    false = [benjamini_hochberg(rng.uniform(size=200), 0.05)[0].any() for _ in range(200)]
    assert np.mean(false) < 0.1  # under the global null BH controls the family-wise rate at q


def test_first_at_least_range_brackets_a_planted_crossing():
    from icl.stats import first_at_least_range

    rng = np.random.default_rng(0)
    curve = np.clip(np.linspace(-0.2, 1.2, 15), 0, 1)  # 0.1 apart: the mean crosses 0.5 at index 7
    values = (rng.random((400, 15)) < curve).astype(float)
    dist, (lo, hi) = first_at_least_range(values, 0.5, n_boot=500, seed=1)
    assert dist.sum() == pytest.approx(1.0) and 6 <= lo <= 7 <= hi <= 8
    never = first_at_least_range(np.zeros((20, 4)), 0.5, n_boot=50)
    assert never[1] == [None, None] and never[0][-1] == 1.0
