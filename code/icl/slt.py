"""Singular learning theory on models small enough to check: learning coefficients, exactly and by sampling.

Context. Bayesian learning with ``n`` samples weighs a region of parameter space by its *evidence*
``Z_n = ∫ φ(w) exp(-n L_n(w)) dw``; its negative logarithm is the *free energy* ``F_n``. For a regular
model (identifiable, with a positive-definite Fisher information) Laplace's method gives
``F_n ≈ n L_n(w*) + (d/2) log n``: every parameter costs half a nat per e-fold of data. Neural
networks are not regular: many parameters give the same function, the Fisher information is
degenerate, and Watanabe's theorem replaces ``d/2`` by the *real log canonical threshold* (RLCT, the
learning coefficient) ``λ ≤ d/2`` and adds a ``-(m-1) log log n`` term, where ``m`` is its
multiplicity [Watanabe 2009]:

    F_n = n L_n(w*) + λ log n − (m − 1) log log n + O_p(1).

Intuition. ``λ`` measures how fast the volume of near-optimal parameters shrinks:
``vol{w : K(w) < ε} ∝ ε^λ (−log ε)^(m−1)`` where ``K`` is the KL divergence from the truth. A flat
direction costs nothing, a quadratic one costs 1/2, a quartic one 1/4. Everything here makes that
statement checkable on small models:

* **Zeta functions** (SymPy). ``ζ(z) = ∫ K(w)^z φ(w) dw`` is analytic for ``Re z > 0`` and continues
  to a meromorphic function whose largest pole is ``−λ`` with order ``m``. For a monomial
  ``K = ∏ w_i^(2 k_i)`` on ``[0, 1]^d`` it is ``∏ 1 / (2 k_i z + 1)``: :func:`zeta_of`, :func:`rlct_from_zeta`.
  The Mellin transform of ``Z(n) = ∫ exp(−n K) φ`` is ``Γ(s) ζ(−s)``, so the residues of
  ``Γ(s) ζ(−s) n^(−s)`` at the positive poles give the full asymptotic expansion of ``Z_n``
  (:func:`evidence_expansion`); for ``K = a² b²`` that is ``(√π/4) n^(−1/2) (log n + γ + 2 log 2)``.
* **Quadrature** (NumPy). For two-parameter models ``Z_n`` is a 2-D integral whose mass sits within
  ``n^(−1/2)`` (or ``n^(−1/4)``) of the axes; Gauss–Legendre panels graded geometrically towards 0
  resolve every scale at once (:func:`graded_nodes`, :func:`log_evidence`), to ~1e-12 relative error.
* **Reduced-rank regression**: the closed-form RLCT of Aoyagi & Watanabe (2005) (:func:`rrr_rlct`).
* **SGLD estimation of the local learning coefficient** (torch): the estimator of Lau et al. (2023),
  ``λ̂(w*) = nβ (E_β[L_n(w)] − L_n(w*))`` with ``β = 1/log n``, the expectation taken over a posterior
  tempered by ``β`` and localised around ``w*`` by a Gaussian of precision ``γ``, sampled by stochastic
  gradient Langevin dynamics (:func:`sgld_llc`). Chains run in parallel as a leading batch dimension of
  the parameter tensor, so a loss function maps ``[chains, d]`` parameters to ``[chains]`` losses.
  For models with at most three parameters the same localised tempered expectation can be computed
  exactly by quadrature (:func:`tempered_expectation`), which separates sampler error from the
  finite-``n`` bias of the estimator itself. :func:`module_loss_fn` adapts any ``nn.Module`` (for
  example a checkpoint of a transformer trained here) to the estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import sympy as sp
import torch

# ----------------------------------------------------------------------------------------------- symbolic

Z_SYM = sp.Symbol("z")
S_SYM = sp.Symbol("s", positive=True)
N_SYM = sp.Symbol("n", positive=True)


def zeta_of(K: sp.Expr, variables: Sequence[sp.Symbol], z: sp.Symbol = Z_SYM) -> sp.Expr:
    """``ζ(z) = ∫_[0,1]^d K(w)^z dw`` computed by SymPy for ``Re z > 0`` (a rational function of ``z``
    for monomial ``K``); the uniform prior on ``[−1, 1]^d`` of an even ``K`` gives the same integral."""
    zp = sp.Symbol("zp", positive=True)
    pos = {v: sp.Symbol(v.name, positive=True) for v in variables}
    integrand = sp.powdenest(sp.expand_power_base(K.subs(pos) ** zp, force=True), force=True)
    out = integrand
    for v in pos.values():
        out = sp.integrate(out, (v, 0, 1), conds="none")
    return sp.simplify(out.subs(zp, z))


def monomial_zeta(powers: Sequence[int], z: sp.Symbol = Z_SYM) -> sp.Expr:
    """``ζ`` of ``K = ∏ w_i^(2 k_i)`` on ``[0, 1]^d`` with a uniform prior: ``∏ 1/(2 k_i z + 1)``."""
    out = sp.Integer(1)
    for k in powers:
        out *= 1 / (2 * sp.Integer(k) * z + 1)
    return out


def regular_zeta(d: int | sp.Symbol, z: sp.Symbol = Z_SYM) -> sp.Expr:
    """``ζ`` of ``K = |w|²`` on the unit ball of ``R^d`` (uniform prior, up to the ball's volume): in
    polar coordinates ``∫_0^1 r^(2z) r^(d−1) dr = 1/(2z + d)``."""
    r = sp.Symbol("r", positive=True)
    zp = sp.Symbol("zp", positive=True)
    return sp.simplify(sp.integrate(r ** (2 * zp) * r ** (d - 1), (r, 0, 1), conds="none").subs(zp, z))


def poles(zeta: sp.Expr, z: sp.Symbol = Z_SYM) -> dict[sp.Expr, int]:
    """Poles of a rational ``ζ(z)`` with their orders."""
    num, den = sp.fraction(sp.together(sp.simplify(zeta)))
    roots = sp.roots(sp.Poly(den, z))
    return {r: k for r, k in roots.items() if sp.simplify(num.subs(z, r)) != 0}


def rlct_from_zeta(zeta: sp.Expr, z: sp.Symbol = Z_SYM) -> tuple[sp.Expr, int]:
    """``(λ, m)``: minus the largest pole of ``ζ`` and its order."""
    p = poles(zeta, z)
    top = max(p, key=lambda r: float(r))
    return -top, p[top]


def evidence_expansion(zeta: sp.Expr, z: sp.Symbol = Z_SYM, n: sp.Symbol = N_SYM) -> sp.Expr:
    """Asymptotic expansion of ``Z(n) = ∫ exp(−n K) φ`` from the Mellin pair ``Γ(s) ζ(−s)``:
    ``Z(n) ≈ −Σ Res_{s = s_j > 0} Γ(s) ζ(−s) n^(−s)`` over the poles ``s_j = −(poles of ζ)``."""
    s = sp.Symbol("s")
    f = sp.gamma(s) * zeta.subs(z, -s) * n ** (-s)
    total = sp.Integer(0)
    for pole in poles(zeta, z):
        total += -sp.residue(f, s, -pole)
    return sp.simplify(sp.expand(total))


def rrr_rlct(M: int, N: int, H: int, r: int) -> tuple[float, int]:
    """RLCT ``(λ, m)`` of reduced-rank regression ``y = B A x`` (``A: H×M``, ``B: N×H``) at a true
    matrix of rank ``r ≤ H`` (Aoyagi & Watanabe 2005)."""
    if not 0 <= r <= H:
        raise ValueError("need 0 <= r <= H")
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        val = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        if (M + H + N + r) % 2 == 0:
            return val / 8, 1
        return (val + 1) / 8, 2
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2, 1
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2, 1
    return M * N / 2, 1  # M + N < H + r


# --------------------------------------------------------------------------------------------- quadrature

def graded_nodes(lo_exp: float = -14.0, ratio: float = 2.0, order: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on ``[0, 1]`` in panels ``[ρ^(k+1), ρ^k]`` graded geometrically
    towards 0 (down to ``10^lo_exp``, plus one panel ``[0, 10^lo_exp]``), so that an integrand varying
    on any scale ``≥ 10^lo_exp`` near 0 is resolved. Returns ``x [N]``, ``w [N]``."""
    g, gw = np.polynomial.legendre.leggauss(order)
    edges = [1.0]
    while edges[-1] > 10.0 ** lo_exp:
        edges.append(edges[-1] / ratio)
    edges.append(0.0)
    xs, ws = [], []
    for hi, lo in zip(edges[:-1], edges[1:]):
        xs.append(lo + (hi - lo) * (g + 1) / 2)
        ws.append(gw * (hi - lo) / 2)
    return np.concatenate(xs), np.concatenate(ws)


def symmetric_nodes(half_width: float = 1.0, **kw) -> tuple[np.ndarray, np.ndarray]:
    """:func:`graded_nodes` mirrored onto ``[−h, h]`` (graded towards 0 from both sides)."""
    x, w = graded_nodes(**kw)
    return np.concatenate([-x[::-1], x]) * half_width, np.concatenate([w[::-1], w]) * half_width


def _logsumexp(v: np.ndarray, axis=None) -> np.ndarray:
    m = np.max(v, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(v - m), axis=axis, keepdims=True))).squeeze(axis)


