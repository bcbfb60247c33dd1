"""The c2w_pretrained experiment at small settings on a random tiny Llama-3-shaped model, its helpers
(icl.finetune), and the committed result for the default model."""

import dataclasses

import numpy as np
import pytest
import torch

from icl import experiments, finetune, scoring
from icl.config import Config
from icl.experiments import c2w_pretrained as cp

SMALL = dict(ks=("1", "2"), lrs=("0", "0.01"), steps=2, record=("1", "2"), n_contexts=3, n_select=1, n_query=2,
             layers=("1", "-1"), n_boot=50)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def small_run(tiny_llama):
    hf = tiny_llama.bridge.original_model
    before = _state(hf)
    p = dataclasses.replace(cp.Params(), **SMALL)
    first = cp.compute(p, tiny_llama)
    after = _state(hf)
    second = cp.compute(p, tiny_llama)
    return first, second, before, after


def test_learning_rate_zero_is_the_no_context_prediction(small_run):
    (arrays, data), _, _, _ = small_run
    assert arrays["select.gap"].shape == (2, 2, 2, 1, 2)  # [k, lr, n, selection context, query]
    # lr 0: Adam leaves the weights as they are, so the fine-tuned prediction is the no-context one
    assert np.array_equal(arrays["select.finetune_logp"][:, 0],
                          np.broadcast_to(arrays["no_context_logp"][:1], (2, 2, 1, 2)))
    assert np.allclose(arrays["select.gap"][:, 0], arrays["gap_no_update"][:, None, :1], rtol=1e-6, atol=1e-7)
    assert np.all(arrays["select.finetune_moved"][:, 0] == 0)
    # a positive learning rate moves the prediction and lowers the loss on the context lines
    assert np.all(arrays["select.finetune_moved"][:, 1] > 0)
    assert np.all(arrays["select.train_loss"][:, 1, -1] < arrays["select.train_loss"][:, 1, 0])
    assert np.allclose(arrays["select.train_loss"][:, 0, -1], arrays["select.train_loss"][:, 0, 0])


def test_report_set_uses_the_settings_chosen_on_the_selection_set(small_run):
    (arrays, data), _, _, _ = small_run
    assert data["n_report"] == 2 and arrays["report.finetune_logp"].shape == (2, 2, 2, 2)  # [k, choice, context, q]
    for a, k in enumerate((1, 2)):
        rep = data["report"][str(k)]
        for i, choice in enumerate(cp.CHOICES):
            b, r = cp.choose_settings(arrays["select.mean.gap"][a], arrays["select.mean.finetune_p"][a])[choice]
            assert rep[choice]["lr"] == float(SMALL["lrs"][b]) and rep[choice]["steps"] == int(SMALL["record"][r])
            assert np.isfinite(arrays["report.finetune_logp"][a, i]).all()
            assert np.isfinite(arrays["report.control_logp"][a, i]).all()
            if rep[choice]["lr"] == 0:  # no update: this rule, the control rule and no context all agree
                assert np.array_equal(arrays["report.finetune_logp"][a, i], arrays["no_context_logp"][1:])
                assert np.array_equal(arrays["report.control_logp"][a, i], arrays["no_context_logp"][1:])
            else:  # the control trains on other answers, so it lands elsewhere
                assert not np.array_equal(arrays["report.finetune_logp"][a, i], arrays["report.control_logp"][a, i])
            for key in ("finetune_p", "control_p", "gap", "control_gap", "gap_diff", "p_diff"):
                mean, lo, hi = rep[choice][key]
                assert lo <= mean + 1e-12 and mean <= hi + 1e-12, key
        # the report set's in-context numbers are over its own contexts
        assert rep["icl_p"][0] == pytest.approx(float(np.exp(arrays["icl_logp"][a, 1:].astype(np.float64)).mean()))


def test_choose_settings_on_planted_sweeps():
    gap = np.array([[3.0, 2.0, np.nan], [1.5, 0.5, 4.0]])  # [lr, step]; NaN is a diverged run
    p_correct = np.array([[0.1, 0.2, np.nan], [0.3, 0.6, 0.9]])
    assert cp.choose_settings(gap, p_correct) == {"closest": (1, 1), "most_accurate": (1, 2)}
    assert cp.choose_settings(np.ones((2, 2)), np.zeros((2, 2))) == {"closest": (0, 0), "most_accurate": (0, 0)}


