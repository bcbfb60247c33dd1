"""The slt_free_energy experiment at small settings: known slopes, exact expansions, determinism."""

import dataclasses

import numpy as np
import pytest

from icl import experiments
from icl.experiments import slt_free_energy as fe


@pytest.fixture(scope="module")
def small():
    params = experiments.make_params(fe, {"n_points": "13", "data_log10_n": "2,3,4,5", "n_datasets": "6",
                                          "n_boot": "50"})
    return params, fe.compute(params, None)


def test_known_learning_coefficients_are_recovered(small):
    _, (arrays, data) = small
    M = data["models"]
    assert M["regular"]["fits"]["wide"]["plain"]["lam"] == pytest.approx(1.0, abs=1e-9)
    assert M["a2+b4"]["fits"]["wide"]["plain"]["lam"] == pytest.approx(0.75, abs=1e-9)
    assert M["a2b2"]["fits"]["wide"]["plain"]["lam"] < 0.46                      # the biased plain fit
    assert M["a2b2"]["fits"]["wide"]["loglog_fixed_invlog"]["lam"] == pytest.approx(0.5, abs=0.01)
    for name in fe.MODELS:
        assert M[name]["max_rel_err_asymptotic_n_ge_1e3"] < 1e-10
        assert np.allclose(arrays[f"{name}.F"][-4:], arrays[f"{name}.F_asymptotic"][-4:], atol=1e-10)
    # empirical free energy with data: the regular model's slope is about 1
    lam, lo, hi = M["data.regular"]["fit_loglog_fixed"]
    assert 0.8 < lam < 1.2 and lo <= lam <= hi
    assert arrays["data.a2b2.F"].shape == (4, 6)


def test_same_seed_same_result(small):
    params, (arrays, data) = small
    arrays2, data2 = fe.compute(params, None)
    assert data == data2
    for k in arrays:
        assert np.array_equal(arrays[k], arrays2[k]), k
    other = dataclasses.replace(params, seed=1)
    a3, _ = fe.compute(other, None)
    assert not np.array_equal(a3["data.a2b2.F"], arrays["data.a2b2.F"])


def test_params_are_validated():
    with pytest.raises(ValueError):
        experiments.make_params(fe, {"fit_log10_n_min": "9"})
    assert fe.content_digest(fe.Params()) == fe.content_digest(fe.Params())
