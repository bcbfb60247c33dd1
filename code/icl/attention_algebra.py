"""The attention algebra of the SLT lecture notes (source note 004), symbolically and numerically.

One attention update of entity ``i`` (no LayerNorm, no MLP) is

``Δe_i = Σ_j softmax_j(q_i·k_j) v_j = (Σ_{j frozen} e^{s_j} v_j + Σ_{j live} e^{s_j} v_j) / Σ_u e^{s_u}``,

with ``s_j = q_i·k_j``; the *frozen* entities are the context (their representations do not depend on
the new input), the *live* ones the rest. If each frozen ``t`` has a value close to that of a live
entity ``a(t)``, the frozen terms fold into *modified keys*: live entity ``j`` gets the score

``z_j = LSE({s_j} ∪ {s_t : a(t) = j})``,

exact when the values agree. When one score in that set dominates, ``z_j ≈`` its maximum, by the bounds
``max ≤ LSE ≤ max + log n``. :func:`sympy_checks` verifies these identities symbolically (a wrong one
raises); :func:`modified_keys_error` measures numerically when the approximation holds and when not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Check:
    name: str
    statement: str  # TeX, without dollar signs
    ok: bool


def is_identity(lhs, rhs) -> bool:
    """Whether SymPy proves ``lhs == rhs`` (by simplifying the difference, then its exponential form)."""
    import sympy as sp

    diff = sp.simplify(sp.expand(lhs - rhs))
    if diff == 0:
        return True
    return sp.simplify(sp.powsimp(sp.expand(sp.exp(0) * diff), force=True)) == 0


def sympy_checks() -> list[Check]:
    """Each identity of the section, checked with SymPy; raises ``AssertionError`` if one fails."""
    import sympy as sp

    checks: list[Check] = []

    def record(name: str, statement: str, ok: bool) -> None:
        checks.append(Check(name, statement, bool(ok)))
        if not ok:
            raise AssertionError(f"SymPy check failed: {name}: {statement}")

    # 1. frozen/live split of one attention update (2 frozen, 2 live entities, vector values)
    s = sp.symbols("s1:5", real=True)
    v = [sp.Matrix(sp.symbols(f"v{j}_1:4", real=True)) for j in range(1, 5)]
    Z = sum(sp.exp(x) for x in s)
    full = sum((sp.exp(s[j]) / Z * v[j] for j in range(4)), sp.zeros(3, 1))
    frozen, live = (0, 1), (2, 3)
    split = (sum((sp.exp(s[j]) * v[j] for j in frozen), sp.zeros(3, 1))
             + sum((sp.exp(s[j]) * v[j] for j in live), sp.zeros(3, 1))) / Z
    record("frozen/live split", r"\sum_j \operatorname{softmax}_j(s)\, v_j = \big(\sum_{\text{frozen}} e^{s_j} v_j + \sum_{\text{live}} e^{s_j} v_j\big) \big/ \sum_u e^{s_u}",
           all(is_identity(x, y) for x, y in zip(full, split)))
    # 2. context irrelevant: with the frozen scores -> -oo the update is the live-only update
    a, b, c = sp.symbols("a b c", real=True)
    wv = sp.symbols("w1 w2 w3", real=True)
    upd = (sp.exp(a) * wv[0] + sp.exp(b) * wv[1] + sp.exp(c) * wv[2]) / (sp.exp(a) + sp.exp(b) + sp.exp(c))
    live_only = (sp.exp(b) * wv[1] + sp.exp(c) * wv[2]) / (sp.exp(b) + sp.exp(c))
    record("context irrelevant", r"s_{\text{frozen}} \to -\infty \text{ gives the update without the context}",
           is_identity(sp.limit(upd, a, -sp.oo), live_only))
    # 3. merging a frozen entity into a live one with the same value: e^{s_t} v + e^{s_j} v = e^{LSE(s_j, s_t)} v
    lse = sp.log(sp.exp(a) + sp.exp(b))
    record("modified key", r"e^{s_j} v + e^{s_t} v = e^{\operatorname{LSE}(s_j, s_t)}\, v",
           is_identity(sp.exp(a) * wv[0] + sp.exp(b) * wv[0], sp.exp(lse) * wv[0]))
    # 4. LSE bounds, n = 2: write b = a - t with t >= 0 (a is the max); LSE - max = log(1 + e^{-t})
    t = sp.symbols("t", nonnegative=True)
    gap = sp.log(sp.exp(a) + sp.exp(a - t)) - a
    record("LSE − max, n = 2", r"\log(e^a + e^{a-t}) - a = \log(1 + e^{-t})",
           is_identity(sp.exp(gap), 1 + sp.exp(-t)))
    g = sp.log(1 + sp.exp(-t))
    record("LSE ≤ max + log 2", r"\log(1 + e^{-t}) \text{ decreases in } t \text{, equals } \log 2 \text{ at } t = 0 \text{ and tends to } 0",
           sp.simplify(sp.diff(g, t)).is_negative is True and sp.simplify(g.subs(t, 0) - sp.log(2)) == 0
           and sp.limit(g, t, sp.oo) == 0)
    # 5. LSE bounds for any n: n e^{max} >= Σ e^{x_i} >= e^{max}  ->  max <= LSE <= max + log n
    n, m = sp.symbols("n m", positive=True)
    record("LSE ≤ max + log n", r"\log(n\, e^{\max}) = \max + \log n",
           is_identity(sp.expand_log(sp.log(n * sp.exp(m)), force=True), m + sp.log(n)))
    # 6. the softmax update is shift-invariant (so only score differences, margins, matter)
    shifted = upd.subs({a: a + c, b: b + c, c: c + c}, simultaneous=True)
    record("shift invariance", r"\operatorname{softmax}(s + c) = \operatorname{softmax}(s)", is_identity(shifted, upd))
    return checks


def lse(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def attention_update(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``Σ_j softmax(scores)_j values_j`` over the last axis of scores: ``scores`` ``[..., n]``,
    ``values`` ``[..., n, dv]``."""
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return (w[..., None] * values).sum(-2)