def log_evidence(K: Callable[[np.ndarray, np.ndarray], np.ndarray], ns: Sequence[float],
                 nodes: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``log Z_n = log ∫_[0,1]² exp(−n K(a, b)) da db`` for each ``n`` — the evidence of an even ``K``
    under the uniform prior on ``[−1, 1]²``. Returns ``[len(ns)]``."""
    x, w = nodes if nodes is not None else graded_nodes()
    A, B = np.meshgrid(x, x, indexing="ij")  # [N, N]
    kk = K(A, B)
    logw = np.log(w)[:, None] + np.log(w)[None, :]
    return np.array([_logsumexp(-n * kk + logw) for n in ns])


def fit_free_energy(ns: np.ndarray, F: np.ndarray, loglog: bool | float = False,
                    inv_log: bool = False) -> dict[str, float]:
    """Least-squares fit of ``F_n`` against ``log n``.

    ``loglog=False``: ``F = λ log n + c`` (the plain slope). ``loglog=True``: ``F = λ log n + μ log log n
    + c`` with ``μ`` free (``μ = −(m − 1)`` in theory). A number: ``μ`` fixed to that value.
    ``inv_log=True`` adds a ``d / log n`` column, the next term of ``log(log n + c₀)`` when the
    ``log log n`` term carries a constant (it does for ``a² b²``: ``log(log n + γ + 2 log 2)``)."""
    L = np.log(np.asarray(ns, dtype=float))
    F = np.asarray(F, dtype=float)
    cols, names, target = [L, np.ones_like(L)], ["lam", "c"], F.copy()
    mu = 0.0
    if loglog is True:
        cols.append(np.log(L))
        names.append("mu")
    elif loglog is not False:
        mu = float(loglog)
        target = F - mu * np.log(L)
    if inv_log:
        cols.append(1 / L)
        names.append("d")
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), target, rcond=None)
    out = {"mu": mu, "d": 0.0}
    out.update({k: float(v) for k, v in zip(names, coef)})
    return out


def tempered_expectation(nL: Callable[..., np.ndarray], d: int, beta: float, gamma: float,
                         half_width: float = 1.0, even: bool = False, **node_kw) -> float:
    """Exact ``β E[nL(w)]`` under ``p(w) ∝ exp(−β nL(w) − γ|w|²/2)`` on ``[−h, h]^d`` (``d ≤ 3``,
    centred at ``w* = 0``) by graded product quadrature, where ``nL(w) = n (L_n(w) − L_n(0))`` takes
    one coordinate array per parameter. This is what :func:`sgld_llc` estimates for a model localised
    at the origin, so comparing the two isolates the sampler's error. ``even=True``: ``nL`` is even in
    every coordinate (a population loss), and the positive orthant suffices."""
    if not 1 <= d <= 3:
        raise ValueError("product quadrature is for d <= 3")
    if even:
        x, w = graded_nodes(**node_kw)
        x, w = x * half_width, w * half_width
    else:
        x, w = symmetric_nodes(half_width, **node_kw)
    grids = np.meshgrid(*([x] * d), indexing="ij")  # d arrays [N]*d
    e = nL(*grids)
    logp = -beta * e - gamma * sum(g ** 2 for g in grids) / 2
    for axis in range(d):
        shape = [1] * d
        shape[axis] = -1
        logp = logp + np.log(w).reshape(shape)
    p = np.exp(logp - logp.max())
    return float(beta * (p * e).sum() / p.sum())


def gaussian_tempered_expectation(sxx: np.ndarray, w_hat: np.ndarray, w_star: np.ndarray, n: int,
                                  beta: float, gamma: float) -> float:
    """Closed form of the same target for linear regression (``L_n`` quadratic with Hessian ``sxx``
    and minimiser ``w_hat``), localised at ``w_star``: the tempered posterior is Gaussian."""
    P = n * beta * sxx + gamma * np.eye(len(w_hat))  # posterior precision [d, d]
    mu = np.linalg.solve(P, n * beta * sxx @ w_hat + gamma * w_star)
    cov = np.linalg.inv(P)

    def excess(v: np.ndarray) -> float:  # L_n(v) - L_n(w_hat)
        return 0.5 * float((v - w_hat) @ sxx @ (v - w_hat))

    mean_excess = 0.5 * float(np.trace(sxx @ cov)) + excess(mu)
    return n * beta * (mean_excess - excess(w_star))


# ------------------------------------------------------------------------------------------ SGLD estimator

LossFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class LLCResult:
    llc: float                 # mean over chains
    llc_chains: np.ndarray     # [chains] one estimate per chain
    loss_trace: np.ndarray     # [chains, steps] L at every step (full batch or minibatch)
    init_loss: float           # L_n(w*)
    nbeta: float               # n β
    accepted_steps: int        # steps after burn-in used in the estimate

    @property
    def spread(self) -> float:
        """Standard deviation of the per-chain estimates."""
        return float(self.llc_chains.std(ddof=1)) if len(self.llc_chains) > 1 else float("nan")


def sgld_llc(loss_fn: LossFn, w_star: torch.Tensor, n: int, *, num_chains: int = 4, num_steps: int = 2000,
             num_burnin: int = 500, step_size: float = 1e-4, gamma: float = 100.0, beta: float | None = None,
             batch_size: int | None = None, seed: int = 0) -> LLCResult:
    """Local learning coefficient at ``w_star`` by SGLD (Lau et al. 2023).

    ``loss_fn(w, idx)`` returns the mean loss (negative log-likelihood per sample, up to a constant)
    of each chain's parameters ``w [chains, d]`` on the samples ``idx`` (``None``: all ``n``), shape
    ``[chains]``. Each step draws (when ``batch_size`` is set) one minibatch shared by the chains and
    moves every chain by

        Δw = −(ε/2) (nβ ∇L_m(w) + γ (w − w*)) + N(0, ε),

    Langevin dynamics for ``exp(−nβ L_n(w) − γ|w − w*|²/2)``. The estimate is
    ``nβ (mean of L over post-burn-in steps − L_n(w*))`` per chain. :func:`sgld_llc_groups` runs
    several such estimates (other datasets, step sizes or localisations) as one batch of chains.
    """
    return sgld_llc_groups(loss_fn, w_star[None], n, num_chains=num_chains, num_steps=num_steps,
                           num_burnin=num_burnin, step_size=step_size, gamma=gamma, beta=beta,
                           batch_size=batch_size, seed=seed)[0]


def sgld_llc_groups(loss_fn: LossFn, w_star: torch.Tensor, n: int, *, num_chains: int = 4,
                    num_steps: int = 2000, num_burnin: int = 500, step_size: float | Sequence[float] = 1e-4,
                    gamma: float | Sequence[float] = 100.0, beta: float | None = None,
                    batch_size: int | None = None, seed: int = 0) -> list[LLCResult]:
    """:func:`sgld_llc` for ``G`` groups of ``num_chains`` chains at once, one result per group.

    Group ``g`` starts at ``w_star[g]`` (``w_star`` ``[G, d]``) and moves with its own step size and
    localisation (``step_size``, ``gamma``: one value, or one per group). ``loss_fn`` receives all
    chains, ``w [G * num_chains, d]``, rows ``g * num_chains .. (g + 1) * num_chains - 1`` belonging to
    group ``g`` (so a loss can read another dataset per group), and the minibatch (shared by all
    groups). Each step is one loss and one gradient for every chain of every group: where a step costs
    little compute, as for the calibration models, running the groups together divides the time by
    about ``G``."""
    if beta is None:
        beta = 1.0 / math.log(n)
    G = w_star.shape[0]
    C = num_chains
    eps = torch.as_tensor(np.broadcast_to(np.asarray(step_size, dtype=np.float64), (G,)).copy())
    gam = torch.as_tensor(np.broadcast_to(np.asarray(gamma, dtype=np.float64), (G,)).copy())
    eps_rows, gam_rows = eps.repeat_interleave(C)[:, None], gam.repeat_interleave(C)[:, None]  # [G*C, 1]
    gen = torch.Generator().manual_seed(seed)
    w0 = w_star.detach().to(torch.float64).repeat_interleave(C, dim=0)  # [G*C, d]
    d = w0.shape[1]
    w = w0.clone()
    nbeta = n * beta
    with torch.no_grad():
        init = loss_fn(w0, None).reshape(G, C)[:, 0].numpy().copy()  # L_n(w*) per group
    trace = np.empty((G * C, num_steps))
    for t in range(num_steps):
        idx = None if batch_size is None else torch.randint(0, n, (batch_size,), generator=gen)
        w.requires_grad_(True)
        loss = loss_fn(w, idx)  # [G*C]
        (grad,) = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            noise = torch.randn(G * C, d, generator=gen, dtype=w.dtype)
            w = w - 0.5 * eps_rows * (nbeta * grad + gam_rows * (w - w0)) + torch.sqrt(eps_rows) * noise
        trace[:, t] = loss.detach().numpy()
    out = []
    for g in range(G):
        used = trace[g * C:(g + 1) * C, num_burnin:]
        per_chain = nbeta * (used.mean(axis=1) - init[g])
        out.append(LLCResult(float(per_chain.mean()), per_chain, trace[g * C:(g + 1) * C], float(init[g]),
                             nbeta, used.shape[1]))
    return out


def module_loss_fn(model: torch.nn.Module,
                   batch_loss: Callable[[Callable[..., torch.Tensor], "torch.Tensor | None"], torch.Tensor]
                   ) -> tuple[torch.Tensor, LossFn]:
    """Adapt a ``torch.nn.Module`` to :func:`sgld_llc`: its parameters become one flat vector.

    ``batch_loss(forward, idx)`` must return the mean loss (a scalar) of the model on the samples
    ``idx`` (``None``: all), calling ``forward(*inputs)`` in place of ``model(*inputs)``; ``forward`` runs
    the module with the parameters of one chain (``torch.func.functional_call``). Returns the current
    parameters flattened, ``w* [d]`` (float64), and the loss function, which loops over chains.
    """
    named = [(k, v) for k, v in model.named_parameters()]
    shapes = [v.shape for _, v in named]
    sizes = [v.numel() for _, v in named]
    dtype = named[0][1].dtype
    w_star = torch.cat([v.detach().reshape(-1) for _, v in named]).to(torch.float64)

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [chains, d] -> [chains]
        out = []
        for c in range(w.shape[0]):
            pieces = torch.split(w[c].to(dtype), sizes)
            params = {k: p.reshape(shape) for (k, _), p, shape in zip(named, pieces, shapes)}

            def forward(*args: object, _params: dict = params, **kw: object) -> torch.Tensor:
                return torch.func.functional_call(model, _params, args, kw)

            out.append(batch_loss(forward, idx))
        return torch.stack(out).to(w.dtype)

    return w_star, loss


# ------------------------------------------------------------------------------------- calibration models

@dataclass
class RegressionData:
    """``y = f_{w0}(x) + N(0, 1)`` samples as float64 tensors: ``x [n, M]``, ``y [n, N]``; ``stats``: the
    sufficient statistics the full-sample loss is computed from, and ``full_loss(w, stats)`` that loss
    (so that several datasets can be evaluated in one batch: :func:`grouped_full_loss`)."""
    x: torch.Tensor
    y: torch.Tensor
    stats: dict[str, torch.Tensor] | None = None
    full_loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return self.x.shape[0]


def grouped_full_loss(datasets: Sequence[RegressionData], num_chains: int) -> LossFn:
    """One loss for :func:`sgld_llc_groups` over several datasets of one model family: rows ``g *
    num_chains ..`` of ``w`` are evaluated on ``datasets[g]`` (full sample only: the statistics of every
    dataset are stacked, one row per chain)."""
    first = datasets[0]
    if any(d.stats is None or d.full_loss is None or d.full_loss is not first.full_loss for d in datasets):
        raise ValueError("grouped datasets need sufficient statistics of one model family")
    stats = {k: torch.stack([d.stats[k] for d in datasets]).repeat_interleave(num_chains, dim=0)  # type: ignore[index]
             for k in first.stats}  # type: ignore[union-attr]
    full = first.full_loss

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [G*C, d] -> [G*C]
        if idx is not None:
            raise ValueError("a grouped loss is full-sample only")
        return full(w, stats)

    return loss


def _gaussian(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, dim, generator=gen, dtype=torch.float64)


def _linear_full(w: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    # w [R, d]; sxx [d, d] or [R, d, d], sxy [d] or [R, d], syy [] or [R]
    quad = ((w[:, None, :] @ s["sxx"])[:, 0] * w).sum(-1)
    return 0.5 * (s["syy"] - 2 * (w * s["sxy"]).sum(-1) + quad)


def linear_regression(d: int, n: int, seed: int) -> tuple[RegressionData, torch.Tensor, LossFn]:
    """A regular model, ``y = w·x + ε`` with ``d`` parameters (``λ = d/2``). Returns the data, the
    least-squares minimiser ``w*`` (where the LLC is measured) and the loss."""
    gen = torch.Generator().manual_seed(seed)
    w_true = _gaussian(1, d, gen)[0]
    x = _gaussian(n, d, gen)
    y = (x @ w_true)[:, None] + _gaussian(n, 1, gen)
    # normal equations (torch.linalg.lstsq is not bit-reproducible from run to run on CPU)
    w_hat = torch.linalg.solve(x.T @ x, x.T @ y[:, 0])
    stats = {"sxx": x.T @ x / n, "sxy": x.T @ y[:, 0] / n, "syy": (y[:, 0] @ y[:, 0]) / n}
    data = RegressionData(x, y, stats, _linear_full)

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [chains, d] -> [chains]
        if idx is None:  # full batch through sufficient statistics: the same mean, O(d²) per chain
            return _linear_full(w, stats)
        pred = x[idx] @ w.T  # [batch, chains]
        return 0.5 * ((y[idx] - pred) ** 2).mean(0)

    return data, w_hat, loss


def _monomial_full(w: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    g = torch.prod(w ** s["p"], dim=-1)  # [R]
    return 0.5 * (s["syy"] - 2 * g * s["sxy"] + g ** 2 * s["sxx"])


def monomial_regression(powers: Sequence[int], n: int, seed: int) -> tuple[RegressionData, torch.Tensor, LossFn]:
    """``y = x ∏ w_i^(p_i) + ε`` with truth ``w0 = 0``; ``K(w) = ∏ w_i^(2 p_i) / 2`` so that
    ``λ = min_i 1/(2 p_i)`` with multiplicity the number of ``i`` attaining it."""
    gen = torch.Generator().manual_seed(seed)
    x = _gaussian(n, 1, gen)
    y = _gaussian(n, 1, gen)  # the truth is f = 0
    p = torch.tensor(list(powers), dtype=torch.float64)
    stats = {"sxx": (x[:, 0] @ x[:, 0]) / n, "sxy": (x[:, 0] @ y[:, 0]) / n, "syy": (y[:, 0] @ y[:, 0]) / n,
             "p": p}

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [chains, d] -> [chains]
        if idx is None:
            return _monomial_full(w, stats)
        g = torch.prod(w ** p, dim=1)  # [chains]
        return 0.5 * ((y[idx] - x[idx] * g[None, :]) ** 2).mean(0)

    return RegressionData(x, y, stats, _monomial_full), torch.zeros(len(powers), dtype=torch.float64), loss


def monomial_rlct(powers: Sequence[int]) -> tuple[float, int]:
    lam = min(1.0 / (2 * p) for p in powers)
    return lam, sum(1 for p in powers if abs(1.0 / (2 * p) - lam) < 1e-12)


def _rrr_full(w: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    # sxx [M, M] or [R, M, M], syx [N, M] or [R, N, M], syy [] or [R]; shape [H] gives H
    M, H = s["sxx"].shape[-1], int(s["H"].reshape(-1)[0])
    N = (w.shape[1] - H * M) // H
    A = w[:, : H * M].reshape(-1, H, M)
    B = w[:, H * M:].reshape(-1, N, H)
    W = B @ A  # [R, N, M]
    return 0.5 * (s["syy"] - 2 * (W * s["syx"]).sum((1, 2)) + ((W @ s["sxx"]) * W).sum((1, 2)))


def reduced_rank_regression(M: int, N: int, H: int, r: int, n: int, seed: int
                            ) -> tuple[RegressionData, torch.Tensor, LossFn]:
    """``y = B A x + ε`` (``A [H, M]``, ``B [N, H]``) with a true product of rank ``r``; ``w*`` is the
    true factorisation (flattened ``A`` then ``B``), whose extra rows/columns are zero."""
    gen = torch.Generator().manual_seed(seed)
    A0 = torch.zeros(H, M, dtype=torch.float64)
    B0 = torch.zeros(N, H, dtype=torch.float64)
    if r:
        A0[:r] = _gaussian(r, M, gen)
        B0[:, :r] = _gaussian(N, r, gen)
    x = _gaussian(n, M, gen)
    y = x @ (B0 @ A0).T + _gaussian(n, N, gen)
    stats = {"sxx": x.T @ x / n, "syx": y.T @ x / n, "syy": torch.trace(y.T @ y) / n,
             "H": torch.tensor(float(H), dtype=torch.float64)}

    def loss(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [chains, H*M + N*H] -> [chains]
        if idx is None:
            return _rrr_full(w, stats)
        A = w[:, : H * M].reshape(-1, H, M)
        B = w[:, H * M:].reshape(-1, N, H)
        pred = torch.einsum("cnm,bm->cbn", B @ A, x[idx])  # [chains, batch, N]
        return 0.5 * ((y[idx][None] - pred) ** 2).sum(-1).mean(-1)

    w_star = torch.cat([A0.reshape(-1), B0.reshape(-1)])
    return RegressionData(x, y, stats, _rrr_full), w_star, loss


# ------------------------------------------------------------------------------------ curvature controls

def _hvp(loss: torch.Tensor, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` of a scalar ``loss`` with respect to ``params`` by double backward (Pearlmutter's trick)."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    dot = sum((g * vi).sum() for g, vi in zip(grads, v))
    return [h.detach() for h in torch.autograd.grad(dot, list(params))]


def hutchinson_trace(batch_loss: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor], n: int,
                     *, num_probes: int = 16, batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """Per-probe Hutchinson estimates of ``tr ∇²L_n`` at the current ``params``: ``[num_probes]``.

    ``batch_loss(idx)`` is the mean loss over the samples ``idx`` (a differentiable scalar). Each probe
    draws a Rademacher vector ``v`` and its own minibatch of ``batch_size`` of the ``n`` samples and
    returns ``vᵀ ∇²L_m v``; since ``E[v vᵀ] = I`` and the minibatch mean is unbiased for ``L_n``, each
    estimate is unbiased for ``tr ∇²L_n`` and the probes are independent, so their spread gives the
    interval. Intuition: the trace is the sum of the curvatures along every direction, which the
    random ±1 probe samples all at once."""
    gen = torch.Generator().manual_seed(seed)
    out = np.empty(num_probes)
    for i in range(num_probes):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
        hv = _hvp(batch_loss(idx), params, v)
        out[i] = float(sum((h.double() * vi.double()).sum() for h, vi in zip(hv, v)))
    return out


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *,
                           iters: int = 15, seed: int = 0) -> np.ndarray:
    """Power iteration on ``∇² loss_fn()`` (one fixed loss, e.g. on a fixed minibatch): the Rayleigh
    quotient after each iteration, ``[iters]`` (the last is the estimate of the eigenvalue of largest
    magnitude; the sequence shows whether it has settled)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    out = np.empty(iters)
    for i in range(iters):
        norm = torch.sqrt(sum((vi.double() ** 2).sum() for vi in v))
        v = [vi / norm.to(vi.dtype) for vi in v]
        hv = _hvp(loss_fn(), params, v)
        out[i] = float(sum((h.double() * vi.double()).sum() for h, vi in zip(hv, v)))
        v = hv
    return out


# ------------------------------------------------------------------------------- phases with exact evidence

def focused_nodes(lo: float, hi: float, focus: float, **node_kw) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on ``[lo, hi]`` graded geometrically towards ``focus`` (from
    both sides when it lies inside), so an integrand concentrated within any scale of ``focus``
    is resolved. Returns ``x [N]``, ``w [N]``."""
    x, w = graded_nodes(**node_kw)
    xs, ws = [], []
    if focus > lo:
        xs.append(focus - (focus - lo) * x[::-1])
        ws.append((focus - lo) * w[::-1])
    if focus < hi:
        xs.append(focus + (hi - focus) * x)
        ws.append((hi - focus) * w)
    return np.concatenate(xs), np.concatenate(ws)


def region_free_energy(K: Callable[[np.ndarray, np.ndarray], np.ndarray],
                       a_nodes: tuple[np.ndarray, np.ndarray], b_nodes: tuple[np.ndarray, np.ndarray],
                       ns: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Free energy ``F_n(W) = −log ∫_W exp(−n K) dw`` of a rectangular region ``W`` (the product of
    the two node sets; prior density 1) and the posterior mean ``E_n[K | W]``, for each ``n``:
    ``([len(ns)], [len(ns)])``. ``E_n[K]`` is ``dF_n/dn``, the "energy" whose jump at a crossing of two
    phases' free energies makes the transition first-order."""
    (xa, wa), (xb, wb) = a_nodes, b_nodes
    A, B = np.meshgrid(xa, xb, indexing="ij")  # [Na, Nb]
    kk = K(A, B)
    logw = np.log(wa)[:, None] + np.log(wb)[None, :]
    F, E = np.empty(len(ns)), np.empty(len(ns))
    for i, n in enumerate(ns):
        lp = -n * kk + logw
        m = lp.max()
        p = np.exp(lp - m)
        F[i] = -(m + np.log(p.sum()))
        E[i] = float((p * kk).sum() / p.sum())
    return F, E
