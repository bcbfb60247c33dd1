"""Which algorithm does the regression transformer run? Prediction agreement, not error curves (chapter 9).

Two predictors can have the same error curve and still disagree prompt by prompt, so an error curve
cannot say which algorithm a transformer implements. Akyürek et al. (2023) compare *predictions*: on
the same held-out prompts, the squared difference between the transformer's prediction and a reference
algorithm's, ``SPD(T, A) = E[(T − A)²] / d`` (in the units of the excess error: 1 is what the
prediction 0 costs). This experiment measures it for the transformer trained by ``icl_regression``
(read from its cache entry; ``DEPENDS``) after ``k = 1 … K−1`` examples, against

* ridge ``(XᵀX + λI)⁻¹Xᵀy`` over a grid of ``λ`` (``λ = σ²`` is the posterior mean, Bayes-optimal);
* minimum-norm least squares (the limit ``λ → 0``);
* ``t`` steps of gradient descent from ``w = 0`` (:func:`icl.regression.gd_path`) for ``t`` on a grid, with
  step size ``c / λ_max`` for each prompt (``λ_max`` the largest eigenvalue of its ``XᵀX/k``; stable for
  ``c < 2``) and the factor ``c`` that has the least error at that ``(t, k)`` on a separate calibration set.
  A fixed step size would diverge on the rare prompts with a large ``λ_max``.

Scales that say what a given SPD means: the SPD between two reference algorithms (ridge against least
squares, ridge against one GD step), and the transformer's own error. For the Bayes predictor ``R`` the
two kinds of measurement are linked exactly: ``R`` is the conditional mean of ``w·x``, so
``E[(T − w·x)²] = E[(T − R)²] + E[(R − w·x)²]`` for any ``T`` computed from the prompt. The experiment
checks this (the cross term must vanish within its interval): the excess of the transformer's error
over ridge's *is* its disagreement with ridge, and no such identity holds for any other reference.

Least squares near ``k = d``. With noise, the error of least squares involves ``(XᵀX)⁻¹`` (``k ≥ d``),
whose expectation is finite only for ``k > d + 1``, or ``(XXᵀ)⁻¹`` for minimum-norm least squares below
``d``, finite only for ``k < d − 1``: the smallest singular value of a ``k × d`` Gaussian matrix has
``P(σ_min² < s) ∝ s^{(|k−d|+1)/2}`` near 0, so the noise part of the error has a power-law tail with
index ``α = (|k − d| + 1)/2`` (``1/2`` at ``k = d``, ``1`` at ``k = d ± 1``) and an infinite mean while
``α ≤ 1``. (How soon the tail shows depends on the noise: below ``d`` the bounded bias term dominates
all but the rarest prompts.)
A mean over prompts then does not converge as prompts are added, and the median is the summary to
report. On ``n_ls`` fresh prompts per ``k`` we store the median with its distribution-free interval
(order statistics), the running mean over nested prefixes, and Hill's estimate of ``α``
(:func:`icl.regression.hill_tail_index`) with its asymptotic interval, beside the theoretical value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from icl import regression as rg
from icl.experiments import between, each_float, each_int, reporter, with_threads
from icl.stats import bootstrap_mean_ci

NAME = "regression_agreement"
VERSION = 2
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = False
DESCRIPTION = "regression transformer: prediction agreement with ridge over lambda, least squares, t-step GD; LS median near k = d"
THREADS = 1
DEPENDS = ("icl_regression",)  # the trained transformer comes from that experiment's cache entry


@dataclass(frozen=True)
class Params:
    seed: int = 0
    n_eval: int = 2000
    lams: tuple[str, ...] = ("0.001", "0.01", "0.0625", "0.25", "1", "4")
    gd_steps: tuple[str, ...] = ("1", "2", "4", "8", "16", "32", "64", "128")
    gd_lr_min: float = 0.01
    gd_lr_max: float = 1.99
    n_gd_lrs: int = 40
    n_ls: int = 100_000
    ls_tail: float = 0.01
    n_boot: int = 1000

    def validate(self) -> None:
        steps = [int(t) for t in self.gd_steps]
        if steps != sorted(set(steps)) or steps[0] < 1:
            raise ValueError("gd_steps must be increasing step counts >= 1")
        if not all(float(x) > 0 for x in self.lams):
            raise ValueError("every ridge lambda must be positive (least squares is lambda -> 0, always included)")
        if not 0 < self.gd_lr_min < self.gd_lr_max:
            raise ValueError("need 0 < gd_lr_min < gd_lr_max")
        if not 10 <= self.ls_tail * self.n_ls < self.n_ls / 2:
            raise ValueError("the tail used for the Hill estimate must hold at least 10 and under half the prompts")


LIMITS = {"n_eval": between(20, 20_000), "lams": each_float(1e-8, 1e4), "gd_steps": each_int(1, 4096),
          "gd_lr_min": between(1e-6, 10.0), "gd_lr_max": between(1e-6, 10.0), "n_gd_lrs": between(2, 256),
          "n_ls": between(100, 1_000_000), "ls_tail": between(1e-4, 0.5), "n_boot": between(20, 10_000)}


def _base() -> Any:
    from icl.experiments import icl_regression

    return icl_regression.Params()


def eval_sets(p: Params) -> tuple[rg.Tasks, rg.Tasks]:
    """Held-out prompts (``n_eval`` of ``max_k`` examples, new seed) and a calibration set for GD step sizes."""
    b = _base()
    g = torch.Generator().manual_seed(50_000 + p.seed)
    return (rg.sample_tasks(p.n_eval, b.max_k, b.d, b.noise, g, dtype=torch.float64),
            rg.sample_tasks(p.n_eval, b.max_k, b.d, b.noise, g, dtype=torch.float64))


def ls_ks(d: int) -> list[int]:
    """The context sizes of the least-squares tail check: ``d − 1``, ``d``, ``d + 1`` (infinite mean) and
    ``d + 2``, ``d + 4`` (finite mean)."""
    return [d - 1, d, d + 1, d + 2, d + 4]


def content_digest(p: Params) -> str:
    h = hashlib.sha256()
    for t in eval_sets(p):
        t.hash_into(h)
    return h.hexdigest()


def median_ci(values: np.ndarray, level: float = 0.95) -> list[float]:
    """Median with its distribution-free interval from order statistics (normal approximation to the
    binomial count below the median): ``[median, low, high]``."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    z = {0.95: 1.959963984540054}[level]
    lo = int(np.floor(n / 2 - z * np.sqrt(n) / 2))
    hi = int(np.ceil(n / 2 + z * np.sqrt(n) / 2))
    return [float(np.median(v)), float(v[max(lo, 0)]), float(v[min(hi, n - 1)])]


