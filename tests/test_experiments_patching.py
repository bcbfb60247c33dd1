"""The patching experiment end to end on the random Llama-3-shaped model (cheap), and its statistics."""

import dataclasses

import numpy as np
import pytest

from icl import experiments
from icl.experiments import patching as exp


@pytest.fixture(scope="module")
def small():
    return experiments.make_params(exp, {"tasks": "plus-1", "n_pairs": "3", "k": "3", "n_boot": "100"})


def test_runs_end_to_end_and_is_deterministic(tiny_llama, small):
    arrays, data = exp.compute(small, tiny_llama)
    assert arrays["plus-1.resid_pre.logp"].shape == (3, 3, 5)
    assert arrays["plus-1.resid_pre.recovered.mean"].shape == (3, 5)
    # patching the embedding (resid_pre of layer 0) of identical tokens recovers nothing
    assert np.allclose(arrays["plus-1.resid_pre.recovered.mean"][0], 0, atol=1e-4)
    lo, m, hi = (arrays[f"plus-1.attn_out.recovered.{s}"] for s in ("lo", "mean", "hi"))
    assert (lo <= hi + 1e-9).all()
    assert data["query_tokens_example"][0] == "(" and len(data["query_tokens_example"]) == 5
    again, data2 = exp.compute(small, tiny_llama)
    assert data == data2 and all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_bootstrap_recovered_brackets_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(-1, 0.1, 40)
    b = rng.normal(-5, 0.1, 40)
    half = (a + b)[:, None] / 2
    m, lo, hi = exp.bootstrap_recovered(half, a, b, 500, 0)
    assert abs(m[0] - 0.5) < 1e-9 and lo[0] < 0.5 < hi[0] and hi[0] - lo[0] < 0.05


def test_only_two_digit_queries(small):
    prompts = exp.prompts_for(dataclasses.replace(small, n_pairs=30))["plus-1"]
    assert len(prompts) == 30 and all(10 <= p.xs[-1] <= 99 for p in prompts)
    with pytest.raises(ValueError):
        dataclasses.replace(small, threshold=0).validate()


def test_base_rates_and_informative_pairs(tiny_llama, small):
    """Every first-token readout gets its base rate, and the pairs whose answer starts like x (which
    cannot tell the answer from a copy) are counted and left out of the informative readout."""
    arrays, data = exp.compute(small, tiny_llama)
    t = data["tasks"]["plus-1"]
    rates = t["base_rates"]
    assert 0 < rates["modal_y"] <= 1 and 0 < rates["modal_2x"] <= 1
    assert t["n_informative"] == round(small.n_pairs * (1 - rates["y_first_equals_x_first"]))
    if t["n_informative"]:
        assert arrays["plus-1.resid_pre.argmax_y_informative"].shape == arrays["plus-1.resid_pre.recovered.mean"].shape
