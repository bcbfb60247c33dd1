"""Does a quantity grow by a constant amount per in-context example, or does it saturate?

The source posts propose that each example adds the same "transformation feature" to the query, so
that after ``k`` examples the query carries ``k`` times it: a straight line in ``k``. The two-hypothesis
Bayesian update of chapter 2 predicts the same for the log-odds, while what chapter 2 measured was
concave. This module fits both shapes to a curve ``y(k)`` measured on many prompts:

* linear: ``y = a + b k``;
* saturating: ``y = a + c (1 - exp(-k / tau))``, which is linear for ``tau`` much larger than the range
  of ``k`` (the linear model is its limit, so the saturating fit is never worse);

by weighted least squares on the mean curve, each point weighted by the inverse square of its standard
error over prompts (``tau`` by a log-spaced grid search, ``a`` and ``c`` in closed form for each
``tau``). Because the saturating family contains the line, the comparison penalises its extra
parameter: ``delta_bic = BIC_linear - BIC_saturating`` with ``BIC = chi^2 + p log K`` (``K`` points);
positive values favour saturation. A model-free second view is the *increment ratio*
``r = (y(k_max) - y(k_mid)) / (y(k_mid) - y(k_0))``: 1 for a line, below 1 when the later examples add
less than the earlier ones. Intervals come from a bootstrap over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TAU_GRID = np.geomspace(0.05, 1e4, 400)


@dataclass(frozen=True)
class Fit:
    params: dict[str, float]
    chi2: float
    n_params: int

    def bic(self, n_points: int) -> float:
        return self.chi2 + self.n_params * np.log(n_points)


def _wls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    resid = y - X @ coef
    return coef, float((w * resid ** 2).sum())


def fit_linear(k: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Fit:
    k, y = np.asarray(k, float), np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    coef, chi2 = _wls(np.stack([np.ones_like(k), k], 1), y, w)
    return Fit({"a": float(coef[0]), "b": float(coef[1])}, chi2, 2)


def fit_saturating(k: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Fit:
    """``y = a + c (1 - exp(-k / tau))``; ``tau`` on :data:`TAU_GRID`, ``a`` and ``c`` by weighted least
    squares for every ``tau`` at once (2 x 2 normal equations)."""
    k, y = np.asarray(k, float), np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    f = 1 - np.exp(-k[None] / TAU_GRID[:, None])  # [T, K]
    s0, s1, s2 = w.sum(), (w * f).sum(1), (w * f * f).sum(1)
    t0, t1 = (w * y).sum(), (w * f * y).sum(1)
    det = s0 * s2 - s1 ** 2
    ok = det > 1e-12 * max(s0 * s2.max(), 1e-300)
    safe = np.where(ok, det, 1.0)
    a = np.where(ok, (s2 * t0 - s1 * t1) / safe, t0 / s0)
    c = np.where(ok, (s0 * t1 - s1 * t0) / safe, 0.0)
    chi2 = (w * (y[None] - a[:, None] - c[:, None] * f) ** 2).sum(1)
    i = int(np.argmin(chi2))
    return Fit({"a": float(a[i]), "c": float(c[i]), "tau": float(TAU_GRID[i])}, float(chi2[i]), 3)


def saturating(k: np.ndarray, a: float, c: float, tau: float) -> np.ndarray:
    return a + c * (1 - np.exp(-np.asarray(k, float) / tau))


def increment_ratio(y: np.ndarray) -> float:
    """``(y[-1] - y[mid]) / (y[mid] - y[0])`` for a curve on equally spaced ``k``, ``mid = (K - 1) // 2``."""
    y = np.asarray(y, float)
    mid = (len(y) - 1) // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # a flat first half: NaN or infinite ratio
        return float((y[-1] - y[mid]) / (y[mid] - y[0]))


def compare_shapes(k: np.ndarray, per_prompt: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Fit both shapes to the mean over prompts of ``per_prompt`` ``[n_prompts, K]`` at ``k`` ``[K]``.

    Returns the two fits' parameters with 95% bootstrap intervals (``[value, lo, hi]``),
    ``delta_bic`` (positive: saturating favoured) with its interval, the increment ratio with its
    interval, and the mean curve's standard errors."""
    k = np.asarray(k, float)
    values = np.asarray(per_prompt, float)
    n = values.shape[0]
    if n < 3 or values.shape[1] != len(k) or len(k) < 4:
        raise ValueError("need at least three prompts and four values of k")

    def one(v: np.ndarray) -> tuple[Fit, Fit, float, float]:
        mean = v.mean(0)
        se = v.std(0, ddof=1) / np.sqrt(v.shape[0])
        w = 1.0 / np.maximum(se, 1e-9 * (np.abs(mean).max() + 1e-12)) ** 2
        lin, sat = fit_linear(k, mean, w), fit_saturating(k, mean, w)
        return lin, sat, lin.bic(len(k)) - sat.bic(len(k)), increment_ratio(mean)

    lin, sat, dbic, ratio = one(values)
    rng = np.random.default_rng(seed)
    boots = [one(values[rng.integers(0, n, n)]) for _ in range(n_boot)]

    def interval(point: float, samples: list[float]) -> list[float | None]:
        """[point, lo, hi]; a quantity that is undefined (the increment ratio of a curve whose first
        half is flat) is None, and the interval is taken over the resamples where it is defined."""
        s = np.asarray(samples, float)
        s = s[np.isfinite(s)]
        lo, hi = np.quantile(s, [0.025, 0.975]) if len(s) else (np.nan, np.nan)
        return [float(v) if np.isfinite(v) else None for v in (point, lo, hi)]

    return {
        "linear": {name: interval(v, [b[0].params[name] for b in boots]) for name, v in lin.params.items()},
        "saturating": {name: interval(v, [b[1].params[name] for b in boots]) for name, v in sat.params.items()},
        "chi2_linear": lin.chi2, "chi2_saturating": sat.chi2,
        "delta_bic": interval(dbic, [b[2] for b in boots]),
        "increment_ratio": interval(ratio, [b[3] for b in boots]),
        "mean": values.mean(0).tolist(),
        "se": (values.std(0, ddof=1) / np.sqrt(n)).tolist(),
    }


def shape_verdict(delta_bic: float, favour: float = 6.0, against: float = 2.0) -> str:
    """``"saturating"`` when ``delta_bic > favour``, ``"linear"`` when it is below ``against`` (the
    extra curvature parameter does not pay for itself), ``"undecided"`` between."""
    if delta_bic > favour:
        return "saturating"
    if delta_bic < against:
        return "linear"
    return "undecided"