def modified_keys_error(scale: np.ndarray, frozen_per_live: tuple[int, ...] = (0, 1, 3, 7),
                        value_noise: float = 0.0, dv: int = 8, n_trials: int = 400,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """How well do modified keys, with LSE replaced by max, reproduce the exact attention update?

    Live entity ``j`` owns ``frozen_per_live[j]`` frozen entities whose values are ``v_j`` plus
    ``value_noise · N(0, 1)``. All scores are ``scale · N(0, 1)``: the larger ``scale`` (the sharper the
    attention), the more one score in each group dominates. Returned per scale (medians over trials):
    the relative error ``|Δe_approx − Δe| / |Δe|`` of modified keys with exact LSE (error from value
    mismatch only) and with ``max`` in place of LSE, and the mean of ``LSE − max`` over groups
    (between 0 and ``log`` of the group size). Replacing LSE by max shifts each modified key by its own
    ``LSE − max``; a shift common to all keys would change nothing (softmax is shift-invariant), so the
    error comes from how unequal these shifts are, relative to the spread of the scores.
    """
    rng = np.random.default_rng(seed)
    scale = np.asarray(scale, dtype=float)
    owner = np.concatenate([np.full(c, j) for j, c in enumerate(frozen_per_live)]).astype(int)
    n_live = len(frozen_per_live)
    out = {k: np.zeros(len(scale)) for k in ("exact_lse", "max", "lse_minus_max")}
    for i, sc in enumerate(scale):
        errs_lse, errs_max, gaps = [], [], []
        for _ in range(n_trials):
            s_live, s_frozen = sc * rng.normal(size=n_live), sc * rng.normal(size=len(owner))
            v_live = rng.normal(size=(n_live, dv))
            v_frozen = v_live[owner] + value_noise * rng.normal(size=(len(owner), dv))
            groups = [np.concatenate([[s_live[j]], s_frozen[owner == j]]) for j in range(n_live)]
            z_exact = np.array([lse(g) for g in groups])
            z_max = np.array([g.max() for g in groups])
            gaps.extend(z_exact - z_max)
            exact = attention_update(np.concatenate([s_frozen, s_live]), np.concatenate([v_frozen, v_live]))
            norm = np.linalg.norm(exact) + 1e-12
            errs_lse.append(np.linalg.norm(attention_update(z_exact, v_live) - exact) / norm)
            errs_max.append(np.linalg.norm(attention_update(z_max, v_live) - exact) / norm)
        out["exact_lse"][i] = np.median(errs_lse)
        out["max"][i] = np.median(errs_max)
        out["lse_minus_max"][i] = np.mean(gaps)
    return out
