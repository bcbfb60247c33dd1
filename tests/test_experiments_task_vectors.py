"""The task_vectors experiment end to end on the random Llama-3-shaped model, at toy size."""

import numpy as np
import pytest

from icl import experiments
from icl.experiments import task_vectors as exp

SMALL = {"n_prompts": "4", "k": "3", "k_sweep": "5", "n_sweep": "4", "n_cross": "3",
         "k_cross": "2", "probe_min_k": "2", "lens_ks": "0,1,5", "lens_every": "2", "n_boot": "40", "n_folds": "2"}


@pytest.fixture(scope="module")
def result(tiny_llama):
    return exp.compute(experiments.make_params(exp, SMALL), tiny_llama)


def test_shapes_and_summary(result, tiny_llama):
    arrays, data = result
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    for name in ("plus-1", "plus-10", "identity", "double"):
        assert arrays[f"{name}.recovered.mean"].shape == (L,)
        assert arrays[f"{name}.logp_tv"].shape == (4, L)
        assert arrays[f"{name}.sweep.logp"].shape == (4, 6)
        assert arrays[f"{name}.sweep.number_mass.mean"].shape == (len(data["lens_layers"]), 3)
        assert data["lens_layers"][-1] == L
        assert arrays[f"{name}.parts.head.mean"].shape == (data["tv_layer"], H, 6)
        assert arrays[f"{name}.to_own_x"].shape == (L, H) and np.all((arrays[f"{name}.to_own_x"] >= 0) & (arrays[f"{name}.to_own_x"] <= 1 + 1e-6))
        assert set(data["growth"][name]) >= {"projection", "log_odds"}
        assert data["tasks"][name]["cross"]["recipient"] != name
    assert arrays["shuffled.tv_gain.mean"].shape == (L,)
    assert 0 <= data["tv_layer"] < L
    assert arrays["probe.y_mod_10.acc"].shape == (L + 1,)
    assert set(data["probe"]) == {"y_mod_10", "y_mod_2", "y_mod_5", "x_mod_10"}
    assert np.all(np.isfinite(arrays["mean_recovered"]))


def test_the_decomposition_adds_up(result):
    """At the task-vector layer the projection is the embedding's plus every earlier head's and MLP's."""
    arrays, data = result
    name = "plus-1"
    total = arrays[f"{name}.proj_on.{name}.mean"][data["tv_layer"]]
    parts = (arrays[f"{name}.parts.embed.mean"] + arrays[f"{name}.parts.head.mean"].sum((0, 1))
             + arrays[f"{name}.parts.mlp.mean"].sum(0))
    assert np.allclose(total, parts, atol=1e-3 * (1 + np.abs(total).max()))


def test_prompts_and_parameters():
    params = exp.Params()
    suite = exp.prompts_for(params)
    assert set(suite) == {"plus-1", "plus-10", "identity", "double", "shuffled"}
    ctrl = suite["shuffled"]["kshot"][0]
    assert any(y != x + 1 for x, y in zip(ctrl.xs, ctrl.ys))
    assert all(len(p.xs) == 1 for p in suite["plus-1"]["zero"])
    assert [p.xs[-1] for p in suite["plus-1"]["zero"]] == [p.xs[-1] for p in suite["plus-1"]["kshot"]]
    assert suite["plus-1"]["sweep"][0].k == params.k_sweep + 1
    with pytest.raises(Exception):
        experiments.make_params(exp, {"lens_ks": "0,30"})
