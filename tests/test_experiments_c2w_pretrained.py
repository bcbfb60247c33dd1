"""The c2w_pretrained experiment at small settings on a random tiny Llama-3-shaped model, its helpers
(icl.finetune), and the committed result for the default model."""

import dataclasses

import numpy as np
import pytest
import torch

from icl import experiments, finetune, scoring
from icl.config import Config
from icl.experiments import c2w_pretrained as cp

SMALL = dict(ks=("1", "2"), lrs=("0", "0.01"), steps=2, record=("1", "2"), n_contexts=2, n_query=2)


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
    assert arrays["gap"].shape == (2, 2, 2, 2, 2)  # [k, lr, n, context, query]
    # lr 0: Adam leaves the weights as they are, so the fine-tuned prediction is the no-context one
    assert np.array_equal(arrays["finetune_logp"][:, 0], np.broadcast_to(arrays["no_context_logp"], (2, 2, 2, 2)))
    assert np.allclose(arrays["gap"][:, 0], arrays["gap_no_update"][:, None], rtol=1e-6, atol=1e-7)
    assert np.all(arrays["finetune_moved"][:, 0] == 0)
    # a positive learning rate moves the prediction and lowers the loss on the context lines
    assert np.all(arrays["finetune_moved"][:, 1] > 0)
    assert np.all(arrays["train_loss"][:, 1, -1] < arrays["train_loss"][:, 1, 0])
    assert np.allclose(arrays["train_loss"][:, 0, -1], arrays["train_loss"][:, 0, 0])


def test_weights_restored_and_deterministic(small_run, timing_keys):
    (a1, d1), (a2, d2), before, after = small_run
    assert d1 == d2 and timing_keys(d1) == []  # timings go to provenance (icl.timing), not results
    assert d1["weights_restored"] and d2["weights_restored"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert a1.keys() == a2.keys()
    for key in a1:
        assert np.array_equal(a1[key], a2[key], equal_nan=a1[key].dtype.kind == "f"), key


def test_restoring_undoes_changes_even_after_an_error():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[1].weight.requires_grad_(False)
    before = _state(net)
    with pytest.raises(RuntimeError), finetune.restoring(net):
        for q in net.parameters():
            q.requires_grad_(True)
        net(torch.ones(2, 3)).sum().backward()
        with torch.no_grad():
            net[0].weight += 1.0
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net[0].weight.grad is None and not net[1].weight.requires_grad and net[0].weight.requires_grad


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
        dataclasses.replace(cp.Params(), record=("11",)).validate()
    p = cp.Params()
    assert cp.content_digest(p) != cp.content_digest(dataclasses.replace(p, seed=1))


def test_committed_result_for_the_default_model():
    """The cached run: the context helps, fine-tuning never reproduces it, and the weights came back."""
    entry, _ = experiments.run("c2w_pretrained", Config(cache_mode="readonly"))
    A, D = entry.arrays, entry.data
    assert D["weights_restored"]
    assert np.all(A["mean.icl_p"] > 10 * A["mean.no_context_p"])  # the model learns the rule in context
    assert np.all(np.isfinite(A["gap"])) and np.all(A["gap"] > 0)
    # the closest fine-tuned prediction still leaves a tenth or more of the context's divergence
    for k, b in D["best"].items():
        assert 0.1 * b["gap_no_update"] < b["gap"] < b["gap_no_update"], k
    # every learning rate changes the prediction, and fine-tuning lowers the loss on the context lines
    assert np.all(A["finetune_moved"][:, :, -1].mean(axis=(-1, -2)) > 0.1)
    assert np.all(np.nanmean(A["train_loss"][:, :, -1], -1) < np.nanmean(A["train_loss"][:, :, 0], -1))


def test_a_bf16_model_is_one_error_line_naming_the_dtype_to_use(tmp_path, monkeypatch, capsys):
    """A local Llama folder now loads in its config's dtype (bf16 for Meta-Llama-3-8B); fine-tuning
    here needs float32, which `run` says in one `error:` line with exit status 2."""
    from icl import cli, models

    folder = models.write_random_llama3(tmp_path / "bf16", dtype="bfloat16")
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    code = cli.main(["run", "c2w_pretrained", "--model", str(folder), "--device", "cpu",
                     "--set", "ks=1", "--set", "n_contexts=2", "--set", "n_query=1", "--set", "steps=1",
                     "--set", "record=1", "--set", "lrs=0.001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [line for line in err if line.startswith("error:")] == [err[-1]]
    assert err[-1] == ("error: c2w_pretrained: fine-tuning here is done in float32, and the model is loaded in "
                       "bfloat16; run this experiment with --dtype float32")
    assert not list((tmp_path / "cache").rglob("meta.json"))  # nothing stored
