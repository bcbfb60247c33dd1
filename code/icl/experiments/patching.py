"""Residual-stream, attention-output and MLP-output patching from the run with examples (A) into the
run with only the query line (B), layers × query positions, over many prompt pairs.

Pairs come from :func:`icl.tasks.make_prompts` (``k`` examples, the last one the query); only prompts
whose query ``x`` has two digits are kept, so every B run has the same tokens-per-line (SmolLM2: ``(``,
two digit tokens, ``,``, space; Llama-3: ``(``, one number token, ``,``, space, after its BOS) and the
pairs batch together. A's activations are read once through bridge hooks
at the aligned positions, and :func:`icl.patching.fast_patch` computes every cell (see
:mod:`icl.patching`; ``benchmarks/patching_speed.py`` checks it against TransformerLens's own patching).

Stored per task and kind: the per-pair log-probability of the correct first answer token after each
patch ``[pairs, layers, positions]``, A's and B's own values, the fraction of the A–B effect recovered
(ratio of means) with 95% bootstrap intervals over pairs, and how often B's argmax after the patch is
the first token of the correct answer, of ``2x`` and of ``x`` (copying): its first digit for SmolLM2,
the whole number for Llama-3 (whose numbers up to 999 are one token each).

The first token is a weak readout (for ``x + 1`` it is usually the first digit of ``x`` too), so B also
runs on through the correct answer, teacher-forced, and every cell stores the log-probability of the
**whole answer** (``y)``, all its tokens), of its **last digit**, and whether greedy decoding gets the
whole answer right, with the same recovered fractions. Their baselines: the rule-agnostic floor
``-log |Y|`` over the answers two-digit queries can have, the share of the commonest answer (exact
match of a constant guess), and for ``y = x + b`` the pairs whose answer carries, reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl import patching, tasks
from icl.experiments import TASKS, between, reporter, with_threads
from icl.runner import LlamaStack
from icl.stats import first_at_least, resampled_means

NAME = "patching"
VERSION = 4  # 3: base rates of the first-token readouts and the pairs that tell answer from copy;
# 4: whole-answer and last-digit log-probabilities and exact match, teacher-forced, with their baselines
CHAPTER = "report/04-patching.qmd"
USES_MODEL = True
DESCRIPTION = "activation patching A (k examples) -> B (query only): resid/attn/MLP, layers x query positions"
THREADS = 1  # one thread: the machine is shared, and oversubscribed OpenMP threads are several times slower


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = ("plus-1", "double-plus-3")
    n_pairs: int = 50
    k: int = 12
    seed: int = 0
    n_boot: int = 1000
    threshold: float = 0.5  # a layer "works" when a patch there recovers this fraction of the effect

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.n_pairs < 2 or self.k < 2:
            raise ValueError("need n_pairs >= 2 and k >= 2")
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")


LIMITS = {"tasks": TASKS, "n_pairs": between(2, 500), "k": between(2, 99), "n_boot": between(20, 10_000),
          "threshold": between(0.01, 1.0)}


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    """The first ``n_pairs`` prompts (seeded) whose query x has two digits."""
    params.validate()
    out = {}
    for name in params.tasks:
        pool = tasks.make_prompts(name, 3 * params.n_pairs + 20, params.k, params.seed)
        chosen = [p for p in pool if p.xs[-1] >= 10][: params.n_pairs]
        if len(chosen) < params.n_pairs:
            raise ValueError("not enough prompts with a two-digit query")
        out[name] = chosen
    return out


def content_digest(params: Params) -> str:
    return tasks.suite_digest(prompts_for(params))


def _recovered_boots(logp: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray, n_boot: int,
                     seed: int) -> np.ndarray:
    """The recovered fraction (ratio of means) on ``n_boot`` resamples of the pairs: ``[n_boot, ...]``."""
    n = logp.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    lp = logp.astype(np.float64)
    num = resampled_means(lp, idx) - logp_b[idx].mean(1).reshape((n_boot,) + (1,) * (lp.ndim - 1))
    den = (logp_a[idx].mean(1) - logp_b[idx].mean(1)).reshape((n_boot,) + (1,) * (lp.ndim - 1))
    return num / den


def bootstrap_recovered(logp: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray, n_boot: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recovered fraction (ratio of means) with a percentile bootstrap over pairs; logp [n, ...]."""
    lo, hi = np.quantile(_recovered_boots(logp, logp_a, logp_b, n_boot, seed), [0.025, 0.975], axis=0)
    return patching.recovered(logp.astype(np.float64), logp_a, logp_b), lo, hi


