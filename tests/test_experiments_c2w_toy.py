"""The c2w_toy experiment at small settings (a briefly trained rule-family model in a temporary cache),
the position-0 fine-tuning it rests on, and the committed result."""

import dataclasses

import numpy as np
import pytest
import torch

from icl import experiments
from icl.cache import Cache
from icl.config import Config
from icl.experiments import bayes_toy, c2w_toy
from icl.toybayes import TinyGPT, finetune_on_pairs, position0_logits, position0_params

TOY = dict(steps=60, eval_every=30, n_eval=32, k=6)
SMALL = dict(ks=("1", "3"), opts=("sgd:0", "sgd:0.5", "adam:0.01"), steps=6, record=("1", "6"), n_contexts=6)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    p = dataclasses.replace(bayes_toy.Params(), **TOY)
    arrays, data = bayes_toy.compute(p)
    inputs = experiments.key_inputs(bayes_toy, p, Config())
    return Cache(tmp_path_factory.mktemp("cache")).store(inputs, arrays, data)


@pytest.fixture(scope="module")
def small_run(upstream):
    p = dataclasses.replace(c2w_toy.Params(), **SMALL)
    return c2w_toy.compute(p, upstream={"bayes_toy": upstream}), c2w_toy.compute(p, upstream={"bayes_toy": upstream})


def test_the_model_is_the_one_the_upstream_entry_measured(upstream, small_run):
    """c2w_toy reads bayes_toy's weights from its entry: the loaded model gives, bit for bit, the
    predictions bayes_toy stored for its example sequence, and c2w_toy records which entry it read."""
    from icl.toybayes import answer_logprobs

    bp = bayes_toy.Params(**upstream.key_inputs["params"])
    net = bayes_toy.load_net(bp, upstream.arrays)
    show = torch.from_numpy(upstream.arrays["show_k"]).long()
    with torch.no_grad():
        got = answer_logprobs(net, torch.from_numpy(upstream.arrays["show_tokens"])[None])[0, show - 1].exp()
    assert np.array_equal(got.numpy(), upstream.arrays["show_model"])
    (_, data), _ = small_run
    assert data["bayes_toy_entry"] == upstream.key[:16]


def test_learning_rate_zero_gives_the_no_context_prediction(small_run):
    (arrays, data), _ = small_run
    assert arrays["gap"].shape == (2, 3, 2)  # [k, optimizer setting, recorded step]
    # sgd:0 never moves: its fine-tuned prediction is T_w(x), so both KLs equal the no-update ones
    assert np.allclose(arrays["gap"][:, 0], arrays["gap_no_update"][:, None], rtol=1e-6)
    assert np.allclose(arrays["finetune_exact"][:, 0], arrays["no_context_exact"][:, None], rtol=1e-6)
    assert np.allclose(arrays["train_loss"][:, 0, 0], arrays["train_loss"][:, 0, 1])
    # real steps fit the context pairs and move the prediction
    assert np.all(arrays["train_loss"][:, 1:, 1] < arrays["train_loss"][:, 1:, 0])
    assert not np.allclose(arrays["gap"][:, 1:], arrays["gap_no_update"][:, None, None])


def test_deterministic(small_run, timing_keys):
    (a1, d1), (a2, d2) = small_run
    for key in a1:
        assert np.array_equal(a1[key], a2[key], equal_nan=True), key
    assert d1 == d2 and timing_keys(d1) == []  # timings go to provenance (icl.timing), not results


def test_position0_forward_is_the_model_on_a_lone_pair():
    torch.manual_seed(1)
    net = TinyGPT(32, 12).eval()
    x = torch.arange(8)
    ref = net(torch.stack([x, torch.full_like(x, 5)], 1))[:, 0]
    stacked = {k: v[None] for k, v in position0_params(net).items()}
    assert torch.allclose(position0_logits(stacked, x[None], 2)[0], ref, atol=1e-5)


def test_adam_matches_torch_on_the_full_model():
    """One copy fine-tuned by finetune_on_pairs equals the module trained with torch.optim.Adam on all
    parameters (queries and keys get no gradient from a lone position-0 prediction)."""
    torch.manual_seed(2)
    net = TinyGPT(32, 12)
    X, Y = torch.tensor([[1, 4, 6]]), torch.tensor([[3, 9, 13]])
    q = torch.arange(8)[None]
    out, _, _ = finetune_on_pairs(net, X, Y, torch.ones(1, 3), q, torch.tensor([0.01]), 5, [5], optimizer="adam")
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(5):
        logp = torch.log_softmax(net(torch.stack([X[0], Y[0]], 1))[:, 0], -1)
        loss = -logp.gather(-1, Y[0, :, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = torch.log_softmax(net(torch.stack([q[0], q[0]], 1))[:, 0].double(), -1)
    assert torch.allclose(out[5][0], ref, atol=1e-4)
    assert (out[5][0] - ref).abs().max() < 1e-4


def test_params_are_validated():
    with pytest.raises(ValueError):
        dataclasses.replace(c2w_toy.Params(), opts=("rmsprop:0.1",)).validate()
    with pytest.raises(ValueError):
        dataclasses.replace(c2w_toy.Params(), ks=("16",)).validate()
    p = c2w_toy.Params()
    assert c2w_toy.content_digest(p) != c2w_toy.content_digest(dataclasses.replace(p, seed=1))


def test_committed_result():
    """The cached run read the committed bayes_toy model; in context it is closer to the exact
    posterior than without context, and closer than any fine-tuned prediction of the sweep."""
    entry, _ = experiments.run("c2w_toy", Config(cache_mode="readonly"))
    A, D = entry.arrays, entry.data
    toy, _ = experiments.run("bayes_toy", Config(cache_mode="readonly"))
    assert D["bayes_toy_entry"] == toy.key[:16]
    assert np.all(A["icl_exact"] < 0.2 * A["no_context_exact"])
    best_ft = np.nanmin(A["finetune_exact"], axis=(1, 2))  # over optimizer settings and step counts
    assert np.all(A["icl_exact"] < best_ft)
    # the control reaches the in-context predictions: a nearby weight change exists
    assert np.all(A["distil.gap"][:, -1] < 1e-3)
    assert np.all(A["distil.delta"][:, -1] < 0.2 * A["weight_norm"])
