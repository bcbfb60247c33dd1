"""The logit_lens experiment on the real default model, small."""

import dataclasses

import numpy as np
import pytest

from icl import experiments
from icl.experiments import logit_lens


@pytest.fixture(scope="module")
def small():
    return experiments.make_params(logit_lens, {"tasks": "identity", "n_prompts": "4", "k": "5", "n_boot": "200"})


@pytest.mark.slow
def test_identity_becomes_the_right_number_late(smol, small):
    arrays, data = logit_lens.compute(small, smol)
    t = data["tasks"]["identity"]
    assert arrays["identity.p_first"].shape == (4, 31)
    assert t["final_top1"] == 1.0 and t["final_number_mass"] > 0.9
    # a number before (or when) it is the right number, and neither at the embedding
    assert t["number_layer"] is not None and t["right_layer"] is not None
    assert 0 < t["number_layer"] <= t["right_layer"] <= 30
    assert np.allclose(arrays["identity.top1.mean"], (arrays["identity.rank_first"] == 0).mean(0))
    again, data2 = logit_lens.compute(small, smol)
    assert data == data2 and all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_params_and_digest(small):
    with pytest.raises(ValueError):
        dataclasses.replace(small, k=1).validate()
    assert logit_lens.content_digest(small) != logit_lens.content_digest(dataclasses.replace(small, seed=1))
    assert logit_lens.first_layer(np.array([0.1, 0.4, 0.6, 0.2]), 0.5) == 2
    assert logit_lens.first_layer(np.array([0.1, 0.4]), 0.5) is None


def test_base_rates_sit_beside_the_accuracies(tiny_llama):
    """The modal first token's share is the accuracy of always naming it; the final top-1 is split by
    whether the answer starts with that token, and the two groups cover every prompt."""
    from icl.experiments import logit_lens as exp

    p = experiments.make_params(exp, {"tasks": "double-plus-3", "n_prompts": "12", "k": "3", "n_boot": "50"})
    arrays, data = exp.compute(p, tiny_llama)
    t = data["tasks"]["double-plus-3"]
    modal = arrays["double-plus-3.first_is_modal"]
    assert t["modal_rate"] == pytest.approx(modal.mean()) and 1 / 12 <= t["modal_rate"] <= 1
    assert sum(v[3] for v in t["final_top1_by_first_token"].values()) == 12
    assert t["floor_logp_answer"] == pytest.approx(-np.log(99))
