"""The phase_change experiment: a small run computes everything it promises, deterministically, and the
transition rule finds a planted step."""

import dataclasses

import numpy as np
import pytest

from icl import timing
from icl.experiments import phase_change as pc


def test_locate_transition_on_a_planted_sigmoid():
    steps = np.arange(0, 8001, 100)
    score = 0.05 + 0.6 / (1 + np.exp(-(steps - 6000) / 150.0))
    r = pc.locate_transition(steps, score)
    assert r["step"] == 6000
    assert 5500 <= r["onset"] < 6000 < r["done"] <= 6500
    assert r["rise"] == pytest.approx(0.6, abs=0.01)
    flat = pc.locate_transition(steps, np.full(len(steps), 0.04))
    assert abs(flat["rise"]) < 1e-12


@pytest.fixture(scope="module")
def small():
    p = dataclasses.replace(pc.Params(), steps=80, eval_every=40, n_heldout=64, n_probe=32, d_model=32,
                            checkpoints=(40, 80))
    return p, pc.compute(p)


def test_small_run_has_every_curve_and_the_ablations(small):
    p, (arrays, data) = small
    n_eval = p.steps // p.eval_every + 1
    assert arrays["L2.step"].tolist() == [0, 40, 80]
    assert arrays["L2.prefix_matching"].shape == (n_eval, 2, p.n_heads)
    assert arrays["L1.prev_token"].shape == (n_eval, 1, p.n_heads)
    assert arrays["L2.heldout_loss"].shape == (n_eval, p.n_ctx - 1)
    assert arrays["L2.probe_loss"].shape == (n_eval, 2 * p.probe_len - 1)
    assert arrays["ablate_single"].shape == (2, 2, p.n_heads)
    # at initialisation every prediction is close to uniform: loss ~ log(vocab), ICL score ~ 0
    assert abs(arrays["L2.heldout_loss"][0].mean() - np.log(p.vocab)) < 0.05
    assert abs(arrays["L2.icl_score"][0]) < 0.05
    assert data["L2"]["final_heldout_loss"] < np.log(p.vocab) - 0.5  # it learns something in 80 steps
    assert set(data["ablation"]["table"]["zero"]) == {"none", "induction heads", "other last-layer heads",
                                                      "previous-token heads"}
    assert data["L2"]["n_params"] > data["L1"]["n_params"]


def test_same_seed_same_result(small, timing_keys):
    p, (arrays, data) = small
    with timing.collect() as times:
        again, data2 = pc.compute(p)
    assert data == data2 and timing_keys(data) == []
    assert set(times) == {"L1.train_seconds", "L2.train_seconds"}
    for key in ("L2.train_loss", "L2.prefix_matching", "L1.icl_score", "L2.state.W_U"):
        assert np.array_equal(arrays[key], again[key]), key
    assert data["ablation"] == data2["ablation"]


def test_content_digest_tracks_the_data():
    p = pc.Params()
    assert pc.content_digest(p) == pc.content_digest(p)
    assert pc.content_digest(p) != pc.content_digest(dataclasses.replace(p, seed=1))
