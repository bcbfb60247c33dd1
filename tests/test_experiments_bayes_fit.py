"""bayes_fit's comparison with the ideal learner: planted evidence per example is recovered."""

import numpy as np
import pytest
from scipy.special import expit

from icl.experiments import bayes_fit


def _surprisal(alpha: float, beta: float, n_prompts: int = 40, k: int = 20, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    logit = alpha + beta * np.arange(k)[None] + noise * rng.standard_normal((n_prompts, k))
    return -np.log(expit(logit))


def test_the_ratio_is_one_for_a_model_that_is_the_ideal_learner():
    s = _surprisal(-3.0, 2.0)
    got = bayes_fit.ideal_comparison(s, s, n_boot=50, seed=0)
    assert got["ratio"] == pytest.approx(1.0) and got["beta"] == pytest.approx(2.0, rel=1e-3)


def test_planted_evidence_ratio_is_recovered_with_an_interval():
    model, ideal = _surprisal(-2.0, 0.25, noise=0.3, seed=1), _surprisal(-4.0, 5.0, noise=0.3, seed=2)
    got = bayes_fit.ideal_comparison(model, ideal, n_boot=100, seed=0)
    assert got["ratio"] == pytest.approx(20.0, rel=0.25)
    lo, hi = got["ratio_ci"]
    assert lo < got["ratio"] < hi and hi / lo < 2