def least_squares_tail(p: Params, d: int, noise: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Least-squares excess error near ``k = d`` on ``n_ls`` fresh prompts per ``k``: median, running mean, tail index."""
    arrays: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    prefixes = np.unique(np.geomspace(100, p.n_ls, 13).astype(int))
    arrays["ls_tail.prefixes"] = prefixes
    tail = int(round(p.ls_tail * p.n_ls))
    for k in ls_ks(d):
        g = torch.Generator().manual_seed(60_000 + 100 * p.seed + k)
        t = rg.sample_tasks(p.n_ls, k, d, noise, g, dtype=torch.float64)
        e = rg.excess_error(rg.least_squares(t.X, t.y, t.Xq), t.yq, d)[:, 0].numpy()
        running = np.cumsum(e)[prefixes - 1] / prefixes
        arrays[f"ls_tail.{k}.running_mean"] = running
        alpha = rg.hill_tail_index(e, tail)
        se = alpha / np.sqrt(tail)  # asymptotic standard error of Hill's estimator
        out[str(k)] = {"median": median_ci(e), "mean": float(e.mean()), "max": float(e.max()),
                       "alpha": [alpha, alpha - 1.96 * se, alpha + 1.96 * se],
                       "alpha_theory": (abs(k - d) + 1) / 2, "mean_finite_theory": bool(abs(k - d) > 1)}
    out["tail"] = tail
    return arrays, out


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from icl.experiments import icl_regression

    p = params
    p.validate()
    say = reporter(NAME, progress)
    reg_entry = upstream["icl_regression"]
    net = icl_regression.load_model(reg_entry)
    rp = reg_entry.data["params"]
    d, K, noise = rp["d"], rp["max_k"], rp["noise"]
    ev, cal = eval_sets(p)
    lams = [float(x) for x in p.lams]
    steps = [int(t) for t in p.gd_steps]
    gd_lrs = torch.tensor(np.geomspace(p.gd_lr_min, p.gd_lr_max, p.n_gd_lrs), dtype=torch.float64)
    with torch.no_grad():
        T = net.predict_all(ev.X.float(), ev.y.float()).double()  # [n, K]
    truth = torch.einsum("nkd,nd->nk", ev.X, ev.w)
    cal_truth = torch.einsum("nkd,nd->nk", cal.X, cal.w)
    refs = ([f"ridge:{x:g}" for x in lams] + ["least_squares"] + [f"gd:{t}" for t in steps])
    n, nA = p.n_eval, len(refs)
    pred = torch.zeros(nA, n, K, dtype=torch.float64)  # [reference, prompt, k]; k = 0: all predict 0
    bayes = torch.zeros(n, K, dtype=torch.float64)  # ridge with lambda = sigma^2
    chosen_lr = np.zeros((len(steps), K))
    say(f"reference predictions for k = 1..{K - 1} ({len(lams)} ridges, least squares, GD over {steps} steps)")
    for k in range(1, K):
        Xc, yc, Xq = ev.X[:, :k], ev.y[:, :k], ev.X[:, k:k + 1]
        for i, lam in enumerate(lams):
            pred[i, :, k] = rg.ridge(Xc, yc, Xq, lam)[:, 0]
        pred[len(lams), :, k] = rg.least_squares(Xc, yc, Xq)[:, 0]
        bayes[:, k] = rg.ridge(Xc, yc, Xq, noise ** 2)[:, 0]
        # GD: the step size with the least error at each (t, k), fitted on the calibration set
        with np.errstate(over="ignore", invalid="ignore"):
            cp_ = rg.gd_path(cal.X[:, :k], cal.y[:, :k], cal.X[:, k:k + 1], gd_lrs, steps, relative=True)[..., 0]  # [t, L, n]
            err = ((cp_ - cal_truth[:, k]) ** 2).mean(-1)
            err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
            best = err.argmin(-1)  # [t]
            ep = rg.gd_path(Xc, yc, Xq, gd_lrs, steps, relative=True)[..., 0]  # [t, L, n]
        for j in range(len(steps)):
            pred[len(lams) + 1 + j, :, k] = ep[j, best[j]]
            chosen_lr[j, k] = float(gd_lrs[best[j]])
    say("agreement and errors with bootstrap intervals")
    Tn, truth_n, bayes_n, pred_n = T.numpy(), truth.numpy(), bayes.numpy(), pred.numpy()
    spd = rg.prediction_gap(Tn[None], pred_n, d)  # [A, n, K]
    err_ref = rg.prediction_gap(pred_n, truth_n[None], d)
    err_T = rg.prediction_gap(Tn, truth_n, d)
    err_B = rg.prediction_gap(bayes_n, truth_n, d)
    spd_B = rg.prediction_gap(Tn, bayes_n, d)
    cross = 2 * (Tn - bayes_n) * (bayes_n - truth_n) / d  # Pythagoras: err_T = spd_B + err_B + cross
    ref_vs_bayes = rg.prediction_gap(pred_n, bayes_n[None], d)  # scale: how far each reference is from Bayes
    stack = np.concatenate([spd, err_ref, ref_vs_bayes, err_T[None], err_B[None], spd_B[None], cross[None],
                            (err_T - err_B)[None]], 0)  # [3A + 5, n, K]
    mean, lo, hi = bootstrap_mean_ci(np.moveaxis(stack, 1, 0), n_boot=p.n_boot, seed=p.seed)
    arrays: dict[str, np.ndarray] = {"refs.lams": np.asarray(lams), "refs.gd_steps": np.asarray(steps),
                                     "gd_lr": chosen_lr}
    blocks = [("spd", refs), ("error", refs), ("vs_bayes", refs)]
    row = 0
    for prefix, names in blocks:
        for name in names:
            for s, v in (("mean", mean), ("lo", lo), ("hi", hi)):
                arrays[f"{prefix}.{name}.{s}"] = v[row]
            row += 1
    for name in ("transformer.error", "bayes.error", "spd.bayes", "pythagoras.cross", "transformer.excess"):
        for s, v in (("mean", mean), ("lo", lo), ("hi", hi)):
            arrays[f"{name}.{s}"] = v[row]
        row += 1
    # how many times ridge's error the transformer's is: ratio of means, bootstrap over prompts
    idx = np.random.default_rng(p.seed).integers(0, n, size=(p.n_boot, n))
    ratios = err_T[idx].mean(1)[:, 1:] / err_B[idx].mean(1)[:, 1:]  # [boot, K - 1]
    arrays["transformer_over_bayes.mean"] = np.r_[np.nan, err_T.mean(0)[1:] / err_B.mean(0)[1:]]
    arrays["transformer_over_bayes.lo"] = np.r_[np.nan, np.quantile(ratios, 0.025, axis=0)]
    arrays["transformer_over_bayes.hi"] = np.r_[np.nan, np.quantile(ratios, 0.975, axis=0)]
    # the best-agreeing reference at each k, and whether ridge-like agreement beats the best GD
    i_gd = list(range(len(lams) + 1, nA))
    i_ridge = list(range(len(lams) + 1))  # ridges and least squares (lambda -> 0)
    best: dict[str, Any] = {}
    m_spd = mean[:nA]  # [A, K]
    for k in range(1, K):
        a_best = int(np.argmin(m_spd[:, k]))
        r_best = i_ridge[int(np.argmin(m_spd[i_ridge, k]))]
        g_best = i_gd[int(np.argmin(m_spd[i_gd, k]))]
        diff = spd[g_best, :, k] - spd[r_best, :, k]  # > 0: the best ridge agrees better than the best GD
        dm, dl, dh = bootstrap_mean_ci(diff, n_boot=p.n_boot, seed=p.seed)
        best[str(k)] = {"reference": refs[a_best], "spd": [float(mean[a_best, k]), float(lo[a_best, k]),
                                                           float(hi[a_best, k])],
                        "best_ridge": refs[r_best], "best_gd": refs[g_best],
                        "gd_minus_ridge": [float(dm), float(dl), float(dh)]}
    ls_arrays, ls = least_squares_tail(p, d, noise)
    arrays.update(ls_arrays)
    # the transformer's own error distribution at k = d and d + 1 (medians, beside least squares')
    t_median = {str(k): median_ci(err_T[:, k]) for k in (d, d + 1)}
    data = {
        "refs": refs, "best": best, "least_squares_tail": ls, "transformer_median": t_median,
        "d": d, "max_k": K, "noise": noise, "threads": THREADS,
        "params": json.loads(json.dumps(asdict(p))), "ci_level": 0.95,
    }
    return arrays, data
