"""The function_vectors experiment end to end on the random Llama-3-shaped model, at toy size."""

import numpy as np
import pytest

from icl import experiments
from icl.experiments import function_vectors as exp

SMALL = {"tasks": "plus-1,double", "k": "3", "n_clean": "3", "n_corrupt": "3", "n_top": "3",
         "n_random": "2", "k_ablate": "3", "n_ablate": "3", "n_boot": "40"}


def test_runs_and_ranks_every_head(tiny_llama):
    arrays, data = exp.compute(experiments.make_params(exp, SMALL), tiny_llama)
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    assert arrays["cie.mean"].shape == (L, H)
    assert arrays["cie.significant"].dtype == bool
    assert np.all((arrays["cie.p_adjusted"] >= arrays["cie.p"] - 1e-12))
    top = data["top_heads"]
    assert [r[2] for r in top] == sorted((r[2] for r in top), reverse=True)
    assert data["fv_layer"] == L // 3
    for name in ("plus-1", "double"):
        assert arrays[f"{name}.fv_gain.mean"].shape == (L,)
        assert len(data["fv"][name]["random_gain_at_fv_layer"]) == 2
        assert arrays[f"{name}.ablate.none.number_mass"].shape == (4,)
        assert set(data["ablate"][name]) >= {"fv_heads", "named_heads", "random_fv.0", "random_named.1"}
    with pytest.raises(Exception):
        experiments.make_params(exp, {"ablate_tasks": "double-plus-3"})
    # the tiny model has 3 layers: the post's llama-3-8b heads map into them by relative depth
    assert data["named_heads_mapped"] and all(0 <= layer < L for layer, _ in data["named_heads"])


def test_corrupted_prompts_keep_the_query_answer():
    suite = exp.prompts_for(exp.Params())
    for name, sets in suite.items():
        for clean_like, bad in zip(sets["clean"], sets["corrupt"]):
            assert bad.ys[-1] == bad.xs[-1] * (2 if name == "double" else 1) + {"plus-1": 1, "plus-10": 10}.get(name, 0)