def first_layer_distribution(logp: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray, n_boot: int, seed: int,
                             threshold: float) -> np.ndarray:
    """The bootstrap distribution of the first working layer: on the resamples of
    :func:`bootstrap_recovered` (same seed, same pairs), the first layer whose best query position
    recovers at least ``threshold``. ``logp`` ``[n, layers, positions]``; returns ``[layers + 1]`` shares,
    the last entry for resamples in which no layer works."""
    L = logp.shape[1]
    works = _recovered_boots(logp, logp_a, logp_b, n_boot, seed).max(axis=2) >= threshold  # [boot, layers]
    first = np.where(works.any(1), works.argmax(1), L)
    return np.bincount(first, minlength=L + 1) / n_boot


def first_token(tokenizer, number: int) -> int:
    return int(tokenizer(str(number), add_special_tokens=False)["input_ids"][0])


def _first_working_layer(m: np.ndarray, layers: list[int], threshold: float) -> int | None:
    first = first_at_least(m.max(axis=1), threshold)  # best query position per layer
    return int(layers[first]) if first is not None else None


def summarise_answers(tag: str, grid: patching.PatchGrid, a: patching.AnswerScores, params: Params,
                      arrays: dict[str, np.ndarray], split: np.ndarray | None = None) -> dict[str, Any]:
    """Whole-answer and last-digit recovered fractions and exact match of every kind of patch; with
    ``split`` (a bool per pair, e.g. carries) the residual grid's whole-answer fraction on each part."""
    assert grid.answer is not None and grid.answer_b is not None
    out: dict[str, Any] = {}
    b = grid.answer_b
    for key in ("answer", "last"):
        arrays[f"{tag}.logp_a_{key}"] = getattr(a, key).astype(np.float32)
        arrays[f"{tag}.logp_b_{key}"] = getattr(b, key).astype(np.float32)
    arrays[f"{tag}.exact_a"], arrays[f"{tag}.exact_b"] = a.exact, b.exact
    for kind, sc in grid.answer.items():
        arrays[f"{tag}.{kind}.logp_answer"] = sc.answer.astype(np.float32)
        arrays[f"{tag}.{kind}.exact"] = sc.exact.mean(0)  # [layers, positions]
        out[kind] = {}
        for key in ("answer", "last"):
            m, lo, hi = bootstrap_recovered(getattr(sc, key), getattr(a, key).astype(np.float64),
                                            getattr(b, key).astype(np.float64), params.n_boot, params.seed)
            arrays[f"{tag}.{kind}.recovered_{key}.mean"], arrays[f"{tag}.{kind}.recovered_{key}.lo"] = m, lo
            arrays[f"{tag}.{kind}.recovered_{key}.hi"] = hi
            out[kind][f"first_layer_{key}"] = _first_working_layer(m, grid.layers, params.threshold)
            out[kind][f"max_recovered_{key}"] = float(m.max())
        out[kind]["max_exact"] = float(sc.exact.mean(0).max())
    if split is not None:
        sc = grid.answer["resid_pre"]
        for part, rows in (("carry", split), ("no_carry", ~split)):
            if rows.sum() >= 2:
                m, lo, hi = bootstrap_recovered(sc.answer[rows], a.answer[rows].astype(np.float64),
                                                b.answer[rows].astype(np.float64), params.n_boot, params.seed)
                arrays[f"{tag}.resid_pre.recovered_answer.{part}.mean"] = m
                arrays[f"{tag}.resid_pre.recovered_answer.{part}.lo"] = lo
                arrays[f"{tag}.resid_pre.recovered_answer.{part}.hi"] = hi
                arrays[f"{tag}.resid_pre.exact.{part}"] = sc.exact[rows].mean(0)
    return out


