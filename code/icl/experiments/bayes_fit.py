"""Fit the two-hypothesis Bayesian model, and a power-law baseline, to the model's learning curves.

Input: the ``surprisal`` experiment's per-prompt answer surprisals for each task (same model, default
parameters). For each task we fit ``logit p_{n+1} = alpha + n * beta`` (:mod:`icl.bayes`) to the
probabilities of the correct answer, with 95% bootstrap intervals over prompts for ``A_0`` and ``c``,
and compare it with ``S_k = a k^(-b)`` in-sample and on held-out examples: both are fitted on the first
half of the examples and scored on the second half.

The fitted evidence per example ``beta = log(c / (1 - c))`` needs a reference: the same two-hypothesis
model is fitted to the *ideal learner* of the ``surprisal`` experiment (the exact Bayesian learner of
the affine rule family, on the same prompts), whose evidence per example is about ``log |Y|`` once the
first example has picked out the rule. The ratio of the two, with a bootstrap over prompts that
resamples both on the same prompts, says how many examples the model needs for one of the ideal's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from icl import bayes, tasks
from icl.experiments import between, with_threads

NAME = "bayes_fit"
VERSION = 2  # 2: the same fit to the ideal learner, and the model-to-ideal ratio of the evidence per example
CHAPTER = "report/02-bayes.qmd"
USES_MODEL = False
DEPENDS = ("surprisal",)
DESCRIPTION = "maximum-likelihood fit of the two-hypothesis Bayesian update (A_0, c) vs a power law"
THREADS = 1  # see icl.experiments.threads_of


@dataclass(frozen=True)
class Params:
    n_boot: int = 300
    seed: int = 0

    def validate(self) -> None:
        if self.n_boot < 20:
            raise ValueError("n_boot must be at least 20")


LIMITS = {"n_boot": between(20, 10_000)}


def content_digest(params: Params) -> str:
    # The data is the upstream entry, whose key is part of this experiment's key ("depends").
    return hashlib.sha256(b"bayes_fit: logistic-in-k vs power law, soft-label ML").hexdigest()


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.quantile(values, [0.025, 0.975])
    return [float(lo), float(hi)]


def analyse(answer_nats: np.ndarray, n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All fits for one task. ``answer_nats``: [n_prompts, K] surprisal of example k = 1..K."""
    p = np.exp(-answer_nats.astype(float))
    n, big_k = p.shape
    seen = np.arange(big_k)  # examples seen before example k = seen + 1
    ks = seen + 1
    logistic = bayes.fit_logistic(p, seen)
    power = bayes.fit_power_law(p, ks)
    rng = np.random.default_rng(seed)
    boot = np.array([(f.a0, f.c, f.beta) for f in
                     (bayes.fit_logistic(p[rng.integers(0, n, n)], seen) for _ in range(n_boot))])
    half = big_k // 2
    train, test = slice(0, half), slice(half, big_k)
    lo_half = bayes.fit_logistic(p[:, train], seen[train])
    pw_half = bayes.fit_power_law(p[:, train], ks[train])
    out = {
        "a0": logistic.a0, "a0_ci": _ci(boot[:, 0]),
        "c": logistic.c, "c_ci": _ci(boot[:, 1]),
        "beta": logistic.beta, "beta_ci": _ci(boot[:, 2]),
        "power_a": float(np.exp(power.log_a)), "power_b": power.b,
        "in_sample": {
            "logistic_bce": bayes.soft_bce(p, np.broadcast_to(logistic.logit(seen), p.shape)),
            "power_bce": bayes.soft_bce(p, np.broadcast_to(power.logit(ks), p.shape)),
            "logistic_rmse": bayes.pooled_surprisal_rmse(p, logistic.surprisal(seen)),
            "power_rmse": bayes.pooled_surprisal_rmse(p, power.surprisal(ks)),
        },
        "held_out": {
            "train_examples": half,
            "logistic_bce": bayes.soft_bce(p[:, test], np.broadcast_to(lo_half.logit(seen[test]), p[:, test].shape)),
            "power_bce": bayes.soft_bce(p[:, test], np.broadcast_to(pw_half.logit(ks[test]), p[:, test].shape)),
            "logistic_rmse": bayes.pooled_surprisal_rmse(p[:, test], lo_half.surprisal(seen[test])),
            "power_rmse": bayes.pooled_surprisal_rmse(p[:, test], pw_half.surprisal(ks[test])),
        },
    }
    curves = {
        "logistic_surprisal": logistic.surprisal(seen),
        "power_surprisal": power.surprisal(ks),
        "logistic_half_surprisal": lo_half.surprisal(seen),
        "power_half_surprisal": pw_half.surprisal(ks),
        "logit_observed": np.log(np.clip(p.mean(0), 1e-12, 1)) - np.log(np.clip(1 - p.mean(0), 1e-12, 1)),
        "logit_logistic": logistic.logit(seen),
        "pooled_surprisal": -np.log(np.clip(p.mean(0), 1e-12, 1)),
    }
    return out, curves


def ideal_comparison(answer_nats: np.ndarray, ideal_nats: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """The two-hypothesis fit to the ideal learner's probabilities and the ratio of the evidence per
    example, ideal over model, with a paired bootstrap over prompts (both ``[n_prompts, K]``)."""
    p_model, p_ideal = np.exp(-answer_nats.astype(float)), np.exp(-ideal_nats.astype(float))
    n, big_k = p_model.shape
    seen = np.arange(big_k)
    fit_i, fit_m = bayes.fit_logistic(p_ideal, seen), bayes.fit_logistic(p_model, seen)
    rng = np.random.default_rng([seed, 1])
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        bi, bm = bayes.fit_logistic(p_ideal[idx], seen).beta, bayes.fit_logistic(p_model[idx], seen).beta
        boot.append((bi, bi / bm if bm > 0 else np.inf))
    boot_arr = np.array(boot)
    return {"beta": fit_i.beta, "beta_ci": _ci(boot_arr[:, 0]), "c": fit_i.c, "a0": fit_i.a0,
            "ratio": fit_i.beta / fit_m.beta if fit_m.beta > 0 else None,
            "ratio_ci": _ci(boot_arr[:, 1]) if np.isfinite(boot_arr[:, 1]).all() else None}


@with_threads
def compute(params: Params, model: Any, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    source = upstream["surprisal"]
    sp = source.key_inputs["params"]
    order = sp["tasks"]
    arrays: dict[str, np.ndarray] = {}
    fits: dict[str, Any] = {}
    for name in order:
        fit, curves = analyse(source.arrays[f"{name}.answer_nats"], params.n_boot, params.seed)
        task = tasks.get_task(name)
        fit["rule"] = task.rule
        if not task.random_rule:  # the ideal learner of the rule family, on the same prompts
            xs = source.arrays[f"{name}.x"].astype(np.int64)
            ideal = bayes.ideal_affine_surprisal(xs, task.a * xs + task.b, sp["ideal_slopes"],
                                                 sp["ideal_intercepts"], sp["ideal_y_max"])
            fit["ideal"] = ideal_comparison(source.arrays[f"{name}.answer_nats"], ideal, params.n_boot,
                                            params.seed)
            fit["ideal"]["log_support"] = float(np.log(sp["ideal_y_max"] + 1))  # log |Y| of "no rule"
        fits[name] = fit
        for key, value in curves.items():
            arrays[f"{name}.{key}"] = np.asarray(value, dtype=np.float64)
    data = {
        "model": source.data["model"],
        "n_prompts": source.data["n_prompts"],
        "k": source.data["k"],
        "source_key": source.key,
        "tasks": fits,
        "order": list(order),
    }
    return arrays, data
