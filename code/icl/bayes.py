"""The two-hypothesis Bayesian account of in-context learning, and fits of it to a model's curves.

The source notes model a language model reading examples of a rule as a Bayesian with two hypotheses:
``A``, "the rule holds", and ``B``, "it does not". Each example that fits the rule has likelihood ``c``
under ``A`` and ``1 - c`` under ``B``, so after ``n`` examples

    A_n = A_0 c^n / (A_0 c^n + B_0 (1 - c)^n)
        = softmax(log A_0 + n log c,  log B_0 + n log(1 - c))[0],

and the posterior log-odds grow by the same amount, ``log(c / (1 - c))``, with every example:

    logit(A_n) = logit(A_0) + n * log(c / (1 - c)).

This is the form that suits a transformer: evidence is *added* in log space (in the residual stream)
and normalised by a softmax (the unembedding), which is why the notes find it natural.

To confront it with a model we need a measurable stand-in for ``A_n``. We take the probability that
the model gives the *whole* correct answer of example ``n + 1`` after ``n`` examples, ``p = exp(-S)``
(:mod:`icl.scoring`). The model then predicts ``logit(p_{n+1}) = alpha + n * beta`` with
``A_0 = sigmoid(alpha)`` and ``c = sigmoid(beta)``: a logistic curve in the number of examples.

:func:`fit_logistic` fits ``(alpha, beta)`` by maximum likelihood, treating each observed probability
as a soft Bernoulli outcome (the cross-entropy between observed and predicted probabilities, summed
over prompts and examples). :func:`fit_power_law` fits the baseline ``S_k = a * k^(-b)`` with the same
loss, so the two are compared on equal terms, in-sample and on held-out examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

EPS = 1e-9


def posterior_sequence(a0: float, c: float, n: int) -> np.ndarray:
    """``A_0 .. A_n`` by the recursive update (not the closed form), for checks and plots."""
    out = [a0]
    a = a0
    for _ in range(n):
        a = a * c / (a * c + (1 - a) * (1 - c))
        out.append(a)
    return np.array(out)


def soft_bce(p_obs: np.ndarray, logit_pred: np.ndarray) -> float:
    """Mean cross-entropy (nats) between observed probabilities and predicted ones given as logits."""
    p = np.clip(p_obs, 0.0, 1.0)
    return float(-(p * log_expit(logit_pred) + (1 - p) * log_expit(-logit_pred)).mean())


@dataclass(frozen=True)
class LogisticFit:
    alpha: float  # logit(A_0)
    beta: float  # log(c / (1 - c)), evidence per example

    @property
    def a0(self) -> float:
        return float(expit(self.alpha))

    @property
    def c(self) -> float:
        return float(expit(self.beta))

    def logit(self, n_seen: np.ndarray) -> np.ndarray:
        return self.alpha + self.beta * np.asarray(n_seen, dtype=float)

    def surprisal(self, n_seen: np.ndarray) -> np.ndarray:
        return -log_expit(self.logit(n_seen))


def fit_logistic(p_obs: np.ndarray, n_seen: np.ndarray) -> LogisticFit:
    """Maximum-likelihood ``(alpha, beta)`` for ``p_obs`` [n_prompts, n_examples] observed after
    ``n_seen`` [n_examples] examples. The loss is convex, so the optimum is unique."""
    p = np.clip(np.asarray(p_obs, dtype=float), 0.0, 1.0)
    x = np.broadcast_to(np.asarray(n_seen, dtype=float), p.shape)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = theta[0] + theta[1] * x
        value = -(p * log_expit(z) + (1 - p) * log_expit(-z)).mean()
        resid = expit(z) - p  # d loss / dz, per entry (times 1/N)
        grad = np.array([resid.mean(), (resid * x).mean()])
        return float(value), grad

    p_mean = np.clip(p.mean(), 1e-4, 1 - 1e-4)
    start = np.array([np.log(p_mean / (1 - p_mean)), 0.0])
    res = minimize(loss, start, jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 500})
    return LogisticFit(float(res.x[0]), float(res.x[1]))


@dataclass(frozen=True)
class PowerLawFit:
    log_a: float
    b: float

    def surprisal(self, k: np.ndarray) -> np.ndarray:
        return np.exp(self.log_a) * np.asarray(k, dtype=float) ** (-self.b)

    def logit(self, k: np.ndarray) -> np.ndarray:
        s = np.maximum(self.surprisal(k), EPS)
        return -s - np.log(-np.expm1(-s))  # logit(exp(-s))


def fit_power_law(p_obs: np.ndarray, k: np.ndarray) -> PowerLawFit:
    """Baseline: surprisal ``S_k = a k^(-b)`` (``k`` = example index, from 1), same loss as the logistic."""
    p = np.clip(np.asarray(p_obs, dtype=float), 0.0, 1.0)
    kk = np.broadcast_to(np.asarray(k, dtype=float), p.shape)

    def loss(theta: np.ndarray) -> float:
        return soft_bce(p, PowerLawFit(theta[0], theta[1]).logit(kk))

    s_mean = float(np.mean(-np.log(np.clip(p.mean(axis=0), EPS, 1))))
    best = None
    for b0 in (0.0, 0.5, 1.5):
        res = minimize(loss, np.array([np.log(max(s_mean, 1e-3)), b0]), method="Nelder-Mead",
                       options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000})
        if best is None or res.fun < best.fun:
            best = res
    return PowerLawFit(float(best.x[0]), float(best.x[1]))


def pooled_surprisal_rmse(p_obs: np.ndarray, predicted_surprisal: np.ndarray) -> float:
    """RMSE (nats) between ``-log`` of the observed mean probability per example and a predicted
    surprisal curve. The fits model probabilities, so they are compared with the pooled probability,
    not with the mean surprisal (which is larger, by Jensen's inequality)."""
    observed = -np.log(np.clip(np.asarray(p_obs, dtype=float).mean(axis=0), EPS, 1.0))
    return float(np.sqrt(np.mean((observed - predicted_surprisal) ** 2)))


def ideal_affine_surprisal(xs: np.ndarray, ys: np.ndarray, slopes: Sequence[int], intercepts: Sequence[int],
                           y_max: int, p_rule: float = 0.5) -> np.ndarray:
    """Surprisal (nats) of each answer for the exact Bayesian learner of a stated rule family.

    Hypotheses: every rule ``y = a x + b`` with ``a`` in ``slopes`` and ``b`` in ``intercepts``, sharing
    prior mass ``p_rule`` equally, and "no rule", mass ``1 - p_rule``, under which each answer is
    uniform on ``0 .. y_max``. The learner sees examples in order and predicts the whole answer ``y_i``
    from ``x_i`` and the examples before it: a rule keeps its weight while it fits every example seen
    and drops out at its first miss. ``xs``, ``ys``: ``[prompts, k]``; returns ``[prompts, k]``.

    It is the reference for how many bits learning a rule of the family *needs*: a rule of the grid
    costs about ``log2`` of the number of rules consistent with the first example, then nothing; an
    answer outside every rule costs ``log(y_max + 1)`` for ever.
    """
    xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
    a = np.repeat(np.asarray(slopes, dtype=np.int64), len(intercepts))
    b = np.tile(np.asarray(intercepts, dtype=np.int64), len(slopes))
    G, Y = len(a), y_max + 1
    match = (a * xs[..., None] + b) == ys[..., None]  # [n, k, G]
    alive = np.concatenate([np.ones_like(match[:, :1]), np.cumprod(match, axis=1)[:, :-1]], axis=1)  # before i
    seen = np.arange(xs.shape[1])[None]  # examples seen before example i
    w_rule = alive * (p_rule / G)  # [n, k, G]
    w_none = (1 - p_rule) * np.exp(-seen * np.log(Y))  # [1, k]
    in_range = (ys >= 0) & (ys <= y_max)
    p = ((w_rule * match).sum(-1) + w_none * in_range / Y) / (w_rule.sum(-1) + w_none)
    return -np.log(p)
