"""The phase_seeds experiment: a small run computes every curve it promises, deterministically; the PCA,
the turn of a trajectory, the seed interval and the declared tests find planted answers."""

import dataclasses

import numpy as np
import pytest

from icl import timing
from icl.experiments import phase_seeds as ps


@pytest.fixture(scope="module")
def small():
    p = dataclasses.replace(ps.Params(), steps=100, smeared_steps=50, eval_every=5, n_heldout=16, n_probe=8,
                            d_model=16, n_heads=2, n_seeds=2, n_negative=1)
    return p, ps.compute(p)


def test_small_run_has_every_curve_of_every_run(small):
    p, (arrays, data) = small
    assert arrays["step"].tolist() == list(range(0, 101, 5))
    assert arrays["step_smeared"].tolist() == list(range(0, 51, 5))
    for run, (layers, smeared) in ps.VARIANTS.items():
        n_eval = len(arrays["step_smeared" if smeared else "step"])
        assert arrays[f"{run}.prefix_matching"].shape == (p.n_seeds, n_eval, layers, p.n_heads)
        assert arrays[f"{run}.heldout_loss"].shape == (p.n_seeds, n_eval, p.n_ctx - 1)
        assert arrays[f"{run}.probe_loss"].shape == (p.n_seeds, n_eval, 2 * p.probe_len - 1)
        assert arrays[f"{run}.train_loss"].shape == (p.n_seeds, n_eval - 1)
        assert (f"{run}.smear" in arrays) == smeared
        assert [r["seed"] for r in data[run]["runs"]] == [5, 6]
        # at initialisation every prediction is close to uniform: loss ~ log(vocab), scores ~ 0
        assert np.abs(arrays[f"{run}.heldout_loss"][:, 0].mean(-1) - np.log(p.vocab)).max() < 0.05
        assert np.abs(arrays[f"{run}.probe_score"][:, 0]).max() < 0.05
    n_eval = len(arrays["step"])
    for run in ps.NEGATIVE:
        assert arrays[f"{run}.best_induction"].shape == (p.n_negative, n_eval)
    # sigma(alpha) starts at 1/2 and moves; the 2-layer model has more parameters than the 1-layer one
    assert np.allclose(arrays["L1s.smear"][:, 0], 0.5) and not np.allclose(arrays["L1s.smear"][:, -1], 0.5)
    n_params = data["n_params"]
    assert n_params["L2"] > n_params["L1"] and n_params["L2s"] == n_params["L2"] + 2 * p.n_heads
    assert arrays["pca.scores"].shape == (p.n_seeds, 2, n_eval, p.n_components)
    assert all("pca_fastest" in r for r in data["L2"]["runs"] + data["L1"]["runs"])
    explained = arrays["pca.explained"]
    assert np.all(np.diff(explained, axis=1) <= 1e-6) and np.all(explained.sum(1) <= 1 + 1e-6)
    # the Markov-only run never sees a repeat: its training loss falls further than on the mixture
    assert arrays["L2.markov.train_loss"][0, -1] < arrays["L2.train_loss"][0, -1]
    assert set(ps.verdicts(data)) == {"T1_every_seed", "T2_abrupt", "T3_spread", "T4_control", "T5_smeared_one_layer",
                                      "T6_smeared_earlier", "T7_heldout_icl", "T8_pca_fastest", "T9_negative"}


def test_same_seed_same_result(small, timing_keys):
    p, (arrays, data) = small
    with timing.collect() as times:
        again, data2 = ps.compute(p)
    assert data == data2 and timing_keys(data) == []
    assert set(times) == {f"{v}.train_seconds" for v in ps.VARIANTS}
    assert arrays.keys() == again.keys()
    for key in arrays:
        assert np.array_equal(arrays[key], again[key]), key


def test_variants_of_a_seed_share_data_and_start_and_seeds_differ():
    p = ps.Params()
    d0, held0, _, probe0 = ps.eval_sets(p, 0)
    d1, held1, _, probe1 = ps.eval_sets(p, 1)
    assert not np.array_equal(d0.transition.numpy(), d1.transition.numpy())
    assert not np.array_equal(held0.numpy(), held1.numpy()) and not np.array_equal(probe0.numpy(), probe1.numpy())
    assert ps.content_digest(p) != ps.content_digest(dataclasses.replace(p, seed=1))
    assert ps.content_digest(p) != ps.content_digest(dataclasses.replace(p, n_seeds=4))
    # the Markov-only source is the same chain without the repeats
    markov = ps.tm.MarkovRepeatData(ps.data_spec(p, repeats=False), seed=0)
    assert np.array_equal(markov.transition.numpy(), d0.transition.numpy())


