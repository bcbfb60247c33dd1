"""The surprisal experiment on the real default model, small enough for the test suite."""

import numpy as np
import pytest

from icl import experiments
from icl.experiments import surprisal


@pytest.fixture(scope="module")
def small_params():
    return experiments.make_params(surprisal, {"tasks": "identity,random", "n_prompts": "4", "k": "8"})


@pytest.mark.slow
def test_identity_is_learnt_and_random_is_not(smol, small_params):
    arrays, data = surprisal.compute(small_params, smol)
    ident, rand = arrays["identity.answer_nats"], arrays["random.answer_nats"]
    assert ident.shape == rand.shape == (4, 8)
    # After a few examples the copy rule costs well under a nat; random answers cost several.
    assert ident[:, 4:].mean() < 1.0 < 3.0 < rand[:, 4:].mean()
    assert arrays["identity.exact"][:, 4:].mean() > 0.7 and arrays["random.exact"][:, 4:].mean() < 0.2
    # Summaries are consistent with the raw matrices.
    assert np.allclose(arrays["identity.answer_nats.mean"], ident.mean(0), atol=1e-5)
    assert np.allclose(arrays["random.cum_bits.mean"][-1], rand.sum(1).mean() / np.log(2), rtol=1e-5)
    assert data["tasks"]["identity"]["rule"] == "y = x" and data["n_prompts"] == 4


@pytest.mark.slow
def test_same_seed_same_result_on_cpu(smol, small_params):
    a, da = surprisal.compute(small_params, smol)
    b, db = surprisal.compute(small_params, smol)
    assert da == db
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_content_digest_tracks_prompts(small_params):
    import dataclasses

    other = dataclasses.replace(small_params, seed=1)
    assert surprisal.content_digest(small_params) == surprisal.content_digest(small_params)
    assert surprisal.content_digest(small_params) != surprisal.content_digest(other)


@pytest.mark.slow
def test_controls_floor_ideal_learner_and_carries(smol):
    """The shuffled control of the copy rule costs far more than the rule on the same prompts; the
    floor is log |Y|; the ideal learner pins a rule of its grid within a few examples; plus-1 has
    carry and non-carry examples reported apart."""
    params = experiments.make_params(surprisal, {"tasks": "identity,plus-1", "n_prompts": "6", "k": "10",
                                                 "n_control": "4", "late_from": "3", "n_boot": "50"})
    arrays, data = surprisal.compute(params, smol)
    ident = data["tasks"]["identity"]
    assert arrays["identity.shuffled.answer_nats"].shape == (4, 10)
    assert ident["rule_minus_shuffled_tail5_nats"][2] < -1.0  # the rule is worth more than a nat
    assert ident["floor_nats"] == pytest.approx(np.log(99)) and ident["support"] == 99
    assert arrays["identity.ideal_nats"][2:].max() < 0.05 < arrays["identity.ideal_nats"][0]
    assert "carries" not in ident and "shuffled_tail5_nats" in ident
    plus1 = data["tasks"]["plus-1"]
    xs = arrays["plus-1.x"]
    if (xs[:, 2:] % 10 == 9).any():
        assert plus1["carries"]["carry"]["n"] == int((xs[:, 2:] % 10 == 9).sum())
    assert plus1["carries"]["no_carry"]["n"] + plus1["carries"].get("carry", {"n": 0})["n"] == 6 * 8
