import numpy as np
import pytest
from scipy.special import expit

from icl import bayes


def test_recursive_update_matches_softmax_closed_form():
    a0, c, n = 0.2, 0.7, 12
    seq = bayes.posterior_sequence(a0, c, n)
    k = np.arange(n + 1)
    la, lb = np.log(a0) + k * np.log(c), np.log(1 - a0) + k * np.log(1 - c)
    softmax = np.exp(la) / (np.exp(la) + np.exp(lb))
    assert np.allclose(seq, softmax, rtol=1e-12)
    logit = np.log(seq / (1 - seq))
    assert np.allclose(np.diff(logit), np.log(c / (1 - c)))


def test_logistic_fit_recovers_generating_parameters():
    rng = np.random.default_rng(0)
    seen = np.arange(20)
    alpha, beta = -3.0, 0.4
    # Prompts differ in their prior odds; the ML fit on soft labels is consistent for the mean curve
    # only approximately, so use exact logistic probabilities with tiny jitter here.
    p = expit(alpha + beta * seen + rng.normal(0, 0.01, size=(200, 20)))
    fit = bayes.fit_logistic(p, seen)
    assert fit.alpha == pytest.approx(alpha, abs=0.02) and fit.beta == pytest.approx(beta, abs=0.005)
    assert fit.a0 == pytest.approx(expit(alpha), rel=0.03) and fit.c == pytest.approx(expit(beta), abs=0.002)


def test_power_law_fit_recovers_generating_parameters():
    k = np.arange(1, 21)
    p = np.exp(-(3.0 * k**-0.7))[None, :].repeat(5, axis=0)
    fit = bayes.fit_power_law(p, k)
    assert np.exp(fit.log_a) == pytest.approx(3.0, rel=1e-3) and fit.b == pytest.approx(0.7, abs=1e-3)
    assert bayes.pooled_surprisal_rmse(p, fit.surprisal(k)) < 1e-3


def test_held_out_comparison_prefers_the_true_model():
    """Data from the two-hypothesis model: it must beat the power law on held-out examples."""
    from icl.experiments.bayes_fit import analyse

    seen = np.arange(20)
    p = expit(-5.0 + 0.6 * seen)[None, :].repeat(30, axis=0)
    fit, curves = analyse(-np.log(p), n_boot=20, seed=0)
    assert fit["held_out"]["logistic_rmse"] < 0.01 < fit["held_out"]["power_rmse"]
    assert fit["c"] == pytest.approx(expit(0.6), abs=1e-3)
    assert fit["c_ci"][0] <= fit["c"] <= fit["c_ci"][1]


def test_ideal_affine_learner_by_hand():
    """Two rules and 'no rule' on answers 0..9: the first answer is paid by hand-computed odds, a rule
    is pinned once it alone fits, and an answer no rule gives costs log 10 from then on."""
    from icl.bayes import ideal_affine_surprisal

    xs = np.array([[1, 2, 3], [1, 2, 3]])
    ys = np.array([[2, 3, 4], [2, 7, 5]])  # y = x + 1, then a prompt that leaves the rules at once
    s = ideal_affine_surprisal(xs, ys, slopes=[1, 2], intercepts=[0, 1], y_max=9, p_rule=0.5)
    # x=1, y=2: rules (1,1) and (2,0) give 2, so P = 2 * 0.5/4 + 0.5/10
    assert np.isclose(s[0, 0], -np.log(2 * 0.125 + 0.05))
    # x=2: (1,1) says 3, (2,0) says 4; weights 0.125 each, no-rule 0.5/10
    z = 0.25 + 0.05
    assert np.isclose(s[0, 1], -np.log((0.125 + 0.005) / z))
    assert np.isclose(s[0, 2], -np.log((0.125 + 0.0005) / 0.13))  # pinned: only 'no rule' is left beside it
    assert np.isclose(s[1, 1], -np.log((0.005) / z))
    assert np.isclose(s[1, 2], np.log(10))  # no rule left: uniform over 0..9
