"""Free energy of small singular models: exact asymptotics against quadrature, and slope fits.

Four two-parameter models on ``[−1, 1]²`` with a uniform prior, each with a known learning coefficient:
``a² + b²`` (regular, ``λ = 1``), ``a² b²`` (``λ = 1/2``, multiplicity 2), ``a² b⁴`` (``λ = 1/4``) and
``a² + b⁴`` (two independent sub-problems, ``λ = 1/2 + 1/4``). For each we compute

* the evidence ``Z_n = ∫ φ exp(−n K)`` by graded Gauss–Legendre quadrature for ``n = 10 … 10⁸``, and
  compare it with the asymptotic expansion obtained from SymPy residues of ``Γ(s) ζ(−s) n^(−s)``
  (:func:`icl.slt.evidence_expansion`);
* least-squares fits of ``F_n = −log Z_n`` against ``log n``: the plain slope, a fit with a free
  ``log log n`` term, and a fit with that term fixed at ``−(m − 1)``;
* the *empirical* free energy with data: for ``y = g(w) x + ε`` (``g = a b``, ``a b²``) and the regular
  ``y = a x₁ + b x₂ + ε`` the exact ``F_n − n L_n(w₀)`` by quadrature on ``n_datasets`` datasets per
  ``n``; its mean over datasets should grow like ``λ log n − (m − 1) log log n``.

Fitted slopes on the empirical free energy carry 95% bootstrap intervals over datasets. Everything is
deterministic given the seed; the whole run takes about half a minute on one core.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy as sp
import torch

from icl import slt
from icl.experiments import between, each_float, reporter, with_threads

NAME = "slt_free_energy"
VERSION = 1
CHAPTER = "report/10-slt.qmd"
USES_MODEL = False
DESCRIPTION = "free energy of regular and singular 2-parameter models: quadrature vs SymPy asymptotics, slope fits"
TORCH_THREADS = 1

a_, b_ = sp.symbols("a b", positive=True)
# name -> (K as a SymPy expression, lambda, m); K is even in both parameters.
MODELS: dict[str, tuple[sp.Expr, sp.Rational, int]] = {
    "regular": (a_ ** 2 + b_ ** 2, sp.Integer(1), 1),
    "a2b2": (a_ ** 2 * b_ ** 2, sp.Rational(1, 2), 2),
    "a2b4": (a_ ** 2 * b_ ** 4, sp.Rational(1, 4), 1),
    "a2+b4": (a_ ** 2 + b_ ** 4, sp.Rational(3, 4), 1),
}
# Regression models for the empirical free energy: name -> (g exponents or None for the regular model, λ, m)
DATA_MODELS: dict[str, tuple[tuple[int, int] | None, float, int]] = {
    "regular": (None, 1.0, 1),
    "a2b2": ((1, 1), 0.5, 2),
    "a2b4": ((1, 2), 0.25, 1),
}


@dataclass(frozen=True)
class Params:
    log10_n_min: float = 1.0
    log10_n_max: float = 8.0
    n_points: int = 29
    fit_log10_n_min: float = 2.0     # "wide" fits use n in [10^fit_min, 10^log10_n_max]
    fit_large_log10_n_min: float = 5.0  # "large" fits use n in [10^fit_large_min, 10^log10_n_max]
    data_log10_n: tuple[str, ...] = ("2", "2.5", "3", "3.5", "4", "4.5", "5", "5.5", "6")
    n_datasets: int = 40
    n_boot: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if not (self.log10_n_min <= self.fit_log10_n_min < self.fit_large_log10_n_min < self.log10_n_max) \
                or self.n_points < 5:
            raise ValueError("need log10_n_min < fit_log10_n_min < log10_n_max and n_points >= 5")
        if self.n_datasets < 2 or not self.data_log10_n:
            raise ValueError("need n_datasets >= 2 and at least one data size")
        for v in self.data_log10_n:
            float(v)


LIMITS = {"log10_n_min": between(0.0, 10.0), "log10_n_max": between(0.0, 10.0), "n_points": between(5, 1000),
          "fit_log10_n_min": between(0.0, 10.0), "fit_large_log10_n_min": between(0.0, 10.0),
          "data_log10_n": each_float(1.0, 7.0), "n_datasets": between(2, 1000), "n_boot": between(20, 10_000)}


def content_digest(params: Params) -> str:
    h = hashlib.sha256()
    for name, (K, lam, m) in MODELS.items():
        h.update(f"{name}:{sp.srepr(K)}:{lam}:{m};".encode())
    for name, spec in DATA_MODELS.items():
        h.update(f"{name}:{spec};".encode())
    return h.hexdigest()


def _expansion(K: sp.Expr) -> sp.Expr:
    """Asymptotic ``Z(n)`` of ``K`` on ``[0, 1]²``; additive ``K`` factorises into a product."""
    if K.is_Add:
        out = sp.Integer(1)
        for term in K.args:
            (v,) = term.free_symbols
            out *= slt.evidence_expansion(slt.zeta_of(term, [v]))
        return sp.simplify(out)
    return slt.evidence_expansion(slt.zeta_of(K, [a_, b_]))


def _regression_stats(spec: tuple[int, int] | None, n: int, gen: torch.Generator) -> np.ndarray:
    """Sufficient statistics of one dataset: ``[sxx, sxy]`` (1 input) or the 2×2 ``X'X`` and ``X'y``."""
    if spec is None:
        x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64)
        return np.concatenate([(x.T @ x).numpy().ravel(), (x.T @ y).numpy()])
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    return np.array([float(x @ x), float(x @ y)])


def _empirical_free_energy(spec: tuple[int, int] | None, stats: np.ndarray, A: np.ndarray, B: np.ndarray,
                           logw: np.ndarray) -> float:
    """``F_n − n L_n(w₀) = −log ∫ φ exp(−n (L_n(w) − L_n(w₀)))`` with ``φ`` uniform on ``[−1, 1]²``."""
    if spec is None:
        XX, Xy = stats[:4].reshape(2, 2), stats[4:]
        e = 0.5 * (XX[0, 0] * A ** 2 + 2 * XX[0, 1] * A * B + XX[1, 1] * B ** 2) - (Xy[0] * A + Xy[1] * B)
    else:
        g = A ** spec[0] * B ** spec[1]
        e = 0.5 * stats[0] * g ** 2 - stats[1] * g
    v = -e + logw
    mx = v.max()
    return -(mx + math.log(np.exp(v - mx).sum()) - math.log(4.0))


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    say = reporter(NAME, progress)
    ns = np.logspace(params.log10_n_min, params.log10_n_max, params.n_points)
    arrays["n"] = ns
    fit = ns >= 10 ** params.fit_log10_n_min - 1e-9
    nodes = slt.graded_nodes(lo_exp=-14.0, ratio=2.0, order=16)
    for name, (K, lam, m) in MODELS.items():
        say(f"{name}: evidence by quadrature at {params.n_points} sizes vs the SymPy expansion")
        f = sp.lambdify((a_, b_), K, "numpy")
        logZ = slt.log_evidence(f, ns, nodes)
        expansion = _expansion(K)
        asym = np.array([float(expansion.subs(slt.N_SYM, sp.Float(v, 30))) for v in ns])
        F = -logZ
        arrays[f"{name}.F"] = F
        arrays[f"{name}.F_asymptotic"] = -np.log(asym)
        # local slope dF/dlog n by central differences on the log grid
        arrays[f"{name}.local_slope"] = np.gradient(F, np.log(ns))
        fits = {}
        for rng, sel in (("wide", fit), ("large", ns >= 10 ** params.fit_large_log10_n_min - 1e-9)):
            fits[rng] = {
                "plain": slt.fit_free_energy(ns[sel], F[sel]),
                "loglog_fixed": slt.fit_free_energy(ns[sel], F[sel], loglog=-(m - 1)),
                "loglog_free": slt.fit_free_energy(ns[sel], F[sel], loglog=True),
                "loglog_fixed_invlog": slt.fit_free_energy(ns[sel], F[sel], loglog=-(m - 1), inv_log=True),
            }
        big = ns >= 1e3
        summary[name] = {
            "K": sp.latex(K), "lambda": float(lam), "lambda_str": str(lam), "m": m,
            "expansion_latex": sp.latex(expansion),
            "max_rel_err_asymptotic_n_ge_1e3": float(np.max(np.abs(asym[big] / np.exp(logZ[big]) - 1))),
            "fits": fits,
        }
    # empirical free energy with data
    gen = torch.Generator().manual_seed(params.seed)
    sx, sw = slt.symmetric_nodes(1.0, lo_exp=-8.0, ratio=2.0, order=12)
    A, B = np.meshgrid(sx, sx, indexing="ij")  # [N, N]
    logw = np.log(sw)[:, None] + np.log(sw)[None, :]
    data_ns = np.array([round(10 ** float(v)) for v in params.data_log10_n])
    arrays["data.n"] = data_ns.astype(np.float64)
    for name, (spec, lam, m) in DATA_MODELS.items():
        say(f"{name}: empirical free energy, {len(data_ns)} sizes x {params.n_datasets} datasets")
        Fd = np.empty((len(data_ns), params.n_datasets))
        for i, n in enumerate(data_ns):
            for r in range(params.n_datasets):
                stats = _regression_stats(spec, int(n), gen)
                Fd[i, r] = _empirical_free_energy(spec, stats, A, B, logw)
        arrays[f"data.{name}.F"] = Fd
        mean = Fd.mean(1)
        se = Fd.std(1, ddof=1) / math.sqrt(params.n_datasets)
        arrays[f"data.{name}.mean"], arrays[f"data.{name}.se"] = mean, se
        # 95% interval of the fitted λ: resample datasets (independently at each n) and refit
        rng = np.random.default_rng(params.seed)
        boot = {"plain": [], "loglog_fixed": []}
        for _ in range(params.n_boot):
            pick = rng.integers(0, params.n_datasets, size=Fd.shape)
            bm = np.take_along_axis(Fd, pick, axis=1).mean(1)
            boot["plain"].append(slt.fit_free_energy(data_ns, bm)["lam"])
            boot["loglog_fixed"].append(slt.fit_free_energy(data_ns, bm, loglog=-(m - 1))["lam"])
        summary[f"data.{name}"] = {"lambda": lam, "m": m}
        for kind, mu in (("plain", False), ("loglog_fixed", -(m - 1))):
            lam_hat = slt.fit_free_energy(data_ns, mean, loglog=mu)["lam"]
            lo, hi = np.percentile(boot[kind], [2.5, 97.5])
            summary[f"data.{name}"][f"fit_{kind}"] = [lam_hat, float(lo), float(hi)]
    data = {
        "n_range": [float(ns[0]), float(ns[-1])],
        "fit_range": {"wide": [10 ** params.fit_log10_n_min, ns[-1]],
                      "large": [10 ** params.fit_large_log10_n_min, ns[-1]]},
        "data_n": [int(v) for v in data_ns],
        "n_datasets": params.n_datasets,
        "quadrature_nodes_per_axis": int(len(nodes[0])),
        "models": summary,
        "seed": params.seed,
    }
    return arrays, data
