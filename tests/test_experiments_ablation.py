"""The ablation experiment end to end on the random Llama-3-shaped model."""

import numpy as np
import pytest

from icl import experiments
from icl.experiments import ablation as exp


@pytest.fixture(scope="module")
def small():
    return experiments.make_params(exp, {"tasks": "plus-1", "procedure_task": "plus-1", "n_pairs": "3", "k": "3",
                                         "n_boot": "100", "threshold": "0.01"})


def test_runs_and_records_the_procedure(tiny_llama, small):
    arrays, data = exp.compute(small, tiny_llama)
    assert arrays["plus-1.zero.delta.mean"].shape == (3, 8)
    assert arrays["procedure.0.recovered.mean"].shape == (3, 5)
    steps = data["procedure"]
    assert steps[0]["ablated_layers"] == []
    assert len(steps) > 1  # the threshold is low enough for the procedure to ablate something
    for step in steps[1:]:
        assert step["ablated_layers"] and step["runner_matches_bridge"] < 1e-4
        assert arrays["procedure.1.recovered_answer.mean"].shape == (3, 5)
        assert 0 <= step["exact_a"][0] <= 1 and step["logp_a_answer"][0] < step["logp_a"][0] + 1e-6
    with pytest.raises(ValueError):
        experiments.make_params(exp, {"procedure_task": "identity"})


def test_step0_read_from_a_matching_patching_entry(tiny_llama, small):
    """The unablated sweep is patching's residual grid: read from a patching result on the same pairs it
    gives what computing it here gives (up to the entry's float32 storage); other pairs are computed."""
    from types import SimpleNamespace
    from dataclasses import asdict

    from icl.experiments import patching as pexp

    pp = pexp.Params(tasks=("plus-1",), n_pairs=3, k=3, n_boot=100, threshold=0.01)
    p_arrays, _ = pexp.compute(pp, tiny_llama)
    entry = SimpleNamespace(key_inputs={"params": asdict(pp)}, arrays=p_arrays)
    own, own_data = exp.compute(small, tiny_llama)
    read, read_data = exp.compute(small, tiny_llama, upstream={"patching": entry})
    assert read_data["step0_from_patching"] and not own_data["step0_from_patching"]
    assert np.abs(read["procedure.0.recovered.mean"] - own["procedure.0.recovered.mean"]).max() < 1e-3
    assert read_data["procedure"][0]["first_layer"] == own_data["procedure"][0]["first_layer"]
    other = SimpleNamespace(key_inputs={"params": {**asdict(pp), "seed": 1}}, arrays=p_arrays)
    _, other_data = exp.compute(small, tiny_llama, upstream={"patching": other})
    assert not other_data["step0_from_patching"]


def test_controls_and_corrected_tests_are_recorded(tiny_llama, small):
    arrays, data = exp.compute(small, tiny_llama)
    steps = data["procedure"]
    for step in steps:
        assert sum(step["first_layer_boot"]) == pytest.approx(1.0)
        lo, hi = step["first_layer_range"]
        assert lo is None or hi is None or lo <= hi
    for step in steps[1:]:
        ctrls = step["random_layer_controls"]
        assert len(ctrls) == min(small.n_controls, 3 - len(step["ablated_layers"]))  # blocks that fit elsewhere
        assert all(len(c["layers"]) == len(step["ablated_layers"]) and c["layers"] != step["ablated_layers"]
                   for c in ctrls)
    s = data["tasks"]["plus-1"]["zero"]
    assert s["n_tests"] == 3 * 8 and 0 <= s["n_significant_bh"] <= s["n_tests"]
    assert arrays["plus-1.zero.bh_significant"].shape == (3, 8)