def summarise_grid(tag: str, grid: patching.PatchGrid, logp_a: np.ndarray, targets: dict[str, np.ndarray],
                   params: Params, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Store one grid's arrays under ``tag`` and return its JSON summary."""
    out: dict[str, Any] = {}
    for kind, lp in grid.logp.items():
        arrays[f"{tag}.{kind}.logp"] = lp.astype(np.float32)
        m, lo, hi = bootstrap_recovered(lp, logp_a, grid.logp_b, params.n_boot, params.seed)
        arrays[f"{tag}.{kind}.recovered.mean"], arrays[f"{tag}.{kind}.recovered.lo"] = m, lo
        arrays[f"{tag}.{kind}.recovered.hi"] = hi
        for name, tok in targets.items():
            arrays[f"{tag}.{kind}.argmax_{name}"] = (grid.argmax[kind] == tok[:, None, None]).mean(0)
        best = m.max(axis=1)  # best query position per layer
        first = first_at_least(best, params.threshold)
        out[kind] = {
            "first_layer": int(grid.layers[first]) if first is not None else None,
            "best_position_at_first_layer": int(m[first].argmax()) if first is not None else None,
            "max_recovered": float(m.max()),
        }
    arrays[f"{tag}.logp_b"] = grid.logp_b.astype(np.float32)
    return out


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    stack = LlamaStack(model.bridge)
    tok = model.tokenizer
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    q_tokens = None
    say = reporter(NAME, progress)
    suite = prompts_for(params)
    for t, (name, prompts) in enumerate(suite.items(), 1):
        say(f"task {t}/{len(suite)} {name}: {len(prompts)} pairs, residual/attention/MLP patches at every "
            f"layer and query position")
        pairs = patching.make_pairs(tok, prompts)
        acts, logp_a = patching.a_activations(model.bridge, tok, pairs)
        grid = patching.fast_patch(stack, pairs, acts, whole_answer=True)
        a_answer = patching.answer_scores(stack, pairs)
        xs = np.array(pairs.xs)
        targets = {"y": pairs.target.numpy(),
                   "2x": np.array([first_token(tok, 2 * x) for x in xs]),
                   "x": np.array([first_token(tok, x) for x in xs])}
        arrays[f"{name}.logp_a"] = logp_a.numpy().astype(np.float32)
        s = summarise_grid(name, grid, logp_a.numpy().astype(np.float64), targets, params, arrays)
        carry = tasks.carries(name, xs)
        if carry is not None:
            arrays[f"{name}.carry"] = carry
        whole = summarise_answers(name, grid, a_answer, params, arrays, carry)
        for kind in whole:
            s[kind].update(whole[kind])
        task = tasks.get_task(name)
        two_digit = np.arange(max(10, task.x_min), task.x_max + 1)
        ys = np.array(pairs.ys)
        s["answer"] = {"logp_a": float(a_answer.answer.mean()), "logp_b": float(grid.answer_b.answer.mean()),
                       "logp_a_last": float(a_answer.last.mean()), "logp_b_last": float(grid.answer_b.last.mean()),
                       "exact_a": float(a_answer.exact.mean()), "exact_b": float(grid.answer_b.exact.mean()),
                       # a reader who knows only which answers two-digit queries can have
                       "floor_logp": -float(np.log(tasks.answer_support(task) if task.random_rule else
                                                   len(np.unique(task.a * two_digit + task.b)))),
                       "modal_answer": float((ys == np.bincount(ys).argmax()).mean()),
                       "n_carry": None if carry is None else int(carry.sum()),
                       "runner_matches_bridge": float(np.abs(a_answer.first - logp_a.numpy()).max())}
        arrays[f"{name}.argmax_b_y"] = np.array((grid.argmax_b == targets["y"]).mean())
        s["logp_a"] = float(logp_a.mean())
        s["logp_b"] = float(grid.logp_b.mean())
        s["b_argmax_is_y"] = float((grid.argmax_b == targets["y"]).mean())
        s["b_argmax_is_x"] = float((grid.argmax_b == targets["x"]).mean())
        s["rule"] = tasks.get_task(name).rule
        # Base rates of the first-token readouts: always naming the commonest first token of y (or of 2x)
        # is right this often, and a pair whose y starts like x cannot tell the answer from a copy of x.
        s["base_rates"] = {f"modal_{key}": float((v == np.bincount(v).argmax()).mean())
                           for key, v in (("y", targets["y"]), ("2x", targets["2x"]))}
        informative = targets["y"] != targets["x"]
        s["base_rates"]["y_first_equals_x_first"] = float((~informative).mean())
        s["n_informative"] = int(informative.sum())
        if informative.any():
            hit = grid.argmax["resid_pre"][informative] == targets["y"][informative, None, None]
            arrays[f"{name}.resid_pre.argmax_y_informative"] = hit.mean(0)  # [layers, positions]
        summary[name] = s
        q_tokens = [tok.decode([t]) for t in pairs.b_ids[0, -pairs.q_len:].tolist()]
    data = {"model": model.spec.name, "n_layers": stack.n_layers, "n_pairs": params.n_pairs, "k": params.k,
            "seed": params.seed, "threshold": params.threshold, "query_tokens_example": q_tokens,
            "tasks": summary}
    return arrays, data
