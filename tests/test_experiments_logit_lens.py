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
