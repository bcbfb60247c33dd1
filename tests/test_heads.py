"""Head scores (icl.heads) on a hand-built model whose heads are known: the previous-token head and the
induction head must come out on top, with the same functions chapter 7 uses."""

import math

import pytest
import torch

from icl import heads, toymodels as tm


@pytest.fixture(scope="module")
def planted():
    model = tm.planted_induction_model(vocab=16, n_ctx=32, n_heads=3, seed=0)
    g = torch.Generator().manual_seed(1)
    # a start token (15), then random tokens without repeats inside a copy, twice: every query in the
    # second copy has exactly one target. (At position 0 the previous-token head can only attend to
    # itself, so the start token must not recur.)
    first = torch.stack([torch.randperm(15, generator=g)[:12] for _ in range(16)])
    tokens = torch.cat([torch.full((16, 1), 15), first, first], dim=1)
    with torch.no_grad():
        logits, cache = model(tokens, return_cache=True)
    return model, tokens, logits, cache


def scores_of(model, tokens, cache):
    L = model.cfg.n_layers
    prev = torch.stack([heads.previous_token_score(cache["pattern"][i]) for i in range(L)])
    prefix = torch.stack([heads.prefix_matching_score(cache["pattern"][i], tokens) for i in range(L)])
    copy = torch.stack([heads.copying_score(model.W_E, model.W_V[i], model.W_O[i], model.W_U) for i in range(L)])
    return prev, prefix, copy


def test_planted_model_does_induction(planted):
    model, tokens, logits, _ = planted
    loss = tm.next_token_loss(logits, tokens, "none")
    # first copy (tokens 1..12): nothing to copy from; second copy (tokens 14..24, after its first
    # token): predicted from the first copy. loss[:, t] is the loss of token t + 1.
    assert loss[:, :12].mean() > math.log(16) * 0.9
    assert loss[:, 13:].mean() < 0.01


def test_previous_token_head_ranked_first(planted):
    model, tokens, _, cache = planted
    prev, _, _ = scores_of(model, tokens, cache)
    ranking = heads.rank_heads(prev)
    assert ranking[0][:2] == (0, 0)
    assert ranking[0][2] > 0.95 and ranking[1][2] < 0.5


def test_induction_head_ranked_first_by_prefix_matching(planted):
    model, tokens, _, cache = planted
    _, prefix, _ = scores_of(model, tokens, cache)
    ranking = heads.rank_heads(prefix)
    assert ranking[0][:2] == (1, 0)
    assert ranking[0][2] > 0.95 and ranking[1][2] < 0.5
    # the previous-token head attends one step back, not to the token after the earlier occurrence
    assert prefix[0, 0] < 0.2


def test_copying_score_of_planted_heads(planted):
    model, tokens, _, cache = planted
    _, _, copy = scores_of(model, tokens, cache)
    assert copy[1, 0] > 0.99  # copies what it attends to, into the logits
    assert copy[0, 0] == 0  # writes to the previous-token block, which the unembedding does not read
    others = [copy[layer, h].item() for layer in range(2) for h in range(1, 3)]
    assert max(abs(c) for c in others) < 0.9
    # the d_head x d_head shortcut gives the eigenvalue score of the full vocab x vocab circuit
    full = torch.stack([heads.copying_score_of_circuit(model.ov_circuit(i)) for i in range(2)])
    assert torch.allclose(full, copy, atol=1e-5)


def test_negative_copying_head_scores_minus_one():
    V, d = 8, 8
    W_E, W_U = torch.eye(V, d), torch.eye(d, V)
    W_V = torch.eye(d)[None]
    W_O = -torch.eye(d)[None]
    assert heads.copying_score(W_E, W_V, W_O, W_U).item() == pytest.approx(-1.0)


def test_pattern_scores_on_hand_written_patterns():
    T = 6
    prev = torch.zeros(1, 2, T, T)
    prev[0, 0, 0, 0] = 1
    for q in range(1, T):
        prev[0, 0, q, q - 1] = 1
    prev[0, 1] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # uniform causal
    s = heads.previous_token_score(prev)
    assert s[0] == 1.0
    assert s[1] == pytest.approx(sum(1 / (q + 1) for q in range(1, T)) / (T - 1))
    tokens = torch.tensor([[5, 6, 7, 5, 6, 7]])
    induction = torch.zeros(1, 1, T, T)
    for q in range(T):
        induction[0, 0, q, q - 2 if q >= 3 else 0] = 1  # q = 3 (token 5) attends to key 1 (after the first 5)
    assert heads.prefix_matching_score(induction, tokens).item() == pytest.approx(1.0)
    assert heads.prefix_matching_score(prev[:, :1], tokens).item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        heads.prefix_matching_score(induction, torch.tensor([[0, 1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError):
        heads.previous_token_score(torch.zeros(2, 3, 4))
