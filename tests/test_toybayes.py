import math

import numpy as np
import pytest
import torch

from icl.toybayes import RuleFamily, TinyGPT, answer_logprobs, exact_predictive, kl_per_example


def test_samples_follow_the_rule_up_to_noise():
    fam = RuleFamily(noise=0.0)
    tokens, h = fam.sample(50, 10, torch.Generator().manual_seed(0))
    a, b = fam.hypotheses[h, 0:1], fam.hypotheses[h, 1:2]
    assert torch.equal(tokens[:, 1::2], a * tokens[:, 0::2] + b)


def test_exact_predictive_by_hand():
    """Two hypotheses' worth of reasoning done by hand for a short noisy sequence."""
    fam = RuleFamily(slopes=(1, 2), intercepts=(0,), n_x=4, vocab=8, noise=0.2)
    tokens = torch.tensor([[2, 4, 3, 0]])  # (x=2, y=4): fits y = 2x, not y = x; then x = 3
    logp = exact_predictive(fam, tokens)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))
    # Example 1: no evidence, prior 1/2 each: P(y) = 1/2 [(0.8 1(y=2) + 0.025) + (0.8 1(y=4) + 0.025)]
    p1 = logp[0, 0].exp()
    assert p1[2].item() == pytest.approx(0.5 * 0.8 + 0.025) and p1[0].item() == pytest.approx(0.025)
    # Example 2: likelihoods of (2, 4): y=x gives 0.025, y=2x gives 0.825 -> posterior 0.025/0.85, 0.825/0.85
    post = torch.tensor([0.025, 0.825], dtype=torch.float64) / 0.85
    p2 = logp[0, 1].exp()
    assert p2[3].item() == pytest.approx(post[0] * 0.8 + 0.025)
    assert p2[6].item() == pytest.approx(post[1] * 0.8 + 0.025)


def test_kl_is_zero_for_the_exact_predictor_and_positive_otherwise():
    fam = RuleFamily()
    tokens, _ = fam.sample(8, 6, torch.Generator().manual_seed(1))
    exact = exact_predictive(fam, tokens)
    assert torch.allclose(kl_per_example(exact, exact), torch.zeros(8, 6, dtype=torch.float64), atol=1e-12)
    uniform = torch.full_like(exact, -math.log(fam.vocab))
    assert (kl_per_example(exact, uniform) > 0).all()


def test_model_shapes_and_causality():
    torch.manual_seed(0)
    m = TinyGPT(vocab=32, n_ctx=12)
    tokens = torch.randint(0, 32, (2, 12))
    out = answer_logprobs(m, tokens)
    assert out.shape == (2, 6, 32)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 32  # the last y cannot affect any prediction
    assert torch.allclose(answer_logprobs(m, changed), out)


def test_short_training_learns_something_and_is_deterministic(timing_keys):
    from icl import experiments, timing
    from icl.experiments import bayes_toy

    params = experiments.make_params(bayes_toy, {"steps": "120", "eval_every": "60", "n_eval": "64", "k": "6"})
    with timing.collect() as times:
        a, da = bayes_toy.compute(params)
        b, db = bayes_toy.compute(params)
    assert np.array_equal(a["kl_over_training"], b["kl_over_training"]) and da == db
    assert timing_keys(da) == [] and set(times) == {"train_seconds"}
    # After a little training the model beats the uniform guess, and the Bayes loss is a floor.
    assert da["model_ce_mean"] < da["log_vocab"]
    assert da["model_ce_mean"] > da["bayes_ce_mean"] - 0.05


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_finetune_on_pairs_is_each_copys_own_optimiser_run(optimizer):
    """Stacked copies with two step sizes move exactly as one torch.optim run per copy would (the fused
    kernel per run of equal step sizes, fed dense gradients, is the textbook update)."""
    from icl.toybayes import finetune_on_pairs, position0_logits, position0_params

    torch.manual_seed(0)
    net = TinyGPT(vocab=16, n_ctx=6, d_model=16, n_layers=1, n_heads=2, d_mlp=32)
    g = torch.Generator().manual_seed(1)
    N, k, m = 4, 5, 3
    x, y = torch.randint(0, 16, (N, k), generator=g), torch.randint(0, 16, (N, k), generator=g)
    queries = torch.randint(0, 16, (N, m), generator=g)
    lrs = torch.tensor([1e-2, 1e-2, 3e-2, 3e-2])
    preds, losses, moved = finetune_on_pairs(net, x, y, torch.ones(N, k), queries, lrs, 4, [0, 4], optimizer=optimizer)
    for n in range(N):
        own = {key: v.detach().clone()[None].requires_grad_(True) for key, v in position0_params(net).items()}
        opt = (torch.optim.Adam(own.values(), lr=float(lrs[n])) if optimizer == "adam"
               else torch.optim.SGD(own.values(), lr=float(lrs[n])))
        for _ in range(4):
            logp = torch.log_softmax(position0_logits(own, x[n:n + 1], 1), -1)
            loss = -logp.gather(-1, y[n:n + 1, :, None]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ref = torch.log_softmax(position0_logits(own, queries[n:n + 1], 1).double(), -1)[0]
        assert torch.allclose(preds[4][n], ref, atol=1e-5), n
        assert not torch.allclose(preds[4][n], preds[0][n], atol=1e-3)  # it did move
