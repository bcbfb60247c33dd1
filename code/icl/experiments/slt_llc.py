"""Calibrating an SGLD estimator of the local learning coefficient on models whose λ is known.

The estimator (:func:`icl.slt.sgld_llc`, after Lau et al. 2023) is run, with ONE set of
hyperparameters, on

* a regular model, linear regression with ``d`` parameters (``λ = d/2``), measured at the least-squares
  fit;
* the family ``y = x ∏ w_i^(p_i) + ε`` at ``w = 0`` (``λ = min 1/(2 p_i)``, multiplicity = the number of
  minimisers);
* reduced-rank regression ``y = B A x + ε`` at a true rank-``r`` factorisation (``λ`` from Aoyagi &
  Watanabe 2005).

Each model gets ``n_datasets`` datasets and ``num_chains`` chains per dataset. For models with at most
three parameters (and for linear regression, in closed form) we also compute the *exact* value of the
quantity SGLD samples — ``nβ E[L_n(w) − L_n(w*)]`` under the localised tempered posterior — so the
error splits into the sampler's part (estimate vs exact target) and the estimator's own finite-``n``
bias (exact target vs λ). Three sweeps show what the hyperparameters do: step size ``ε``, localisation
``γ``, and minibatch size.

A step of SGLD on these small models is all overhead (a few microseconds of arithmetic per call), so
the datasets of one model, and the values of one sweep, run as groups of chains in a single batched
chain (:func:`icl.slt.sgld_llc_groups`): each step costs about as much as one run's step did.

Model specs are strings without commas: ``linear-10``, ``mono-1-2``, ``rrr-M-N-H-r``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from icl import slt
from icl.experiments import between, each_float, each_int, text, with_threads

NAME = "slt_llc"
VERSION = 2  # 2: datasets and sweep values run as groups of one batched SGLD (slt.sgld_llc_groups)
CHAPTER = "report/10-slt.qmd"
USES_MODEL = False
DESCRIPTION = "SGLD local learning coefficient vs known RLCTs (regular, monomial, reduced-rank regression)"
TORCH_THREADS = 1
TRACE_POINTS = 200
MODEL_SPECS = "model specs linear-D (D <= 1000), mono-P1[-P2..-P4] (P <= 10), rrr-M-N-H-r (<= 100, r <= H)"


@dataclass(frozen=True)
class Params:
    models: tuple[str, ...] = ("linear-10", "mono-1", "mono-1-1", "mono-1-2", "mono-1-1-1", "mono-1-2-3",
                               "rrr-3-3-3-1", "rrr-4-4-2-0", "rrr-5-3-3-2")
    n: int = 10_000
    step_size: float = 1e-4
    gamma: float = 1.0
    num_chains: int = 8
    num_steps: int = 20_000
    num_burnin: int = 2_000
    n_datasets: int = 3
    sweep_models: tuple[str, ...] = ("linear-10", "mono-1-1", "mono-1-2", "rrr-3-3-3-1")
    sweep_step_sizes: tuple[str, ...] = ("1e-5", "3e-5", "1e-4", "3e-4", "1e-3")
    sweep_num_steps: int = 10_000
    gamma_models: tuple[str, ...] = ("mono-1-1", "mono-1-2")
    gamma_values: tuple[str, ...] = ("0.1", "1", "10", "100")
    batch_models: tuple[str, ...] = ("linear-10", "rrr-3-3-3-1")
    batch_sizes: tuple[str, ...] = ("64", "512")
    seed: int = 0

    def validate(self) -> None:
        for spec in set(self.models) | set(self.sweep_models) | set(self.gamma_models) | set(self.batch_models):
            parse(spec)
        if self.n < 100 or self.num_chains < 2 or not 0 <= self.num_burnin < self.num_steps:
            raise ValueError("need n >= 100, num_chains >= 2 and 0 <= num_burnin < num_steps")
        if self.n_datasets < 1 or self.sweep_num_steps <= self.num_burnin // 2:
            raise ValueError("need n_datasets >= 1 and sweep_num_steps > num_burnin / 2")
        for v in self.sweep_step_sizes + self.gamma_values:
            if float(v) <= 0:
                raise ValueError("step sizes and gammas must be positive")
        for v in self.batch_sizes:
            if not 0 < int(v) <= self.n:
                raise ValueError("batch sizes must be in 1..n")


LIMITS = {"models": text(MODEL_SPECS), "n": between(100, 1_000_000), "step_size": between(1e-9, 1.0),
          "gamma": between(0.0, 1e6), "num_chains": between(2, 64), "num_steps": between(1, 1_000_000),
          "num_burnin": between(0, 1_000_000), "n_datasets": between(1, 20), "sweep_models": text(MODEL_SPECS),
          "sweep_step_sizes": each_float(1e-9, 1.0), "sweep_num_steps": between(1, 1_000_000),
          "gamma_models": text(MODEL_SPECS), "gamma_values": each_float(1e-6, 1e6), "batch_models": text(MODEL_SPECS),
          "batch_sizes": each_int(1, 1_000_000)}


def parse(spec: str) -> tuple[str, tuple[int, ...]]:
    kind, *rest = spec.split("-")
    try:
        nums = tuple(int(v) for v in rest)
    except ValueError:
        nums = ()
    if kind == "linear" and len(nums) == 1 and 1 <= nums[0] <= 1000:
        return kind, nums
    if kind == "mono" and 1 <= len(nums) <= 4 and all(1 <= v <= 10 for v in nums):
        return kind, nums
    if kind == "rrr" and len(nums) == 4 and 0 <= nums[3] <= nums[2] and 1 <= min(nums[:3]) and max(nums[:3]) <= 100:
        return kind, nums
    raise ValueError(f"bad model spec {spec!r}: use {MODEL_SPECS}")


def truth(spec: str) -> tuple[float, int, int]:
    """``(λ, m, d)``: the learning coefficient, its multiplicity and the number of parameters."""
    kind, nums = parse(spec)
    if kind == "linear":
        return nums[0] / 2, 1, nums[0]
    if kind == "mono":
        lam, m = slt.monomial_rlct(nums)
        return lam, m, len(nums)
    M, N, H, r = nums
    lam, m = slt.rrr_rlct(M, N, H, r)
    return lam, m, H * (M + N)


def build(spec: str, n: int, seed: int):
    kind, nums = parse(spec)
    if kind == "linear":
        return slt.linear_regression(nums[0], n, seed)
    if kind == "mono":
        return slt.monomial_regression(nums, n, seed)
    return slt.reduced_rank_regression(*nums, n, seed)


def exact_target(spec: str, data: slt.RegressionData, w_star: torch.Tensor, beta: float, gamma: float) -> float:
    """Exact ``nβ E[L_n(w) − L_n(w*)]`` under the localised tempered posterior, NaN where not computable:
    closed form for linear regression; quadrature on this dataset for monomials with d ≤ 2, on the
    population loss for d = 3."""
    kind, nums = parse(spec)
    n = data.n
    x, y = data.x.numpy(), data.y.numpy()
    if kind == "linear":
        sxx = x.T @ x / n
        w_hat = np.linalg.solve(x.T @ x, x.T @ y[:, 0])
        return slt.gaussian_tempered_expectation(sxx, w_hat, w_star.numpy(), n, beta, gamma)
    if kind != "mono" or len(nums) > 3:
        return float("nan")
    sxx, sxy = float(x[:, 0] @ x[:, 0]), float(x[:, 0] @ y[:, 0])
    h = min(8.0 / math.sqrt(gamma), 25.0)

    def g(*ws: np.ndarray) -> np.ndarray:
        out = np.ones_like(ws[0])
        for wi, p in zip(ws, nums):
            out = out * wi ** p
        return out

    if len(nums) <= 2:
        if len(nums) == 1:
            def nL(A: np.ndarray, B: np.ndarray) -> np.ndarray:  # B is a dummy: it factorises out
                gg = g(A)
                return 0.5 * sxx * gg ** 2 - sxy * gg
        else:
            def nL(A: np.ndarray, B: np.ndarray) -> np.ndarray:
                gg = g(A, B)
                return 0.5 * sxx * gg ** 2 - sxy * gg
        return slt.tempered_expectation(nL, 2, beta, gamma, half_width=h)

    def nK(*ws: np.ndarray) -> np.ndarray:  # population version, even in every coordinate
        return 0.5 * n * g(*ws) ** 2

    return slt.tempered_expectation(nK, 3, beta, gamma, half_width=h, even=True,
                                    lo_exp=-6.0, ratio=2.0, order=6)


def content_digest(params: Params) -> str:
    h = hashlib.sha256()
    specs = sorted(set(params.models) | set(params.sweep_models) | set(params.gamma_models) | set(params.batch_models))
    for spec in specs:  # the first samples of each model's first dataset (raw draws only: no solvers)
        data, w_star, _ = build(spec, min(params.n, 256), params.seed)
        h.update(spec.encode())
        h.update(data.x.numpy().tobytes())
        h.update(data.y.numpy().tobytes())
        if parse(spec)[0] != "linear":
            h.update(w_star.numpy().tobytes())
    return h.hexdigest()


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _run(spec: str, params: Params, data_seed: int, chain_seed: int, **overrides: Any) -> slt.LLCResult:
    data, w_star, loss = build(spec, params.n, data_seed)
    kw = dict(num_chains=params.num_chains, num_steps=params.num_steps, num_burnin=params.num_burnin,
              step_size=params.step_size, gamma=params.gamma, seed=chain_seed)
    kw.update(overrides)
    return slt.sgld_llc(loss, w_star, params.n, **kw)


def _run_groups(spec: str, params: Params, chain_seed: int, groups: int, **overrides: Any) -> list[slt.LLCResult]:
    """``groups`` estimates on dataset 0 as one batch of chains, each with its own setting (an array
    in ``overrides``: one step size or localisation per group)."""
    _, w_star, loss = build(spec, params.n, params.seed)
    kw = dict(num_chains=params.num_chains, num_steps=params.num_steps, num_burnin=params.num_burnin,
              step_size=params.step_size, gamma=params.gamma, seed=chain_seed)
    kw.update(overrides)
    return slt.sgld_llc_groups(loss, w_star[None].repeat(groups, 1), params.n, **kw)


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    beta = 1.0 / math.log(params.n)
    arrays: dict[str, np.ndarray] = {}
    rows: dict[str, Any] = {}
    say: Callable[[str], None] = print if progress else (lambda s: None)

    # ---- main calibration table
    for spec in params.models:
        lam, m, d = truth(spec)
        per_chain = np.empty((params.n_datasets, params.num_chains))
        targets = np.empty(params.n_datasets)
        built = [build(spec, params.n, params.seed + ds) for ds in range(params.n_datasets)]
        results = slt.sgld_llc_groups(  # every dataset's chains in one batch
            slt.grouped_full_loss([b[0] for b in built], params.num_chains), torch.stack([b[1] for b in built]),
            params.n, num_chains=params.num_chains, num_steps=params.num_steps, num_burnin=params.num_burnin,
            step_size=params.step_size, gamma=params.gamma, seed=params.seed + 10_000)
        for ds, ((data, w_star, _), res) in enumerate(zip(built, results)):
            per_chain[ds] = res.llc_chains
            targets[ds] = exact_target(spec, data, w_star, beta, params.gamma)
            if ds == 0:
                idx = np.linspace(0, params.num_steps - 1, TRACE_POINTS).astype(int)
                arrays[f"{spec}.trace"] = (res.nbeta * (res.loss_trace[:, idx] - res.init_loss)).astype(np.float32)
                arrays[f"{spec}.trace_step"] = idx
        per_dataset = per_chain.mean(1)
        arrays[f"{spec}.llc_chains"] = per_chain
        arrays[f"{spec}.target"] = targets
        est = float(per_dataset.mean())
        target = float(np.mean(targets))
        rows[spec] = {
            "lambda": lam, "m": m, "d": d,
            "estimate": _finite(est),
            "spread_datasets": _finite(float(per_dataset.std(ddof=1)) if params.n_datasets > 1 else float("nan")),
            "spread_chains": _finite(float(per_chain.std(1, ddof=1).mean())),
            "exact_target": _finite(target),
            "rel_err_vs_lambda": _finite(est / lam - 1),
            "rel_err_vs_target": _finite(est / target - 1) if math.isfinite(target) else None,
        }
        say(f"{spec}: λ={lam} estimate {est:.3f} (target {target:.3f})")

    # ---- step-size sweep (dataset 0)
    eps_values = np.array([float(v) for v in params.sweep_step_sizes])
    arrays["sweep.step_size"] = eps_values
    for spec in params.sweep_models:
        with np.errstate(all="ignore"):  # the largest step sizes diverge, in their own rows only
            results = _run_groups(spec, params, params.seed + 20_000, len(eps_values), step_size=eps_values,
                                  num_steps=params.sweep_num_steps, num_burnin=params.num_burnin // 2)
        vals = np.stack([res.llc_chains for res in results])
        arrays[f"sweep.{spec}.llc_chains"] = vals
        say(f"step sweep {spec}: {np.round(vals.mean(1), 3)}")

    # ---- localisation sweep (dataset 0): SGLD vs exact target
    g_values = np.array([float(v) for v in params.gamma_values])
    arrays["gamma.values"] = g_values
    for spec in params.gamma_models:
        data, w_star, _ = build(spec, params.n, params.seed)
        results = _run_groups(spec, params, params.seed + 30_000, len(g_values), gamma=g_values)
        vals = np.stack([res.llc_chains for res in results])
        exact = np.array([exact_target(spec, data, w_star, beta, float(gm)) for gm in g_values])
        arrays[f"gamma.{spec}.llc_chains"], arrays[f"gamma.{spec}.target"] = vals, exact
        say(f"gamma sweep {spec}: {np.round(vals.mean(1), 3)} vs {np.round(exact, 3)}")

    # ---- minibatch sweep (dataset 0); the last entry is the full batch
    b_values = np.array([int(v) for v in params.batch_sizes] + [params.n])
    arrays["batch.sizes"] = b_values
    for spec in params.batch_models:
        vals = np.empty((len(b_values), params.num_chains))
        for i, bs in enumerate(b_values):
            res = _run(spec, params, params.seed, params.seed + 40_000 + i,
                       batch_size=None if bs == params.n else int(bs))
            vals[i] = res.llc_chains
        arrays[f"batch.{spec}.llc_chains"] = vals
        say(f"batch sweep {spec}: {np.round(vals.mean(1), 3)}")

    data = {
        "n": params.n, "beta": beta, "nbeta": params.n * beta,
        "hyper": {"step_size": params.step_size, "gamma": params.gamma, "num_chains": params.num_chains,
                  "num_steps": params.num_steps, "num_burnin": params.num_burnin, "batch": "full",
                  "n_datasets": params.n_datasets, "sweep_num_steps": params.sweep_num_steps},
        "models": rows,
        "seed": params.seed,
    }
    return arrays, data
