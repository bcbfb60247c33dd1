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
    for step in steps[1:]:
        assert step["ablated_layers"] and step["runner_matches_bridge"] < 1e-4
    with pytest.raises(ValueError):
        experiments.make_params(exp, {"procedure_task": "identity"})