def test_pca_of_a_planted_direction():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 40)
    direction = rng.normal(size=200)
    rows = 3.0 + np.outer(t, direction) + 0.001 * rng.normal(size=(40, 200))
    scores, explained = ps.pca_scores(rows, 2)
    assert explained[0] > 0.999 and explained[1] < 1e-3
    assert scores[0, 0] < 0 < scores[-1, 0]  # sign fixed: the first row scores negative
    assert np.allclose(np.diff(scores[:, 0]), np.diff(scores[:, 0]).mean(), rtol=0.05)


def test_fastest_move_skips_the_start_and_bend_measures_the_angle():
    steps = np.arange(0, 2100, 100)
    path = np.zeros((21, 2))
    path[:, 0] = np.arange(21.0)
    path[1, 0] = 30  # a huge first move (the initial fall of the loss), then a jump at step 1200
    path[2:, 0] += 29
    path[12:, 0] += 10
    r = ps.fastest_move(steps, path, after=200)
    assert r["step"] == 1200 and r["ratio"] == pytest.approx(11.0)
    assert ps.fastest_move(steps, path, after=0)["step"] == 100
    corner = np.array([[0.0, 0.0], [1, 0], [2, 0], [2, 1], [2, 2]])
    assert ps.bend(corner, np.arange(5), 0, 2, 4) == pytest.approx(90.0)
    assert ps.bend(corner, np.arange(5), 0, 1, 2) == pytest.approx(0.0)


def test_t_interval_and_final():
    mean, lo, hi = ps.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5) and lo == 4.0 - hi
    assert ps.t_interval([5.0]) == [5.0, None, None] and ps.t_interval([]) == [None, None, None]
    assert ps.final(np.array([9.0] * 18 + [1.0, 3.0])) == 2.0


def _planted_data(**changes):
    """An entry's data in which every declared test passes (then one thing is changed)."""
    p = {"eval_every": 50}

    def run(step, formed, probe, held):
        return {"transition": {"onset": step - 100, "step": step, "done": step + 100}, "to_75": step + 50,
                "forms_induction": formed, "final_probe_score": probe, "final_heldout_icl": held,
                "pca_fastest": {"step": step}}

    steps = [1800, 1900, 2000, 2100, 1950]
    data = {
        "params": p,
        "L2": {"runs": [run(s, True, -3.0, -1.5) for s in steps], "n_formed": 5,
               "transition_step": ps.t_interval(steps)},
        "L1": {"runs": [run(3000, False, 0.1, -1.0) for _ in steps]},
        "L2s": {"runs": [run(300, True, -3.5, -1.6) for _ in steps]},
        "L1s": {"runs": [run(250, True, -3.5, -1.6) for _ in steps]},
        "L2.markov": {"runs": [run(3000, False, 0.2, -0.9)]},
        "L2.low_lr": {"runs": [run(3000, False, 0.2, -0.9)]},
        "smeared_earlier": {"n": 5, "differences": [s - 300 for s in steps],
                            "interval": ps.t_interval([s - 300 for s in steps])},
    }
    for path, value in changes.items():
        *keys, last = path.split("/")
        target = data
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[last] = value
    return data


@pytest.mark.parametrize("change, failing", [
    ({}, None),
    ({"L2/runs/2/forms_induction": False}, "T1_every_seed"),
    ({"L2/runs/0/to_75": 2300}, "T2_abrupt"),
    ({"L2/transition_step": ps.t_interval([1000, 3000, 1500, 2500, 2000])}, "T3_spread"),
    ({"L1/runs/4/final_probe_score": -0.8}, "T4_control"),
    ({"L1s/runs/1/forms_induction": False}, "T5_smeared_one_layer"),
    ({"smeared_earlier/differences": [1500, 1600, -10, 1800, 1650]}, "T6_smeared_earlier"),
    ({"L1/runs/3/final_heldout_icl": -1.4}, "T7_heldout_icl"),
    ({"L2/runs/0/pca_fastest": {"step": 500}, "L2/runs/1/pca_fastest": {"step": 2900}}, "T8_pca_fastest"),
    ({"L2.low_lr/runs/0/forms_induction": True}, "T9_negative"),
])
def test_each_declared_test_can_fail(change, failing):
    result = ps.verdicts(_planted_data(**change))
    assert [name for name, r in result.items() if not r["pass"]] == ([failing] if failing else [])
