"""In-context regression pieces (icl.regression): the estimators against their closed forms, the linear
self-attention layer that is one GD step, and the batched fine-tuning against a plain loop."""

import copy

import numpy as np
import pytest
import torch

from icl import regression as rg


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_noiseless_min_norm_least_squares_error_is_one_minus_k_over_d(k):
    d, n = 5, 10000
    t = rg.sample_tasks(n, k, d, 0.0, torch.Generator().manual_seed(k), dtype=torch.float64)
    err = rg.excess_error(rg.least_squares(t.X, t.y, t.Xq), t.yq, d)[:, 0]
    expected = rg.expected_least_squares_error(k, d)
    # ||P_perp w||^2 / d has variance 2 (d - k) / d^2 for Gaussian w; use 5 standard errors
    se = np.sqrt(2 * max(d - k, 0) / d**2 / n) + 1e-12
    assert abs(float(err.mean()) - expected) < 5 * se + 1e-9


def test_ridge_is_the_posterior_mean():
    d, k, sigma = 4, 6, 0.5
    t = rg.sample_tasks(3, k, d, sigma, torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(3):
        X, y = t.X[i], t.y[i]
        # posterior of w ~ N(0, I) given y = Xw + N(0, sigma^2): mean = (X^T X / s^2 + I)^-1 X^T y / s^2
        mean = torch.linalg.solve(X.T @ X / sigma**2 + torch.eye(d, dtype=X.dtype), X.T @ y / sigma**2)
        pred = rg.ridge(X[None], y[None], t.Xq[i:i + 1], sigma**2)[0]
        assert torch.allclose(pred, t.Xq[i] @ mean, atol=1e-12)


def test_best_gd_lr_minimises_error():
    t = rg.sample_tasks(500, 10, 5, 0.25, torch.Generator().manual_seed(0), dtype=torch.float64)
    best = rg.best_gd_lr(t.X, t.y, t.Xq, t.yq)
    err = lambda lr: float(((rg.gd_step(t.X, t.y, t.Xq, lr) - t.yq) ** 2).mean())
    assert err(best) <= min(err(best * 0.9), err(best * 1.1))


@pytest.mark.parametrize("lr", [0.05, 0.7, 2.0])
def test_constructed_lsa_equals_one_gd_step_to_float_precision(lr):
    d, k = 5, 9
    t = rg.sample_tasks(200, k, d, 0.25, torch.Generator().manual_seed(1), n_query=4, dtype=torch.float64)
    lsa = rg.gd_lsa(d, k, lr)
    with torch.no_grad():
        err = (lsa(t.X, t.y, t.Xq) - rg.gd_step(t.X, t.y, t.Xq, lr)).abs().max()
    assert err < 1e-12
    # and the GD step itself: w1 = (lr / k) X^T y
    w1 = lr / k * torch.einsum("nkd,nk->nd", t.X, t.y)
    assert torch.allclose(rg.gd_step(t.X, t.y, t.Xq, lr), torch.einsum("nmd,nd->nm", t.Xq, w1), atol=1e-12)


def test_context_becomes_a_weight_update_of_M_exactly():
    d, k, lr = 3, 6, 0.4
    t = rg.sample_tasks(5, k, d, 0.1, torch.Generator().manual_seed(2), n_query=7, dtype=torch.float64)
    lsa = rg.gd_lsa(d, k, lr)
    with torch.no_grad():
        in_context = lsa(t.X, t.y, t.Xq)
    for i in range(5):
        no_update = rg.lsa_no_context(lsa, t.Xq[i], lsa.M)
        assert no_update.abs().max() == 0  # without context the constructed layer predicts 0
        dM = rg.lsa_weight_update(lsa, t.X[i], t.y[i])
        assert torch.allclose(rg.lsa_no_context(lsa, t.Xq[i], dM), in_context[i], atol=1e-12)
        step = rg.gd_on_M(lsa, t.X[i], t.y[i], lr=k**2 / lr)
        assert torch.allclose(rg.lsa_no_context(lsa, t.Xq[i], step), in_context[i], atol=1e-12)
        # a different step size does not match: the identity is specific
        wrong = rg.gd_on_M(lsa, t.X[i], t.y[i], lr=0.5 * k**2 / lr)
        assert not torch.allclose(rg.lsa_no_context(lsa, t.Xq[i], wrong), in_context[i], atol=1e-3)


def test_trained_lsa_learns_a_gd_step():
    lsa, losses = rg.lsa_train(4, 8, 0.1, steps=600, lr=1e-2, batch=256, seed=0)
    P, Q = lsa.P.detach(), lsa.Q.detach()
    eff = float(P[4, 4] * torch.diagonal(Q[:4, :4]).mean())
    g = torch.Generator().manual_seed(5)
    cal = rg.sample_tasks(4000, 8, 4, 0.1, g)
    best = rg.best_gd_lr(cal.X, cal.y, cal.Xq, cal.yq)
    assert abs(eff - best) / best < 0.15
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:10])


