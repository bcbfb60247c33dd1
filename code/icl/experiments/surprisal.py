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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from icl import tasks
from icl.experiments import TASKS, between
from icl.scoring import score_examples
from icl.stats import bootstrap_mean_ci

NAME = "surprisal"
VERSION = 1
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

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.n_prompts < 2 or self.k < 1:
            raise ValueError("need n_prompts >= 2 and k >= 1")


LIMITS = {"tasks": TASKS, "n_prompts": between(2, 2000), "k": between(1, 99), "n_boot": between(20, 10_000)}


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return tasks.make_suite(params.tasks, params.n_prompts, params.k, params.seed)


def content_digest(params: Params) -> str:
    return tasks.suite_digest(prompts_for(params))


def _summarise(arrays: dict[str, np.ndarray], prefix: str, values: np.ndarray, n_boot: int, seed: int) -> tuple:
    mean, lo, hi = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
    arrays[f"{prefix}.mean"], arrays[f"{prefix}.lo"], arrays[f"{prefix}.hi"] = mean, lo, hi
    return mean, lo, hi


def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    for name, prompts in prompts_for(params).items():
        scores = score_examples(model.bridge, model.tokenizer, prompts, batch_size=BATCH_SIZE,
                                device=model.device, progress=progress, desc=name)
        arrays[f"{name}.answer_nats"] = scores.answer_nats.astype(np.float32)
        arrays[f"{name}.line_nats"] = scores.line_nats.astype(np.float32)
        arrays[f"{name}.exact"] = scores.exact
        arrays[f"{name}.answer_len"] = scores.answer_len.astype(np.int16)
        ans = scores.answer_nats
        m, lo, hi = _summarise(arrays, f"{name}.answer_nats", ans, params.n_boot, params.seed)
        _summarise(arrays, f"{name}.p_correct", np.exp(-ans), params.n_boot, params.seed)
        em, em_lo, em_hi = _summarise(arrays, f"{name}.exact", scores.exact.astype(float), params.n_boot, params.seed)
        cum, cum_lo, cum_hi = _summarise(arrays, f"{name}.cum_bits", np.cumsum(ans, axis=1) / math.log(2),
                                         params.n_boot, params.seed)
        tail = ans[:, -5:].mean(axis=1, keepdims=True)
        t, t_lo, t_hi = bootstrap_mean_ci(tail, n_boot=params.n_boot, seed=params.seed)
        task = tasks.get_task(name)
        summary[name] = {
            "rule": task.rule,
            "first_nats": [float(m[0]), float(lo[0]), float(hi[0])],
            "last_nats": [float(m[-1]), float(lo[-1]), float(hi[-1])],
            "tail5_nats": [float(t[0]), float(t_lo[0]), float(t_hi[0])],
            "last_exact": [float(em[-1]), float(em_lo[-1]), float(em_hi[-1])],
            "total_bits": [float(cum[-1]), float(cum_lo[-1]), float(cum_hi[-1])],
            "mean_answer_tokens": float(scores.answer_len.mean()),
        }
    data = {
        "model": model.spec.name,
        "n_prompts": params.n_prompts,
        "k": params.k,
        "seed": params.seed,
        "ci_level": 0.95,
        "tasks": summary,
    }
    return arrays, data
