"""Logit lens on the answer: at which depth is the output a number, and when is it the right one?

For each task we build ``n_prompts`` prompts of ``k`` examples; the first ``k - 1`` are the context and
the last one is the query whose answer we read. One pass of :class:`icl.runner.LlamaStack` per batch
records the residual stream after every layer at the answer positions, and :func:`icl.lens.answer_lens`
reads it through the final norm and the unembedding (:mod:`icl.lens`). Stored per task and per layer:
the probability and rank of the correct first answer token, the probability mass on number tokens, and
the teacher-forced log-probability of the whole answer, per prompt and as means with 95% bootstrap
intervals over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl import tasks
from icl.experiments import TASKS, between, reporter, with_threads
from icl.lens import answer_lens
from icl.runner import LlamaStack
from icl.scoring import encode
from icl.stats import bootstrap_mean_ci, first_at_least, first_at_least_range

NAME = "logit_lens"
VERSION = 4  # 2: base rates (modal first token, answer support) beside every accuracy; 3: bootstrap ranges of the first layers; 4: the last digit, and carries apart
CHAPTER = "report/03-logit-lens.qmd"
USES_MODEL = True
DESCRIPTION = "logit lens at the answer position: P(correct first token), rank, number-token mass per layer"
THREADS = 1  # one thread: the machine is shared, and oversubscribed OpenMP threads are several times slower
CPU_DTYPE = "bfloat16"  # on the CPU a float32 model runs in bf16 here (forward only); see run_config
BATCH_SIZE = 8


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = ("identity", "plus-1", "double-plus-3")
    n_prompts: int = 60
    k: int = 12  # examples per prompt, the last one being the query (the notes' prompt had 12 lines)
    seed: int = 0
    n_boot: int = 2000

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.n_prompts < 2 or self.k < 2:
            raise ValueError("need n_prompts >= 2 and k >= 2 (at least one context example)")


LIMITS = {"tasks": TASKS, "n_prompts": between(2, 2000), "k": between(2, 99), "n_boot": between(20, 10_000)}


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return tasks.make_suite(params.tasks, params.n_prompts, params.k, params.seed)


def content_digest(params: Params) -> str:
    return tasks.suite_digest(prompts_for(params))


def first_layer(curve: np.ndarray, threshold: float) -> int | None:
    return first_at_least(curve, threshold)


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    stack = LlamaStack(model.bridge)
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    n_layers = stack.n_layers
    say = reporter(NAME, progress)
    suite = prompts_for(params)
    for t, (name, prompts) in enumerate(suite.items(), 1):
        say(f"task {t}/{len(suite)} {name}: {len(prompts)} prompts through {n_layers} layers")
        res = answer_lens(stack, model.tokenizer, prompts, batch_size=BATCH_SIZE)
        arrays[f"{name}.p_first"] = res.p_first.astype(np.float32)
        arrays[f"{name}.rank_first"] = res.rank_first.astype(np.int32)
        arrays[f"{name}.number_mass"] = res.number_mass.astype(np.float32)
        arrays[f"{name}.logp_answer"] = res.logp_answer.astype(np.float32)
        arrays[f"{name}.logp_last"] = res.logp_last.astype(np.float32)
        curves = {}
        for key, values in (("p_first", res.p_first), ("number_mass", res.number_mass),
                            ("top1", (res.rank_first == 0).astype(float)),
                            ("logp_answer", res.logp_answer), ("logp_last", res.logp_last)):
            m, lo, hi = bootstrap_mean_ci(values, n_boot=params.n_boot, seed=params.seed)
            arrays[f"{name}.{key}.mean"], arrays[f"{name}.{key}.lo"], arrays[f"{name}.{key}.hi"] = m, lo, hi
            curves[key] = m
        arrays[f"{name}.median_rank"] = np.median(res.rank_first, axis=0)
        # Base rates. A reader that always names the commonest first answer token is right on
        # `modal_rate` of the prompts; the final top-1 is split by whether the answer starts with it.
        firsts = np.array([(lambda e: e.ids[e.answer_tokens[-1][0]])(encode(model.tokenizer, p)) for p in prompts])
        values, counts = np.unique(firsts, return_counts=True)
        modal = int(values[counts.argmax()])
        is_modal = firsts == modal
        arrays[f"{name}.first_is_modal"] = is_modal
        top1_final = (res.rank_first[:, -1] == 0).astype(float)[:, None]
        split = {}
        for label, which in (("modal", is_modal), ("other", ~is_modal)):
            if which.sum() >= 2:
                split[label] = [float(v[0]) for v in bootstrap_mean_ci(top1_final[which], n_boot=params.n_boot,
                                                                       seed=params.seed)] + [int(which.sum())]
        # y = x + b: answers whose units digit carries behave differently (chapter 1); split them
        carry = tasks.carries(name, np.array([p.xs[-1] for p in prompts]))
        by_carry = {}
        if carry is not None:
            arrays[f"{name}.carry"] = carry
            for label, which in (("carry", carry), ("no_carry", ~carry)):
                if which.sum() >= 2:
                    for key, values in (("logp_answer", res.logp_answer), ("logp_last", res.logp_last)):
                        m, lo, hi = bootstrap_mean_ci(values[which], n_boot=params.n_boot, seed=params.seed)
                        arrays[f"{name}.{key}.{label}.mean"] = m
                        arrays[f"{name}.{key}.{label}.lo"], arrays[f"{name}.{key}.{label}.hi"] = lo, hi
                    by_carry[label] = {"n": int(which.sum()),
                                       "final_logp_answer": [float(arrays[f"{name}.logp_answer.{label}.{s}"][-1])
                                                             for s in ("mean", "lo", "hi")],
                                       "final_logp_last": [float(arrays[f"{name}.logp_last.{label}.{s}"][-1])
                                                           for s in ("mean", "lo", "hi")]}
        is_number = first_layer(curves["number_mass"], 0.5)
        is_right = first_layer(curves["top1"], 0.5)
        summary[name] = {
            "rule": tasks.get_task(name).rule,
            "number_layer": is_number,  # first layer where > half the mass is on number tokens
            "right_layer": is_right,  # first layer where the correct first token is top-1 in > half the prompts
            # 95% bootstrap ranges of the two first layers (resampling prompts)
            "number_layer_range": first_at_least_range(res.number_mass, 0.5, params.n_boot, params.seed)[1],
            "right_layer_range": first_at_least_range((res.rank_first == 0).astype(float), 0.5, params.n_boot,
                                                      params.seed)[1],
            "p_half_layer": first_layer(curves["p_first"], 0.5),
            "final_p_first": float(curves["p_first"][-1]),
            "final_top1": float(curves["top1"][-1]),
            "final_number_mass": float(curves["number_mass"][-1]),
            "final_logp_answer": float(curves["logp_answer"][-1]),
            "final_logp_last": float(curves["logp_last"][-1]),
            "by_carry": by_carry,  # y = x + b only: final whole answer and last digit, carries apart
            "modal_first_token": model.tokenizer.decode([modal]),
            "modal_rate": float(is_modal.mean()),  # top-1 accuracy of always naming the modal first token
            "final_top1_by_first_token": split,  # [mean, lo, hi, n] for answers that start with it / not
            "floor_logp_answer": -float(np.log(tasks.answer_support(name))),  # knows the answers, not the rule
        }
    data = {"model": model.spec.name, "n_layers": n_layers, "n_prompts": params.n_prompts, "k": params.k,
            "seed": params.seed, "ci_level": 0.95, "tasks": summary,
            "notes_relative_depth": 20 / 32}
    return arrays, data