def test_weights_restored_and_deterministic(small_run, timing_keys):
    (a1, d1), (a2, d2), before, after = small_run
    assert d1 == d2 and timing_keys(d1) == []  # timings go to provenance (icl.timing), not results
    assert d1["weights_restored"] and d2["weights_restored"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert a1.keys() == a2.keys()
    for key in a1:
        assert np.array_equal(a1[key], a2[key], equal_nan=a1[key].dtype.kind == "f"), key


def test_subset_trains_only_its_mlps_and_restores_them_even_after_an_error(tiny_llama):
    hf = tiny_llama.bridge.original_model
    before = _state(hf)
    flags = {n: q.requires_grad for n, q in hf.named_parameters()}
    with pytest.raises(RuntimeError), finetune.Subset(hf, [1]) as subset:
        trainable = {id(q) for q in hf.parameters() if q.requires_grad}
        assert trainable == {id(q) for q in hf.model.layers[1].mlp.parameters()} and len(trainable) == 3
        assert subset.n_trained == sum(q.numel() for q in hf.model.layers[1].mlp.parameters())
        ids = torch.tensor([[1, 2, 3, 4]])
        finetune.lm_loss(hf, ids, torch.tensor([[False, True, True, True]])).backward()
        torch.optim.SGD(subset.params, lr=1.0).step()
        assert not subset.unchanged()
        raise RuntimeError("boom")
    assert subset.unchanged() and all(q.grad is None for q in hf.parameters())
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())
    assert flags == {n: q.requires_grad for n, q in hf.named_parameters()}


def test_subset_of_a_bf16_model_trains_in_float32_and_goes_back_bit_for_bit(tiny_llama_dir):
    """A bf16 weight cannot take a small update (spacing 2^-7 of its size); the subset is upcast."""
    from icl import models

    loaded = models.load(Config(model=str(tiny_llama_dir), device="cpu", dtype="bfloat16"))
    hf = loaded.bridge.original_model
    before = _state(hf)
    ids, targets = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[False, True, True, True, True]])
    with finetune.Subset(hf, [0, 2]) as subset:
        assert {q.dtype for q in subset.params} == {torch.float32}
        assert hf.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
        w0 = subset.params[0].detach().clone()
        opt = torch.optim.Adam(subset.params, lr=1e-4)
        finetune.lm_loss(hf, ids, targets).backward()
        opt.step()
        moved = (subset.params[0].detach() - w0).abs().max().item()
        assert 0 < moved <= 1.01e-4  # an Adam step of 1e-4, kept in float32
        assert finetune.lm_loss(hf, ids, targets).dtype == torch.float32
    assert all(v.dtype == before[k].dtype and torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_tail_from_a_cached_prefix_gives_the_full_logits_bit_for_bit(tiny_llama):
    hf = tiny_llama.bridge.original_model
    ids = finetune.pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0)
    with torch.no_grad():
        full = hf(input_ids=ids).logits
        for first in range(hf.config.num_hidden_layers + 1):
            tail = finetune.Tail(hf, first)
            assert torch.equal(tail.logits(tail.prefix(ids)), full), first


def test_memory_formula():
    # Meta-Llama-3-8B in bf16, the MLPs of two layers trained with Adam: 16 bytes per trained parameter
    n, t = 8_030_261_248, 2 * 3 * 4096 * 14336
    mem = finetune.memory_bytes(n, t, 2, "adam")
    assert mem["device_total"] == (n - t) * 2 + t * 16 and mem["snapshot_cpu"] == 2 * t
    assert finetune.memory_bytes(n, t, 2, "sgd")["device_total"] == (n - t) * 2 + t * 8
    assert finetune.mlp_layers(32, [14, -1]) == [14, 31]
    # the chapter's figure for the default parameters: Meta-Llama-3-8B has 8,030,261,248 parameters
    assert cp.llama3_8b_memory(cp.Params()) == {"n_params": n, "n_trained": t} | mem
    assert mem["device_total"] / 2**30 < 20  # GiB, before activations: within a 24 GB GPU
    with pytest.raises(ValueError):
        finetune.mlp_layers(32, [31, -1])


