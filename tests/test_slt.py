"""icl.slt against known learning coefficients, closed forms and planted answers."""

import math

import numpy as np
import pytest
import sympy as sp
import torch

from icl import slt

a, b, n = sp.symbols("a b n", positive=True)


def test_zeta_poles_give_known_learning_coefficients():
    assert slt.rlct_from_zeta(slt.zeta_of(a**2 * b**2, [a, b])) == (sp.Rational(1, 2), 2)
    assert slt.rlct_from_zeta(slt.zeta_of(a**2 * b**4, [a, b])) == (sp.Rational(1, 4), 1)
    for d in range(1, 5):
        assert slt.rlct_from_zeta(slt.regular_zeta(d)) == (sp.Rational(d, 2), 1)
    assert slt.rlct_from_zeta(slt.monomial_zeta((1, 2, 3))) == (sp.Rational(1, 6), 1)
    assert slt.rlct_from_zeta(slt.monomial_zeta((1, 1, 1))) == (sp.Rational(1, 2), 3)
    assert slt.monomial_rlct((1, 2, 3)) == (pytest.approx(1 / 6), 1)
    assert slt.monomial_rlct((2, 2)) == (0.25, 2)


def test_evidence_expansion_is_the_known_closed_form():
    Z = slt.evidence_expansion(slt.monomial_zeta((1, 1)), n=slt.N_SYM)
    known = sp.sqrt(sp.pi) / 4 * slt.N_SYM ** sp.Rational(-1, 2) * (sp.log(slt.N_SYM) + sp.EulerGamma + 2 * sp.log(2))
    assert sp.simplify(Z - known) == 0


def test_quadrature_matches_the_closed_form_to_machine_precision():
    ns = np.logspace(2, 8, 7)
    logZ = slt.log_evidence(lambda A, B: A**2 * B**2, ns)
    closed = np.log(math.sqrt(math.pi) / 4 / np.sqrt(ns) * (np.log(ns) + np.euler_gamma + 2 * math.log(2)))
    assert np.max(np.abs(logZ - closed)) < 1e-10
    # a wrong model is far off: the regular a² + b² decays like 1/n, not n^(-1/2) log n
    assert np.max(np.abs(slt.log_evidence(lambda A, B: A**2 + B**2, ns) - closed)) > 1.0


def test_plain_slope_is_biased_and_the_corrected_fit_is_not():
    ns = np.logspace(2, 8, 25)
    F = -slt.log_evidence(lambda A, B: A**2 * B**2, ns)
    plain = slt.fit_free_energy(ns, F)["lam"]
    corrected = slt.fit_free_energy(ns, F, loglog=-1.0, inv_log=True)["lam"]
    assert 0.40 < plain < 0.46
    assert abs(corrected - 0.5) < 0.005
    regular = -slt.log_evidence(lambda A, B: A**2 + B**2, ns)
    assert slt.fit_free_energy(ns, regular)["lam"] == pytest.approx(1.0, abs=1e-9)


def test_reduced_rank_regression_learning_coefficients():
    assert slt.rrr_rlct(1, 1, 1, 0) == (0.5, 2)              # y = b a x: the a²b² model
    assert slt.rrr_rlct(3, 3, 3, 3) == (4.5, 1)              # full rank: MN/2 (the GL(H) symmetry is flat)
    assert slt.rrr_rlct(3, 3, 3, 1) == (4.0, 1)
    assert slt.rrr_rlct(5, 3, 3, 2) == (6.5, 1)              # case N + H < M + r
    for M, N, H, r in [(4, 4, 2, 0), (5, 3, 3, 2), (2, 6, 3, 1), (3, 3, 3, 1)]:
        lam, _ = slt.rrr_rlct(M, N, H, r)
        assert 0 < lam <= H * (M + N) / 2
    with pytest.raises(ValueError):
        slt.rrr_rlct(3, 3, 2, 3)


def test_quadrature_target_equals_the_gaussian_closed_form():
    data, w_hat, _ = slt.linear_regression(2, 500, seed=3)
    x, y = data.x.numpy(), data.y.numpy()[:, 0]
    sxx, sxy = x.T @ x, x.T @ y
    beta, gamma = 1 / math.log(500), 2.0

    def nL(A, B):  # n (L_n(w) - L_n(0))
        return 0.5 * (sxx[0, 0] * A**2 + 2 * sxx[0, 1] * A * B + sxx[1, 1] * B**2) - sxy[0] * A - sxy[1] * B

    quad = slt.tempered_expectation(nL, 2, beta, gamma, half_width=6.0)
    closed = slt.gaussian_tempered_expectation(sxx / 500, w_hat.numpy(), np.zeros(2), 500, beta, gamma)
    assert quad == pytest.approx(closed, rel=1e-8)