def _tiny():
    torch.manual_seed(0)
    return rg.RegressionTransformer(rg.RegressionConfig(d=3, max_k=6, d_model=16, n_layers=2, n_heads=2))


def test_single_token_forward_matches_the_model():
    model = _tiny()
    N, B = 3, 5
    stacked = {k: v.detach()[None].repeat(N, *[1] * v.ndim) for k, v in model.named_parameters()}
    toks = torch.randn(N, B, 4)
    with torch.no_grad():
        ref = torch.stack([model(toks[n][:, None])[:, 0] for n in range(N)])
        got = rg.single_token_forward(model, stacked, toks)
    assert torch.allclose(got, ref, atol=1e-5)


def test_finetune_many_matches_a_plain_loop():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    t = rg.sample_tasks(2, 5, 3, 0.1, g, n_query=4)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    lrs = torch.tensor([0.05, 0.01])
    got = rg.finetune_many(model, t.X, t.y, mask, t.Xq, lrs, steps=7, record=[3, 7])
    for n in range(2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=float(lrs[n]))
        k = int(mask[n].sum())
        xs = torch.cat([t.X[n, :k], torch.zeros(k, 1)], -1)[:, None]
        for _ in range(7):
            loss = ((m(xs)[:, 0] - t.y[n, :k]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ref = m(torch.cat([t.Xq[n], torch.zeros(4, 1)], -1)[:, None])[:, 0]
        assert torch.allclose(got[7][n], ref, atol=1e-5)


def test_predict_reads_the_context():
    model = _tiny()
    t = rg.sample_tasks(2, 4, 3, 0.1, torch.Generator().manual_seed(0), n_query=3)
    with torch.no_grad():
        full = model.predict(t.X, t.y, t.Xq)
        # the same as appending each query after the context by hand
        for j in range(3):
            X = torch.cat([t.X, t.Xq[:, j:j + 1]], 1)
            y = torch.cat([t.y, torch.zeros(2, 1)], 1)
            assert torch.allclose(model.predict_all(X, y)[:, -1], full[:, j], atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_gd_path_closed_form_equals_a_plain_gradient_descent_loop(k):
    d = 5
    t = rg.sample_tasks(60, k, d, 0.25, torch.Generator().manual_seed(k), n_query=3, dtype=torch.float64)
    lrs = torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64)
    path = rg.gd_path(t.X, t.y, t.Xq, lrs, [1, 3, 7])  # [t, lr, n, m]
    assert path.shape == (3, 3, 60, 3)
    for li, lr in enumerate(lrs):
        w = torch.zeros(60, d, dtype=torch.float64)
        for step in range(1, 8):
            w = w - lr * torch.einsum("nkd,nk->nd", t.X, torch.einsum("nkd,nd->nk", t.X, w) - t.y) / k
            if step in (1, 3, 7):
                direct = torch.einsum("nmd,nd->nm", t.Xq, w)
                got = path[[1, 3, 7].index(step), li]
                assert torch.allclose(got, direct, rtol=1e-9, atol=1e-11), (k, float(lr), step)
    # one step is gd_step; many small steps reach min-norm least squares (GD from 0 stays in the row space)
    assert torch.allclose(path[0, 1], rg.gd_step(t.X, t.y, t.Xq, 0.1), atol=1e-12)
    if k != d:  # at k = d the slowest direction needs far more steps
        far = rg.gd_path(t.X, t.y, t.Xq, torch.tensor([0.05], dtype=torch.float64), [200_000])[0, 0]
        assert torch.allclose(far, rg.least_squares(t.X, t.y, t.Xq), rtol=1e-4, atol=1e-6)


def test_gd_path_relative_step_sizes_are_per_prompt_and_stable():
    t = rg.sample_tasks(200, 12, 5, 0.25, torch.Generator().manual_seed(0), dtype=torch.float64)
    lam_max = torch.linalg.eigvalsh(t.X.transpose(1, 2) @ t.X / 12)[:, -1]
    rel = rg.gd_path(t.X, t.y, t.Xq, torch.tensor([0.5, 1.5], dtype=torch.float64), [1, 20_000], relative=True)
    assert torch.allclose(rel[0, 0], rg.gd_step(t.X, t.y, t.Xq, (0.5 / lam_max)[:, None]), atol=1e-12)
    assert torch.allclose(rel[1, 1], rg.least_squares(t.X, t.y, t.Xq), rtol=1e-4, atol=1e-6)  # stable: converges


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_hill_tail_index_recovers_a_planted_power_law(alpha):
    rng = np.random.default_rng(0)
    v = (1 - rng.random(200_000)) ** (-1 / alpha)  # Pareto: P(V > v) = v^-alpha for v >= 1
    est = rg.hill_tail_index(v, 2000)
    assert abs(est - alpha) < 4 * alpha / np.sqrt(2000)
    with pytest.raises(ValueError):
        rg.hill_tail_index(v, 0)


def test_prediction_gap_is_the_squared_difference_over_d():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(rg.prediction_gap(a, b, 2), torch.tensor([0.5, 2.0]))
