"""A Bayesian phase transition computed exactly: two phases with known losses and learning coefficients.

The lecture behind chapter 9 sorts the phase structure of a model built from submodels into (A)
transitions where a context is recognised, (B) transitions inside the submodels and (C) interactions
between (B) transitions, "in the generic case simply superimposed". This experiment computes (B) and
the non-interacting case of (C) exactly, on models small enough for quadrature.

The submodel. A Gaussian regression with two outputs, truth zero, has ``K(a, b) = |h(a, b)|² / 2`` for
its mean function ``h``. We take ``h = (a b, s(a))`` with
``s(a) = √(2δ) (1 − u)(1 + k u)``, ``u = (a / a₀)²``, and a uniform prior on ``[−1, 1]²``. It has two
phases, separated by the barrier of ``s²`` at ``u = (k − 1)/(2k)``:

* **A** (``|a|`` below the barrier): the line ``a = 0``, where ``K = δ`` — loss ``δ`` above the truth,
  one quadratic direction (``a``) and one flat one (``b``), so ``λ_A = 1/2``;
* **B** (``|a|`` beyond it): the points ``(±a₀, 0)``, where ``K = 0`` — the truth, with two quadratic
  directions, ``λ_B = 1``.

So ``F_A ≈ nδ + ½ log n`` and ``F_B ≈ log n``: the posterior prefers the simpler, worse phase A at
small ``n`` and moves to B where the two free energies cross. Both are computed here as exact
integrals over their regions (:func:`icl.slt.region_free_energy`, graded Gauss–Legendre nodes), with
the posterior mass of B and the posterior mean of ``K`` (``dF_n/dn``), whose jump from ``δ`` to 0 at
the crossing is what makes the transition first-order. Three predictions of the crossing ``n*`` are
compared: exact; Laplace's approximation with its ``O(1)`` constants; and the two-term formula
``nδ + ½ log n = log n`` that is all one has for a network.

The composite (C): two such submodels on separate coordinates, ``K = K₁(a₁, b₁) + K₂(a₂, b₂)``, with
different ``δ``. The evidence factorises, so free energies add and the four joint phases' posterior
masses are products: the composite transitions exactly at the submodels' own ``n*``, superimposed.
What happens when the submodels interact is not computed.

Intuition. ``λ log n`` is the price of precision: phase B must pin down two coordinates to within
``n^(−1/2)``, phase A only one. Below ``n*`` the saved loss ``nδ`` is not worth the extra
``½ log n``; above it, it is.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from icl import slt
from icl.experiments import between, each_float, with_threads
from icl.experiments.llc_operating_point import crossing_n

NAME = "slt_phase_toy"
VERSION = 1
CHAPTER = "report/10-slt.qmd"
USES_MODEL = False
DESCRIPTION = "Exact free energies of a two-phase singular model (lecture type B) and of two composed (type C)"
LAMBDA_A, LAMBDA_B = 0.5, 1.0
# panels graded down to 1e-9: the posterior's widths are at least n^(-1/2) >= 1e-4 for n <= 1e8
NODES = {"lo_exp": -9.0, "ratio": 2.0, "order": 16}


@dataclass(frozen=True)
class Params:
    deltas: tuple[str, ...] = ("0.002", "0.0005")  # loss gap of phase A, one submodel each
    a0: float = 0.6                               # where phase B's minima sit
    k: float = 5.0                                # barrier shape (> 1: a = 0 is a local minimum)
    log10_n_min: float = 1.0
    log10_n_max: float = 6.0
    n_points: int = 111
    seed: int = 0

    def validate(self) -> None:
        if len(self.deltas) != 2 or any(float(d) <= 0 for d in self.deltas):
            raise ValueError("need two positive deltas")
        if not 0 < self.a0 < 1 or self.k <= 1:
            raise ValueError("need 0 < a0 < 1 and k > 1")
        if self.log10_n_max <= self.log10_n_min or self.n_points < 5:
            raise ValueError("need log10_n_max > log10_n_min and n_points >= 5")


LIMITS = {"deltas": each_float(1e-6, 1.0), "a0": between(0.05, 0.95), "k": between(1.01, 100.0),
          "log10_n_min": between(0.0, 8.0), "log10_n_max": between(0.5, 8.0), "n_points": between(5, 1000)}


def content_digest(p: Params) -> str:
    return hashlib.sha256(repr((p.deltas, p.a0, p.k)).encode()).hexdigest()


def submodel_K(delta: float, a0: float, k: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``K(a, b) = (a b)²/2 + s(a)²/2`` of one submodel (even in ``a`` and ``b``)."""
    c = math.sqrt(2 * delta)

    def K(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        u = (a / a0) ** 2
        s = c * (1 - u) * (1 + k * u)
        return 0.5 * (a * b) ** 2 + 0.5 * s ** 2

    return K


def barrier(a0: float, k: float) -> float:
    """The ``a`` of the top of the barrier between the phases: ``u = (k − 1) / (2k)``."""
    return a0 * math.sqrt((k - 1) / (2 * k))


def phase_nodes(a0: float, k: float) -> dict[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Quadrature nodes of the positive quadrant of each phase (the prior density 1/4 on ``[−1, 1]²``
    and the four quadrants cancel): A is ``[0, a_b] × [0, 1]`` graded towards ``a = 0``, B is
    ``[a_b, 1] × [0, 1]`` graded towards ``a = a₀``; ``b`` is graded towards 0 in both."""
    ab = barrier(a0, k)
    b_nodes = slt.graded_nodes(**NODES)
    xa, wa = slt.graded_nodes(**NODES)
    return {"A": ((xa * ab, wa * ab), b_nodes), "B": (slt.focused_nodes(ab, 1.0, a0, **NODES), b_nodes)}


def laplace_constants(delta: float, a0: float, k: float) -> dict[str, float]:
    """``c_A``, ``c_B`` in ``F_A ≈ nδ + ½ log n + c_A`` and ``F_B ≈ log n + c_B`` (Laplace's method on
    the positive quadrant): ``Z_A ≈ e^(−nδ) ∫₀¹ ½ √(π / (n(α + b²/2))) db`` with ``α = 2δ(k − 1)/a₀²``
    the curvature of ``s²/2`` at 0, and ``Z_B ≈ √(π / (n κ)) · ½ √(2π / (n a₀²))`` with
    ``κ = 4δ (1 + k)² / a₀²`` that at ``a₀``."""
    alpha = 2 * delta * (k - 1) / a0 ** 2
    b, w = slt.graded_nodes(**NODES)
    integral = float(np.sum(w * 0.5 * math.sqrt(math.pi) / np.sqrt(alpha + b ** 2 / 2)))
    kappa = 4 * delta * (1 + k) ** 2 / a0 ** 2
    zb = math.sqrt(math.pi / kappa) * 0.5 * math.sqrt(2 * math.pi / a0 ** 2)
    return {"c_A": -math.log(integral), "c_B": -math.log(zb), "alpha": alpha, "kappa": kappa}


def _root(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Bisection in ``log n`` for a sign change of ``f`` between ``lo`` and ``hi``."""
    flo = f(lo)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        fm = f(mid)
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return math.sqrt(lo * hi)


def submodel(delta: float, p: Params, ns: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    K = submodel_K(delta, p.a0, p.k)
    nodes = phase_nodes(p.a0, p.k)
    F, E = {}, {}
    for ph, (an, bn) in nodes.items():
        F[ph], E[ph] = slt.region_free_energy(K, an, bn, ns)
    pB = 1 / (1 + np.exp(np.clip(F["B"] - F["A"], -700, 700)))  # posterior mass of phase B
    total = -np.logaddexp(-F["A"], -F["B"])
    energy = (1 - pB) * E["A"] + pB * E["B"]  # E_n[K] = dF_n/dn over the whole prior
    c = laplace_constants(delta, p.a0, p.k)

    def gap(n: float) -> float:  # F_A − F_B, exact
        fa, _ = slt.region_free_energy(K, *nodes["A"], [n])
        fb, _ = slt.region_free_energy(K, *nodes["B"], [n])
        return float(fa[0] - fb[0])

    sign = np.sign(F["A"] - F["B"])
    cross = np.nonzero(np.diff(sign) > 0)[0]  # A preferred (F_A < F_B) -> B preferred
    if len(cross) == 0:
        raise ValueError(f"no crossing in the n range for delta={delta}")
    i = int(cross[-1])
    n_exact = _root(gap, float(ns[i]), float(ns[i + 1]))
    laplace_gap = lambda n: n * delta - 0.5 * math.log(n) + c["c_A"] - c["c_B"]  # noqa: E731
    n_min = 0.5 / delta  # the gap is convex in n with its minimum here; the crossing is the larger root
    n_laplace = _root(laplace_gap, n_min, 1e12) if laplace_gap(n_min) < 0 else float("nan")
    n_two_term = crossing_n(delta, LAMBDA_B - LAMBDA_A)
    logn = np.log(ns)
    eps = 1e-3  # s* = d(F_A − F_B)/d log n at the crossing: near n*, p_B ≈ 1/(1 + exp(−s* log(n/n*)))
    gap_slope = (gap(n_exact * math.exp(eps)) - gap(n_exact * math.exp(-eps))) / (2 * eps)
    # local slopes at the largest n: λ_A from F_A − nδ, λ_B from F_B
    slope_A = np.gradient(F["A"] - ns * delta, logn)
    slope_B = np.gradient(F["B"], logn)
    arrays = {"F_A": F["A"], "F_B": F["B"], "E_A": E["A"], "E_B": E["B"], "p_B": pB, "F": total,
              "energy": energy, "slope_A": slope_A, "slope_B": slope_B}
    data = {"delta": delta, "n_cross_exact": n_exact, "n_cross_laplace": n_laplace, "n_cross_two_term": n_two_term,
            "switch_efolds": 2 * math.log(9) / gap_slope,  # B's mass from 10% to 90%, logistic approximation
            "gap_slope_at_cross": gap_slope, "min_p_B_before": float(pB[ns < n_exact].min()),
            "lambda_A_end": float(slope_A[-1]), "lambda_B_end": float(slope_B[-1]),
            "energy_at_half_n_cross": float(np.interp(math.log(n_exact / 2), logn, energy)),
            "energy_at_twice_n_cross": float(np.interp(math.log(2 * n_exact), logn, energy)),
            **c}
    return arrays, data


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    say: Callable[[str], None] = (lambda s: print(f"{NAME}: {s}", flush=True)) if progress else (lambda s: None)
    ns = np.logspace(p.log10_n_min, p.log10_n_max, p.n_points)
    arrays: dict[str, np.ndarray] = {"n": ns}
    subs = {}
    for j, d in enumerate(p.deltas):
        a, data = submodel(float(d), p, ns)
        arrays.update({f"sub{j + 1}.{k}": v for k, v in a.items()})
        subs[f"sub{j + 1}"] = data
        say(f"submodel {j + 1} (δ = {d}): n* exact {data['n_cross_exact']:.0f}, Laplace "
            f"{data['n_cross_laplace']:.0f}, two-term {data['n_cross_two_term']:.0f}")
    # the composite: the free energies add, the joint phases' masses are products
    p1, p2 = arrays["sub1.p_B"], arrays["sub2.p_B"]
    joint = {"AA": (1 - p1) * (1 - p2), "BA": p1 * (1 - p2), "AB": (1 - p1) * p2, "BB": p1 * p2}
    for k, v in joint.items():
        arrays[f"joint.{k}"] = v
    arrays["joint.F"] = arrays["sub1.F"] + arrays["sub2.F"]
    arrays["joint.energy"] = arrays["sub1.energy"] + arrays["sub2.energy"]
    # the composite's most probable phase along n, and where it changes
    order = list(joint)
    best = np.argmax(np.stack([joint[k] for k in order]), 0)
    changes = [{"n": float(np.sqrt(ns[i] * ns[i + 1])), "from": order[best[i]], "to": order[best[i + 1]]}
               for i in np.nonzero(np.diff(best))[0]]
    data_out = {"submodels": subs, "lambda_A": LAMBDA_A, "lambda_B": LAMBDA_B, "a0": p.a0, "k": p.k,
                "barrier_a": barrier(p.a0, p.k), "joint_changes": changes,
                "n_range": [float(ns[0]), float(ns[-1])]}
    say(f"composite: most probable phase changes {[(round(c['n']), c['from'], c['to']) for c in changes]}")
    return arrays, data_out
