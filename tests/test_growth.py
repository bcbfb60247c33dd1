"""Linear against saturating growth: curves generated from known parameters are recognised."""

import numpy as np
import pytest

from icl import growth


K = np.arange(21)


def _noisy(curve: np.ndarray, n: int = 40, sd: float = 1.0, seed: int = 0) -> np.ndarray:
    return curve + np.random.default_rng(seed).normal(0, sd, (n, len(curve)))


def test_a_straight_line_is_called_linear_and_its_slope_recovered():
    out = growth.compare_shapes(K, _noisy(2.0 + 0.5 * K), n_boot=200)
    assert growth.shape_verdict(out["delta_bic"][0]) == "linear"
    b, lo, hi = out["linear"]["b"]
    assert lo <= 0.5 <= hi and abs(b - 0.5) < 0.05
    assert out["increment_ratio"][1] < 1.0 < out["increment_ratio"][2]


def test_a_saturating_curve_is_called_saturating_and_its_constants_recovered():
    out = growth.compare_shapes(K, _noisy(1.0 + 4.0 * (1 - np.exp(-K / 3.0))), n_boot=200)
    assert growth.shape_verdict(out["delta_bic"][0]) == "saturating"
    assert out["delta_bic"][1] > 6
    tau, lo, hi = out["saturating"]["tau"]
    assert lo <= 3.0 <= hi and abs(tau - 3.0) < 0.8
    assert abs(out["saturating"]["c"][0] - 4.0) < 0.4
    assert out["increment_ratio"][2] < 0.5  # later examples add much less than earlier ones


def test_exact_fits_and_the_line_is_the_long_tau_limit():
    lin = growth.fit_linear(K, 3.0 - 0.25 * K)
    assert lin.chi2 < 1e-18 and np.isclose(lin.params["b"], -0.25)
    sat = growth.fit_saturating(K, growth.saturating(K, 1.0, 2.0, 5.0))
    assert sat.chi2 < 1e-3 and np.isclose(sat.params["tau"], 5.0, rtol=0.05)
    # a straight line is fitted by the saturating family too (tau far beyond the range of k)
    assert growth.fit_saturating(K, 1.0 + 0.1 * K).chi2 < 1e-3


def test_verdict_thresholds_and_bad_input():
    assert growth.shape_verdict(10.0) == "saturating"
    assert growth.shape_verdict(0.0) == "linear"
    assert growth.shape_verdict(4.0) == "undecided"
    with pytest.raises(ValueError):
        growth.compare_shapes(K[:3], np.zeros((5, 3)))


def test_a_flat_first_half_gives_no_increment_ratio_and_stays_storable():
    """On a model that has not learnt anything (a random one) the curve can be flat: the increment
    ratio is undefined there, and the result must still be valid JSON (the cache refuses NaN)."""
    import json

    k = np.arange(9)
    values = np.tile(np.r_[np.zeros(5), np.arange(1, 5)], (6, 1)).astype(float)
    got = growth.compare_shapes(k, values, n_boot=30)
    assert got["increment_ratio"][0] is None
    json.dumps(got, allow_nan=False)
