"""How much information does a model need to learn a rule in context?

For each task of the suite (:mod:`icl.tasks`) we build ``n_prompts`` prompts of ``k`` examples, run one
teacher-forced forward pass per prompt and read off, for every example ``i``, the surprisal of its
answer given the ``i - 1`` examples before it (:mod:`icl.scoring`). Averaged over prompts this is the
in-context learning curve; its running sum is the total information the model consumed while learning
(or failing to learn) the rule. If the rule is learnt, surprisal falls to about zero and the sum
converges; if not, every example costs a roughly constant amount and the sum grows without bound.

Stored per task: the raw per-prompt matrices and, per example index, the mean and a 95% bootstrap
interval (resampling prompts) of answer surprisal (nats), probability of the correct answer, exact
match, and cumulative information (bits).

Chance levels, so that no number stands without its baseline:

* the *same-marginal control* of each rule (:func:`icl.tasks.shuffled_answers`): the first
  ``n_control`` prompts with their answers permuted among their own examples (no example keeps its
  answer). The answers' digits, parity, range and frequencies are the rule's; only the rule is gone.
  The paired difference, rule minus control on the same prompts, is what the rule is worth to the
  model; the random-rule task is a weaker control, since its answers also differ in marginal;
* the *rule-agnostic floor* ``log |Y|``: the surprisal of a learner that knows which answers the task
  can give (:func:`icl.tasks.answer_support`: 99 odd numbers for ``2x + 3``) but not the rule;
* the *ideal learner* of a stated family of affine rules (:func:`icl.bayes.ideal_affine_surprisal`):
  the exact Bayesian predictor on the same prompts, whose total is the information a rule of the family
  needs;
* for ``y = x + b``: examples whose units digit carries (``x`` ending in 9 for plus-1) reported apart
  from the rest, pooled over examples ``late_from`` .. ``k`` with intervals that resample prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from icl import tasks
from icl.bayes import ideal_affine_surprisal
from icl.experiments import TASKS, between, each_int, with_threads
from icl.scoring import score_examples
from icl.stats import bootstrap_mean_ci, cluster_bootstrap_mean_ci, store_mean_ci

NAME = "surprisal"
VERSION = 2  # 2: same-marginal controls, answer-support floor, ideal learner, carries
CHAPTER = "report/01-surprisal.qmd"
USES_MODEL = True
DESCRIPTION = "answer surprisal, P(correct) and exact match vs number of in-context examples, task suite"
THREADS = 1  # see icl.experiments.threads_of
CPU_DTYPE = "bfloat16"  # on the CPU a float32 model runs in bf16 here (forward only); see run_config
BATCH_SIZE = 8


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = tasks.DEFAULT_TASKS
    n_prompts: int = 100
    k: int = 20
    seed: int = 0
    n_boot: int = 2000
    n_control: int = 50  # prompts per rule scored again with their answers shuffled (at most n_prompts)
    late_from: int = 6  # carries vs the rest: examples late_from..k (1-based; at most k)
    ideal_slopes: tuple[int, ...] = (1, 2, 3)  # the ideal learner's rules y = a x + b ...
    ideal_intercepts: tuple[int, ...] = tuple(range(11))  # ... with these b; "no rule": y uniform
    ideal_y_max: int = 300  # on 0..ideal_y_max, prior mass one half

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.n_prompts < 2 or self.k < 1:
            raise ValueError("need n_prompts >= 2 and k >= 1")
        if self.n_control < 2:
            raise ValueError("need n_control >= 2")
        if self.late_from < 1:
            raise ValueError("need late_from >= 1")


LIMITS = {"tasks": TASKS, "n_prompts": between(2, 2000), "k": between(1, 99), "n_boot": between(20, 10_000),
          "n_control": between(2, 2000), "late_from": between(1, 99), "ideal_slopes": each_int(-99, 99),
          "ideal_intercepts": each_int(-999, 999), "ideal_y_max": between(1, 100_000)}


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return tasks.make_suite(params.tasks, params.n_prompts, params.k, params.seed)


def controls_for(params: Params, suite: dict[str, list[tasks.Prompt]]) -> dict[str, list[tasks.Prompt]]:
    """The same-marginal control of every rule of the suite (the random rule has none)."""
    return {name: tasks.shuffled_answers(prompts[: min(params.n_control, params.n_prompts)], params.seed)
            for name, prompts in suite.items() if not tasks.get_task(name).random_rule}


def content_digest(params: Params) -> str:
    suite = prompts_for(params)
    return tasks.suite_digest(suite) + tasks.prompts_digest(
        [p for prompts in controls_for(params, suite).values() for p in prompts])


def _triple(m: np.ndarray, lo: np.ndarray, hi: np.ndarray, i: int = 0) -> list[float]:
    return [float(np.ravel(m)[i]), float(np.ravel(lo)[i]), float(np.ravel(hi)[i])]


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    suite = prompts_for(params)
    controls = controls_for(params, suite)
    B, seed = params.n_boot, params.seed
    for name, prompts in suite.items():
        scores = score_examples(model.bridge, model.tokenizer, prompts, batch_size=BATCH_SIZE,
                                device=model.device, progress=progress, desc=name)
        arrays[f"{name}.answer_nats"] = scores.answer_nats.astype(np.float32)
        arrays[f"{name}.line_nats"] = scores.line_nats.astype(np.float32)
        arrays[f"{name}.exact"] = scores.exact
        arrays[f"{name}.answer_len"] = scores.answer_len.astype(np.int16)
        xs = np.array([p.xs for p in prompts])
        ys = np.array([p.ys for p in prompts])
        arrays[f"{name}.x"] = xs.astype(np.int16)
        ans = scores.answer_nats
        m, lo, hi = store_mean_ci(arrays, f"{name}.answer_nats", ans, B, seed)
        store_mean_ci(arrays, f"{name}.p_correct", np.exp(-ans), B, seed)
        em, em_lo, em_hi = store_mean_ci(arrays, f"{name}.exact", scores.exact.astype(float), B, seed)
        cum, cum_lo, cum_hi = store_mean_ci(arrays, f"{name}.cum_bits", np.cumsum(ans, axis=1) / math.log(2), B, seed)
        tail = ans[:, -5:].mean(axis=1, keepdims=True)
        t, t_lo, t_hi = bootstrap_mean_ci(tail, n_boot=B, seed=seed)
        task = tasks.get_task(name)
        ideal = ideal_affine_surprisal(xs, ys, params.ideal_slopes, params.ideal_intercepts, params.ideal_y_max)
        arrays[f"{name}.ideal_nats"] = ideal.mean(0)
        s: dict[str, Any] = {
            "rule": task.rule,
            "first_nats": _triple(m, lo, hi),
            "last_nats": _triple(m, lo, hi, -1),
            "tail5_nats": _triple(t, t_lo, t_hi),
            "last_exact": _triple(em, em_lo, em_hi, -1),
            "total_bits": _triple(cum, cum_lo, cum_hi, -1),
            "mean_answer_tokens": float(scores.answer_len.mean()),
            "support": tasks.answer_support(task),
            "floor_nats": math.log(tasks.answer_support(task)),
            "ideal_total_bits": float(ideal.sum(1).mean() / math.log(2)),
            "ideal_tail5_nats": float(ideal[:, -5:].mean()),
        }
        if name in controls:
            ctrl = score_examples(model.bridge, model.tokenizer, controls[name], batch_size=BATCH_SIZE,
                                  device=model.device, progress=progress, desc=f"shuffled {name}")
            c = ctrl.answer_nats
            arrays[f"{name}.shuffled.answer_nats"] = c.astype(np.float32)
            store_mean_ci(arrays, f"{name}.shuffled.answer_nats_curve", c, B, seed)
            n = len(controls[name])
            c_tail = c[:, -5:].mean(axis=1, keepdims=True)
            diff = tail[:n] - c_tail  # paired: the same prompts, answers in or out of their places
            s["shuffled_tail5_nats"] = _triple(*bootstrap_mean_ci(c_tail, n_boot=B, seed=seed))
            s["rule_minus_shuffled_tail5_nats"] = _triple(*bootstrap_mean_ci(diff, n_boot=B, seed=seed))
            s["shuffled_total_bits"] = _triple(*bootstrap_mean_ci(c.sum(1, keepdims=True) / math.log(2),
                                                                  n_boot=B, seed=seed))
        carry = tasks.carries(task, xs)
        first_late = min(params.late_from, params.k) - 1
        if carry is not None and carry[:, first_late:].any():
            late = np.zeros_like(carry)
            late[:, first_late:] = True
            prompt_of = np.repeat(np.arange(len(prompts))[:, None], params.k, axis=1)
            s["carries"] = {}
            for label, which in (("carry", carry & late), ("no_carry", ~carry & late)):
                if which.sum() < 2 or len(np.unique(prompt_of[which])) < 2:
                    continue
                vals = np.stack([ans[which], scores.exact[which].astype(float)], 1)
                cm, clo, chi = cluster_bootstrap_mean_ci(vals, prompt_of[which], n_boot=B, seed=seed)
                s["carries"][label] = {"nats": _triple(cm, clo, chi, 0), "exact": _triple(cm, clo, chi, 1),
                                       "n": int(which.sum()), "share_of_late_nats": float(ans[which].sum() / ans[late].sum())}
            for label, which in (("carry", carry), ("no_carry", ~carry)):  # per example index, NaN if none
                arrays[f"{name}.{label}_nats"] = np.array(
                    [ans[which[:, i], i].mean() if which[:, i].any() else np.nan for i in range(params.k)])
        summary[name] = s
    data = {
        "model": model.spec.name,
        "n_prompts": params.n_prompts,
        "n_control": min(params.n_control, params.n_prompts),
        "k": params.k,
        "seed": params.seed,
        "ci_level": 0.95,
        "ideal": {"slopes": list(params.ideal_slopes), "intercepts": list(params.ideal_intercepts),
                  "y_max": params.ideal_y_max, "p_rule": 0.5},
        "tasks": summary,
    }
    return arrays, data