def test_answer_scores_match_the_scoring_module(tiny_llama):
    """score_answers (HF model) and icl.scoring (bridge) agree on the whole-answer log-probability."""
    tok = tiny_llama.tokenizer
    prompt = cp.example_prompt("plus-1", [12, 40, 7], [13, 41, 8])
    enc = scoring.encode(tok, prompt)
    pad = tok.pad_token_id
    s = finetune.score_answers(tiny_llama.bridge.original_model, [enc.ids], [enc.answer_tokens[-1]], pad)
    logp, _ = scoring.token_logprobs(tiny_llama.bridge, [enc.ids], pad)
    assert s.logp[0].item() == pytest.approx(float(logp[0, list(enc.answer_tokens[-1])].double().sum()), abs=1e-4)
    assert torch.allclose(s.first.exp().sum(-1), torch.ones(1, dtype=torch.float64))
    assert finetune.kl(s.first, s.first).abs().max() < 1e-12


def test_example_prompt_matches_make_prompts():
    from icl import tasks

    p = tasks.make_prompts("plus-1", 1, 4, seed=3)[0]
    assert cp.example_prompt("plus-1", list(p.xs), list(p.ys)) == p


def test_params_are_validated():
    with pytest.raises(ValueError):
        dataclasses.replace(cp.Params(), task="random").validate()
    with pytest.raises(ValueError):
        dataclasses.replace(cp.Params(), control_task="plus-1").validate()  # the control must be another rule
    with pytest.raises(ValueError):
        dataclasses.replace(cp.Params(), n_select=11).validate()  # one context is too few to report
    with pytest.raises(ValueError):
        dataclasses.replace(cp.Params(), record=("11",)).validate()
    p = cp.Params()
    assert cp.content_digest(p) != cp.content_digest(dataclasses.replace(p, seed=1))


def test_committed_result_for_the_default_model():
    """The cached run: the context helps, the chosen settings come from the selection set, fine-tuning
    never reproduces the in-context prediction, the control rule does not teach this one, and the weights
    came back."""
    entry, _ = experiments.run("c2w_pretrained", Config(cache_mode="readonly"))
    A, D = entry.arrays, entry.data
    P = cp.Params()
    assert D["weights_restored"] and D["n_report"] == P.n_contexts - P.n_select
    assert np.all(A["select.mean.icl_p"] > 10 * A["select.mean.no_context_p"])  # learnt in context
    for a, (k, rep) in enumerate(D["report"].items()):
        chosen = cp.choose_settings(A["select.mean.gap"][a], A["select.mean.finetune_p"][a])
        for choice, (b, r) in chosen.items():
            assert (rep[choice]["lr"], rep[choice]["steps"]) == (float(P.lrs[b]), int(P.record[r]))
        closest = rep["closest"]
        # the closest fine-tuned prediction still leaves a tenth or more of the context's divergence
        assert 0.1 * rep["gap_no_update"][0] < closest["gap"][0] < rep["gap_no_update"][0], k
        assert rep["icl_p"][0] > 10 * rep["no_context_p"][0]
        # the control rule's lines teach this rule far less than its own lines do
        assert rep["most_accurate"]["p_diff"][1] > 0.3 and rep["closest"]["gap_diff"][1] > 0
    # fine-tuning lowers the loss on the context lines
    L = A["select.train_loss"]
    assert np.all(np.nanmean(L[:, 1:, -1], -1) < np.nanmean(L[:, 1:, 0], -1))


def test_a_bf16_llama_folder_runs_through_the_cli(tmp_path, monkeypatch):
    """A local Llama folder loads in its config's dtype (bf16 for Meta-Llama-3-8B); the trained subset is
    upcast to float32, and the run stores an entry whose model came back unchanged."""
    from icl import cli, models

    folder = models.write_random_llama3(tmp_path / "bf16", dtype="bfloat16")
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.main(["run", "c2w_pretrained", "--model", str(folder), "--device", "cpu",
                     "--set", "ks=1", "--set", "n_contexts=3", "--set", "n_select=1", "--set", "n_query=1", "--set", "steps=1",
                     "--set", "record=1", "--set", "lrs=0.001", "--set", "layers=1"])
    assert code == 0
    metas = list((tmp_path / "cache").rglob("meta.json"))
    assert len(metas) == 1 and '"weights_restored": true' in metas[0].read_text()
