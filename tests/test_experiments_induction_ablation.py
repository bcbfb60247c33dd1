"""The induction_ablation experiment: layer-matched random sets are what they claim to be, the p-value
counts as declared, and on a random GQA model the clean row reproduces plain bridge runs while the
planted induction set changes what it should."""

import types

import numpy as np
import pytest
import torch

from icl import experiments
from icl.experiments import induction_ablation as exp
from icl.experiments import induction_heads as ih


def test_induction_set_reads_the_threshold():
    prefix = np.zeros((4, 3))
    prefix[1, 2], prefix[3, 0], prefix[2, 1] = 0.3, 0.9, 0.29
    assert exp.induction_set(prefix, 0.3) == [(1, 2), (3, 0)]


def test_layer_matched_sets_match_layers_and_avoid_the_set():
    chosen = [(17, 3), (17, 4), (17, 5), (18, 6), (23, 2)]
    sets = exp.layer_matched_sets(chosen, 9, 20, np.random.default_rng(0))
    assert len(sets) == 20 and len({tuple(s) for s in sets}) == 20
    for s in sets:
        assert [layer for layer, _ in s] == [17, 17, 17, 18, 23]  # as many heads per layer, sorted
        assert not set(s) & set(chosen) and len(set(s)) == len(s)
    assert sets == exp.layer_matched_sets(chosen, 9, 20, np.random.default_rng(0))  # seeded
    # layer 0 has 2 heads, one chosen: only one other set exists
    assert exp.layer_matched_sets([(0, 0)], 2, 1, np.random.default_rng(0)) == [[(0, 1)]]
    with pytest.raises(ValueError):
        exp.layer_matched_sets([(0, 0)], 2, 2, np.random.default_rng(0))


def test_p_value_counts_random_sets_at_least_as_harmful():
    assert exp.p_harmful(1.0, np.zeros(20)) == pytest.approx(1 / 21)
    assert exp.p_harmful(1.0, np.array([0.5, 1.0, 2.0, 0.0])) == pytest.approx(3 / 5)


def test_repeated_sequences_are_the_first_of_induction_heads():
    p = experiments.make_params(exp, {"n_seqs": "8"})
    assert np.array_equal(ih.random_tokens(exp.repeat_params(p)), ih.random_tokens(ih.Params())[:8])


@pytest.fixture(scope="module")
def tiny_run(tiny_llama):
    prefix = np.zeros((3, 8))
    prefix[1, 2] = prefix[2, 5] = prefix[2, 6] = 0.5  # planted "induction heads"
    up = types.SimpleNamespace(arrays={"prefix_matching": prefix})
    params = experiments.make_params(exp, {"n_random": "3", "n_windows": "2", "n_seqs": "3", "n_prompts": "3",
                                           "k": "4", "late_from": "2", "n_boot": "50", "head": "L2H0",
                                           "token_low": "0", "token_high": "256"})
    arrays, data = exp.compute(params, tiny_llama, upstream={"induction_heads": up})
    return params, arrays, data


def test_tiny_run_shapes_and_clean_row(tiny_run, tiny_llama):
    params, arrays, data = tiny_run
    assert data["induction"] == [[1, 2], [2, 5], [2, 6]]
    assert arrays["random_sets"].shape == (3, 3, 2) and arrays["repeat.loss"].shape == (5, 3)
    assert arrays["plus-1.answer_nats"].shape == (5, 3, 4)
    # the clean row is a plain bridge run: the repeat loss of the first sequence
    ids = torch.tensor(ih.random_tokens(exp.repeat_params(params))[:1], dtype=torch.long)
    with torch.no_grad():
        logits = tiny_llama.bridge(ids)
    loss = -torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert arrays["repeat.loss"][0, 0] == pytest.approx(float(loss[50:].mean()), abs=1e-4)
    # harms are relative to the clean row and the test reads rows 1 (induction) and 2.. (random)
    t = data["repeat"]["test"]
    assert t["induction"][0] == pytest.approx(float((arrays["repeat.loss"][1] - arrays["repeat.loss"][0]).mean()))
    assert t["random"] == pytest.approx(list((arrays["repeat.loss"][2:] - arrays["repeat.loss"][0]).mean(1)))
    assert 1 / 4 <= t["p"] <= 1
    # the focus head's attention is a distribution over the kinds of position
    for name in params.tasks:
        att = arrays[f"{name}.focus.attention"]
        assert np.allclose(att.sum(1), 1, atol=1e-5)
        assert sum(data["focus"][name]["uniform"]) == pytest.approx(1)
        assert 1 <= data["focus"][name]["correct_rank"][0] <= 10
    assert arrays["random_has_head"].sum() == data["random_sets_with_head"]


def test_tiny_run_is_deterministic(tiny_run, tiny_llama):
    params, arrays, data = tiny_run
    prefix = np.zeros((3, 8))
    prefix[1, 2] = prefix[2, 5] = prefix[2, 6] = 0.5
    again, data2 = exp.compute(params, tiny_llama, upstream={"induction_heads": types.SimpleNamespace(
        arrays={"prefix_matching": prefix})})
    assert data2 == data and all(np.array_equal(arrays[k], again[k]) for k in arrays)


def _data(p_repeat, p_icl, p_tasks, lo=0.1, n_random=20):
    test = lambda p: {"p": p, "induction": [1.0, lo, 2.0]}  # noqa: E731
    return {"n_random": n_random, "repeat": {"test": test(p_repeat)}, "icl": {"test": test(p_icl)},
            "tasks": {f"t{i}": {"test": test(p)} for i, p in enumerate(p_tasks)}}


def test_verdict_applies_the_declared_rule():
    best = 1 / 21
    assert exp.verdict(_data(best, best, [best, best]))["strong"] == "holds"
    assert exp.verdict(_data(best, best, [best, 0.5]))["strong"] == "holds in part"
    assert exp.verdict(_data(best, 0.2, [0.5, 0.5]))["strong"] == "fails"
    assert exp.verdict(_data(0.2, best, [best]))["strong"] == "holds"  # R is a control, not part of the claim
    assert exp.verdict(_data(0.2, best, [0.5]))["strong"] == "fails"
    assert exp.verdict(_data(best, best, [best], lo=-0.1))["strong"] == "fails"  # interval must exclude zero
    assert exp.verdict(_data(best, best, [best]))["passes"] == {"repeat": True, "icl": True, "t0": True}
