"""The slt_llc experiment at small settings: estimates near truth, sweeps present, determinism."""

import dataclasses

import numpy as np
import pytest

from icl import experiments
from icl.experiments import slt_llc


@pytest.fixture(scope="module")
def small():
    params = experiments.make_params(slt_llc, {
        "models": "linear-4,mono-1,rrr-2-2-2-2", "num_chains": "4", "num_steps": "2500", "num_burnin": "500",
        "n_datasets": "2", "sweep_models": "linear-4", "sweep_step_sizes": "1e-4,1e-3",
        "sweep_num_steps": "1000", "gamma_models": "mono-1", "gamma_values": "1,100",
        "batch_models": "linear-4", "batch_sizes": "64"})
    return params, slt_llc.compute(params, None)


def test_estimates_are_near_the_known_values(small):
    _, (arrays, data) = small
    M = data["models"]
    assert M["linear-4"]["lambda"] == 2.0 and M["linear-4"]["d"] == 4
    assert M["linear-4"]["estimate"] == pytest.approx(2.0, rel=0.15)
    assert M["linear-4"]["exact_target"] == pytest.approx(2.0, rel=0.01)
    assert M["mono-1"]["estimate"] == pytest.approx(0.5, rel=0.25)
    assert M["rrr-2-2-2-2"]["lambda"] == 2.0                     # full rank: MN/2, not d/2 = 4
    assert M["rrr-2-2-2-2"]["estimate"] == pytest.approx(2.0, rel=0.25)
    assert M["rrr-2-2-2-2"]["exact_target"] is None
    assert arrays["linear-4.llc_chains"].shape == (2, 4)
    # strong localisation drags the exact target of the 1-parameter model down; SGLD follows
    t = arrays["gamma.mono-1.target"]
    assert t[1] < t[0]
    assert arrays["batch.sizes"].tolist() == [64, 10_000]


def test_same_seed_same_result(small):
    params, (arrays, data) = small
    arrays2, data2 = slt_llc.compute(params, None)
    assert data == data2
    for k in arrays:
        assert np.array_equal(arrays[k], arrays2[k], equal_nan=True), k


def test_model_specs_are_parsed_and_checked():
    assert slt_llc.truth("rrr-3-3-3-1") == (4.0, 1, 18)
    assert slt_llc.truth("mono-1-2-3")[:2] == (pytest.approx(1 / 6), 1)
    for bad in ("linear", "mono-0", "rrr-3-3-2-3", "conv-3"):
        with pytest.raises(ValueError):
            slt_llc.parse(bad)
    with pytest.raises(ValueError):
        dataclasses.replace(slt_llc.Params(), num_burnin=10**6).validate()