def test_sgld_recovers_the_regular_learning_coefficient():
    torch.set_num_threads(1)
    _, w_hat, loss = slt.linear_regression(4, 10_000, seed=0)
    res = slt.sgld_llc(loss, w_hat, 10_000, num_chains=8, num_steps=6000, num_burnin=1000,
                       step_size=1e-4, gamma=1.0, seed=0)
    assert res.llc == pytest.approx(2.0, rel=0.12)           # λ = d/2
    assert res.loss_trace.shape == (8, 6000) and res.accepted_steps == 5000
    # a large step size inflates the estimate (discretisation bias): the test can tell
    big = slt.sgld_llc(loss, w_hat, 10_000, num_chains=8, num_steps=3000, num_burnin=500,
                       step_size=1.5e-3, gamma=1.0, seed=0)
    assert big.llc > 1.25 * res.llc


def test_sgld_hits_the_exact_target_on_a_singular_model():
    torch.set_num_threads(1)
    n = 10_000
    data, w0, loss = slt.monomial_regression((1, 1), n, seed=0)
    x, y = data.x.numpy()[:, 0], data.y.numpy()[:, 0]
    sxx, sxy = float(x @ x), float(x @ y)
    beta = 1 / math.log(n)
    target = slt.tempered_expectation(lambda A, B: 0.5 * sxx * (A * B) ** 2 - sxy * A * B, 2, beta, 1.0,
                                      half_width=8.0)
    res = slt.sgld_llc(loss, w0, n, num_chains=8, num_steps=8000, num_burnin=1000, step_size=1e-4,
                       gamma=1.0, seed=0)
    assert 0.3 < target < 0.45                                # below λ = 1/2 at this n (log log n bias)
    assert res.llc == pytest.approx(target, rel=0.2)


def test_sgld_is_deterministic_given_the_seed():
    _, w, loss = slt.reduced_rank_regression(3, 2, 2, 1, 500, seed=1)
    r1 = slt.sgld_llc(loss, w, 500, num_chains=2, num_steps=200, num_burnin=50, batch_size=32, seed=5)
    r2 = slt.sgld_llc(loss, w, 500, num_chains=2, num_steps=200, num_burnin=50, batch_size=32, seed=5)
    assert np.array_equal(r1.loss_trace, r2.loss_trace)
    r3 = slt.sgld_llc(loss, w, 500, num_chains=2, num_steps=200, num_burnin=50, batch_size=32, seed=6)
    assert not np.array_equal(r1.loss_trace, r3.loss_trace)


def test_full_batch_losses_equal_the_minibatch_formula_on_all_samples():
    for build in (lambda: slt.linear_regression(3, 200, 0), lambda: slt.monomial_regression((1, 2), 200, 0),
                  lambda: slt.reduced_rank_regression(3, 2, 2, 1, 200, 0)):
        _, w, loss = build()
        ws = w[None] + 0.3 * torch.randn(3, w.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        full = loss(ws, None)
        every = loss(ws, torch.arange(200))
        assert torch.allclose(full, every, rtol=1e-10, atol=1e-12)


def test_module_adapter_matches_the_flat_loss_and_recovers_d_over_2():
    torch.set_num_threads(1)
    n = 10_000
    data, w_hat, flat_loss = slt.linear_regression(3, n, seed=2)
    net = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w_hat[None])
    x, y = data.x, data.y

    def batch_loss(forward, idx):
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        return 0.5 * ((forward(xb) - yb) ** 2).mean()

    w_star, loss = slt.module_loss_fn(net, batch_loss)
    assert torch.equal(w_star, w_hat)
    ws = w_star[None] + 0.1 * torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss(ws, None), flat_loss(ws, None), rtol=1e-9)
    res = slt.sgld_llc(loss, w_star, n, num_chains=4, num_steps=2000, num_burnin=400, step_size=1e-4,
                       gamma=1.0, batch_size=None, seed=0)
    assert res.llc == pytest.approx(1.5, rel=0.2)


def test_grouped_chains_are_separate_estimates():
    """Datasets (or settings) run as groups of one batched chain: each group samples its own dataset
    with its own step size and localisation, and recovers what a run of its own recovers."""
    torch.set_num_threads(1)
    built = [slt.linear_regression(4, 10_000, seed=s) for s in range(3)]
    loss = slt.grouped_full_loss([b[0] for b in built], num_chains=4)
    ws = torch.stack([b[1] for b in built])
    res = slt.sgld_llc_groups(loss, ws, 10_000, num_chains=4, num_steps=5000, num_burnin=1000,
                              step_size=1e-4, gamma=1.0, seed=0)
    assert len(res) == 3 and all(r.llc == pytest.approx(2.0, rel=0.2) for r in res)
    for (_, w, own), r in zip(built, res):  # each group's starting loss is its own dataset's L_n(w*)
        assert r.init_loss == pytest.approx(float(own(w[None], None)[0]), rel=1e-12)
    # the grouped loss evaluates row g*C.. on dataset g
    w_rows = ws.repeat_interleave(4, 0) + 0.01
    expect = torch.cat([own(w_rows[4 * g:4 * g + 4], None) for g, (_, _, own) in enumerate(built)])
    assert torch.allclose(loss(w_rows, None), expect, rtol=1e-12)
    # per-group step sizes: the large one inflates its own group only (discretisation bias)
    _, w, one = built[0]
    small_big = slt.sgld_llc_groups(one, w[None].repeat(2, 1), 10_000, num_chains=4, num_steps=3000,
                                    num_burnin=500, step_size=[1e-4, 1.5e-3], gamma=1.0, seed=0)
    assert small_big[1].llc > 1.25 * small_big[0].llc
    with pytest.raises(ValueError):
        slt.grouped_full_loss([built[0][0], slt.monomial_regression((1,), 100, 0)[0]], 2)


# ------------------------------------------------------------------------------------ curvature controls

def _quadratic(d: int = 12, seed: int = 0):
    """A planted PSD Hessian and a loss whose per-sample Hessians average to it."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d, generator=gen, dtype=torch.float64)
    A = X.T @ X / 200  # [d, d]
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)

    def batch_loss(idx):  # ½ mean_i (x_i · w)² + a linear term (no effect on the Hessian)
        return 0.5 * ((X[idx] @ w) ** 2).mean() + w.sum()

    return X, A, w, batch_loss


def test_hutchinson_trace_is_unbiased_for_the_planted_hessian():
    X, A, w, batch_loss = _quadratic()
    est = slt.hutchinson_trace(batch_loss, [w], 200, num_probes=400, batch_size=50, seed=1)
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - float(torch.trace(A))) < 4 * se
    assert se < 0.05 * float(torch.trace(A))
    # with the whole sample and many probes the estimate is exact per probe on a diagonal Hessian
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    v = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    exact = slt.hutchinson_trace(lambda idx: 0.5 * v @ D @ v, [v], 1, num_probes=3, batch_size=1)
    assert np.allclose(exact, 15.0)


def test_power_iteration_finds_the_largest_eigenvalue():
    _, A, w, batch_loss = _quadratic()
    rq = slt.top_hessian_eigenvalue(lambda: batch_loss(torch.arange(200)), [w], iters=60, seed=0)
    top = float(torch.linalg.eigvalsh(A)[-1])
    assert rq[-1] == pytest.approx(top, rel=1e-3)
    assert rq[0] < rq[-1] + 1e-12  # the Rayleigh quotient only climbs towards it


def test_focused_nodes_resolve_a_narrow_peak_inside_the_interval():
    x, w = slt.focused_nodes(0.2, 1.0, 0.6)
    assert x.min() >= 0.2 and x.max() <= 1.0 and np.all(w > 0)
    assert w.sum() == pytest.approx(0.8, rel=1e-12)
    for s in (1e-2, 1e-4, 1e-6):  # ∫ exp(-(x-0.6)²/(2s²)) dx = s √(2π), whatever the width
        val = np.sum(w * np.exp(-(x - 0.6) ** 2 / (2 * s ** 2)))
        assert val == pytest.approx(s * math.sqrt(2 * math.pi), rel=1e-9)


def test_region_free_energy_of_a_gaussian_and_its_energy():
    """K = (a² + b²)/2 on [0, 1]²: Z_n → π/(2n) and E_n[K] → 1/n (two quadratic directions)."""
    nodes = slt.graded_nodes()
    ns = [1e3, 1e5]
    F, E = slt.region_free_energy(lambda a, b: 0.5 * (a ** 2 + b ** 2), nodes, nodes, ns)
    for n, f, e in zip(ns, F, E):
        assert f == pytest.approx(-math.log(math.pi / (2 * n)), abs=1e-9)
        assert e == pytest.approx(1 / n, rel=1e-9)
