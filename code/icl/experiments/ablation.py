"""Head ablation (zero and mean) and the notes' backup-head procedure, on the prompt pairs of
:mod:`icl.experiments.patching`.

1. Every query head is ablated at A's answer position, by zero and by its mean over the prompts
   (:func:`icl.ablation.last_position_ablation`), and the change in log P(correct first token) is stored
   with 95% bootstrap intervals over prompts.
2. The notes' procedure (seed 003): find the first layer W at which patching A's residual stream into B
   works (recovers at least ``threshold`` of the effect on the answer's first token, the notes'
   readout, at some query position: a single patched position never recovers half of the effect on
   the whole answer, see the patching experiment); zero-ablate, at every position, all heads of the two layers just before W (they
   write the stream that patching found; the notes ablated layers 10 and 11 when W was 12), in A *and
   in B*, so that the patched B cannot lean on heads the ablated A lacks; check A's answer (whole-answer
   log-probability and exact match); redo the patching sweep from the ablated A and find the new W;
   record which heads' direct effects on the answer logit grew (backup heads). Repeat ``iterations``
   times, ablations accumulating. Every step also reports the whole answer (teacher-forced): its
   recovered fraction, A's log-probability of it and A's exact match.

Nothing is computed twice: each task's clean A prompts run once (their keys, values and answer-position
residuals feed every ablation), and step 0 of the procedure, the unablated patching sweep, is exactly
the residual grid of the ``patching`` experiment on the same pairs, so it is read from that entry
(``DEPENDS``); only with pairs that entry does not hold (other ``n_pairs``, ``k`` or ``seed``) is it
computed here. Each ablated A of the procedure runs once too (:func:`icl.ablation.a_pass`: teacher-forced
through its answer, it gives the residual stream to patch, the whole-answer scores and the answer
position's direct effects), and its first batch is run again through TransformerLens's hooked bridge
as a check on the runner (``runner_matches_bridge``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats

from icl import ablation, patching, tasks
from icl.experiments import TASKS, between, reporter, with_threads
from icl.experiments.patching import bootstrap_recovered, first_layer_distribution
from icl.experiments.patching import prompts_for as patching_prompts
from icl.experiments.patching import Params as PatchingParams
from icl.runner import LlamaStack
from icl.stats import benjamini_hochberg, bootstrap_mean_ci, first_at_least

NAME = "ablation"
VERSION = 7  # 3: one clean pass per task, step 0 read from patching; 4: BH per-head tests, random-layer
# controls, bootstrap distribution of the first working layer; 5: the readout in chunks of rows (memory);
# 6: the whole answer (and exact match) beside the first token, the same heads ablated in B as in A;
# 7: each ablated A run once (a_pass) instead of three times; the bridge check on its first batch
CHAPTER = "report/05-ablation.qmd"
USES_MODEL = True
DESCRIPTION = "zero/mean ablation of every head at the answer position; ablate, re-patch, backup heads"
THREADS = 1
DEPENDS = ("patching",)  # step 0 of the procedure is patching's residual grid for the procedure task


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = ("plus-1", "double-plus-3")
    procedure_task: str = "plus-1"
    n_pairs: int = 50
    k: int = 12
    seed: int = 0
    iterations: int = 2
    threshold: float = 0.5
    n_boot: int = 1000
    n_controls: int = 3  # random blocks of layers, as many as the procedure ablates, per iteration
    fdr: float = 0.05  # Benjamini-Hochberg level of the per-head tests

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.procedure_task not in self.tasks:
            raise ValueError("procedure_task must be one of tasks")
        if self.n_pairs < 2 or self.k < 2 or self.iterations < 1:
            raise ValueError("need n_pairs >= 2, k >= 2, iterations >= 1")


LIMITS = {"tasks": TASKS, "procedure_task": TASKS, "n_pairs": between(2, 500), "k": between(2, 99),
          "iterations": between(1, 10), "threshold": between(0.01, 1.0), "n_boot": between(20, 10_000),
          "n_controls": between(0, 20), "fdr": between(0.001, 0.5)}


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return patching_prompts(PatchingParams(tasks=params.tasks, n_pairs=params.n_pairs, k=params.k, seed=params.seed))


def content_digest(params: Params) -> str:
    return tasks.suite_digest(prompts_for(params))


def _first_working(m: np.ndarray, threshold: float) -> int | None:
    return first_at_least(m.max(axis=1), threshold)  # best query position per layer


def _first_layer_summary(dist: np.ndarray) -> dict[str, Any]:
    """The bootstrap distribution of the first working layer (last entry: no layer works) and its 95%
    range, None standing for "no layer"."""
    cum = np.cumsum(dist)
    n = len(dist) - 1
    lo, hi = int(np.searchsorted(cum, 0.025)), int(np.searchsorted(cum, 0.975))
    return {"first_layer_boot": [float(v) for v in dist],
            "first_layer_range": [None if lo >= n else lo, None if hi >= n else hi]}


def _patching_step0(params: Params, upstream: dict[str, Any] | None) -> dict[str, tuple[np.ndarray, ...]] | None:
    """``{"first": ..., "answer": ...}``, each (logp [n, layers, positions], logp_a [n], logp_b [n]) of
    the resid_pre grid for the procedure task (first token, whole answer), plus ``"exact_a"``, from the
    patching entry, when that entry was computed on the same pairs; else None."""
    entry = (upstream or {}).get("patching")
    if entry is None:
        return None
    ep = entry.key_inputs["params"]
    name = params.procedure_task
    if (ep["n_pairs"], ep["k"], ep["seed"]) != (params.n_pairs, params.k, params.seed) or name not in ep["tasks"]:
        return None
    a = entry.arrays
    if f"{name}.resid_pre.logp_answer" not in a:
        return None
    f64 = {k: a[f"{name}.{k}"].astype(np.float64) for k in
           ("resid_pre.logp", "logp_a", "logp_b", "resid_pre.logp_answer", "logp_a_answer", "logp_b_answer")}
    return {"first": (f64["resid_pre.logp"], f64["logp_a"], f64["logp_b"]),
            "answer": (f64["resid_pre.logp_answer"], f64["logp_a_answer"], f64["logp_b_answer"]),
            "exact_a": (a[f"{name}.exact_a"].astype(np.float64),)}


def _mean_ci(v: np.ndarray, params: Params) -> list[float]:
    return [float(np.asarray(x).ravel()[0]) for x in bootstrap_mean_ci(np.asarray(v, np.float64)[:, None],
                                                                       n_boot=params.n_boot, seed=params.seed)]


def _recovered(tag: str, grids: dict[str, tuple[np.ndarray, ...]], params: Params,
               arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Recovered fractions of one step (first token: ``recovered``, ``first_layer``; whole answer:
    ``recovered_answer``, ``first_layer_answer``), their first working layers and the bootstrap
    distribution of each."""
    out: dict[str, Any] = {}
    for key, suffix in (("first", ""), ("answer", "_answer")):
        grid, la, lb = grids[key]
        m, lo, hi = bootstrap_recovered(grid, la, lb, params.n_boot, params.seed)
        dist = first_layer_distribution(grid, la, lb, params.n_boot, params.seed, params.threshold)
        name = f"recovered{suffix}"
        arrays[f"{tag}.{name}.mean"], arrays[f"{tag}.{name}.lo"], arrays[f"{tag}.{name}.hi"] = m, lo, hi
        summary = _first_layer_summary(dist)
        out[f"first_layer{suffix}"] = _first_working(m, params.threshold)
        out[f"first_layer_boot{suffix}"] = summary["first_layer_boot"]
        out[f"first_layer_range{suffix}"] = summary["first_layer_range"]
    return out


@with_threads
def compute(params: Params, model: Any, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    stack = LlamaStack(model.bridge)
    tok = model.tokenizer
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    say = reporter(NAME, progress)
    all_prompts = prompts_for(params)
    cleans: dict[str, ablation.ARuns] = {}
    for t, (name, prompts) in enumerate(all_prompts.items(), 1):
        say(f"task {t}/{len(all_prompts)} {name}: zero and mean ablation of {stack.n_layers * stack.n_heads} "
            f"heads on {len(prompts)} prompts")
        pairs = patching.make_pairs(tok, prompts)
        clean, caches = ablation.a_runs(stack, tok, pairs, keep_kv=True)  # the one clean pass of A
        cleans[name] = clean
        mean_z = clean.z.mean(dim=1)  # [n_layers, n_heads, d_head] over prompts, answer position
        abl = ablation.last_position_ablation(stack, tok, pairs, mean_z, caches=caches)
        del caches
        arrays[f"{name}.logp_a"] = clean.logp.astype(np.float32)
        arrays[f"{name}.direct.mean"] = clean.direct.mean(0)
        s: dict[str, Any] = {"logp_a": float(clean.logp.mean())}
        for mode, lp in abl.items():
            delta = lp - clean.logp[:, None, None]  # [n, layers, heads]
            m, lo, hi = bootstrap_mean_ci(delta, n_boot=params.n_boot, seed=params.seed)
            arrays[f"{name}.{mode}.delta.mean"], arrays[f"{name}.{mode}.delta.lo"] = m, lo
            arrays[f"{name}.{mode}.delta.hi"] = hi
            order = np.argsort(m, axis=None)[:5]
            # per-head test of "ablating it changes log P": one-sample t-test over prompts, with the
            # false discovery rate over all heads controlled by Benjamini-Hochberg
            p_values = scipy_stats.ttest_1samp(delta, 0.0, axis=0).pvalue  # [layers, heads]
            p_values = np.where(np.isfinite(p_values), p_values, 1.0)
            rejected, _ = benjamini_hochberg(p_values, params.fdr)
            arrays[f"{name}.{mode}.bh_significant"] = rejected
            s[mode] = {"worst": [[int(i // stack.n_heads), int(i % stack.n_heads), float(m.flat[i]),
                                  float(lo.flat[i]), float(hi.flat[i])] for i in order],
                       "n_significant": int((hi < 0).sum()),  # interval below zero, uncorrected
                       "n_tests": int(m.size),
                       "n_significant_bh": int((rejected & (m < 0)).sum()),  # harmful, FDR-controlled
                       "n_helpful_bh": int((rejected & (m > 0)).sum()),
                       "largest_drop": float(m.min())}
        summary[name] = s

    # the notes' procedure on one task
    name = params.procedure_task
    pairs = patching.make_pairs(tok, all_prompts[name])
    clean = cleans[name]
    step0 = _patching_step0(params, upstream)
    if step0 is None:
        say(f"procedure on {name}: patching sweep before any ablation")
        resid, a0, _ = ablation.a_pass(stack, pairs)
        grid = patching.fast_patch(stack, pairs, {"resid_pre": resid}, ["resid_pre"], whole_answer=True)
        step0 = {"first": (grid.logp["resid_pre"], a0.first.astype(np.float64), grid.logp_b),
                 "answer": (grid.answer["resid_pre"].answer, a0.answer, grid.answer_b.answer),
                 "exact_a": (a0.exact,)}
        from_patching = False
    else:
        say(f"procedure on {name}: patching sweep before any ablation read from the patching entry")
        from_patching = True
    first_steps = _recovered("procedure.0", step0, params, arrays)
    first = first_steps["first_layer"]
    steps: list[dict[str, Any]] = [{
        "ablated_layers": [], **first_steps,
        "logp_a_answer": _mean_ci(step0["answer"][1], params), "logp_a": _mean_ci(step0["first"][1], params),
        "exact_a": _mean_ci(step0["exact_a"][0], params)}]
    ablated_layers: list[int] = []
    for it in range(1, params.iterations + 1):
        if first is None or first < 1:
            break
        new = [layer for layer in (first - 2, first - 1) if layer >= 0 and layer not in ablated_layers]
        ablated_layers = sorted(set(ablated_layers) | set(new))
        say(f"procedure iteration {it}/{params.iterations}: layers {ablated_layers} ablated in A and B, "
            f"patching again")
        heads = [(layer, h) for layer in ablated_layers for h in range(stack.n_heads)]
        edit = ablation.zero_heads_edit(heads)
        resid, a_abl, runs = ablation.a_pass(stack, pairs, z_edit=edit)  # the ablated A, run once
        logp_abl = runs.logp
        grid = patching.fast_patch(stack, pairs, {"resid_pre": resid}, ["resid_pre"], whole_answer=True,
                                   z_edit=edit)
        # the runner against TransformerLens's own hooked forward, on the first batch of ablated A runs
        check = patching.subset(pairs, range(min(8, pairs.n)))
        _, b_logp = patching.a_activations(model.bridge, tok, check, kinds=(),
                                           fwd_hooks=ablation.zero_heads_hook(heads))
        # normalised by the ablated A (what is patched) and the B ablated the same way
        rec = _recovered(f"procedure.{it}", {
            "first": (grid.logp["resid_pre"], logp_abl.astype(np.float64), grid.logp_b),
            "answer": (grid.answer["resid_pre"].answer, a_abl.answer, grid.answer_b.answer)}, params, arrays)
        # matched controls: as many layers, in random contiguous blocks elsewhere, zeroed the same way
        controls = []
        rng = np.random.default_rng([params.seed, it])
        width = len(ablated_layers)
        starts = [s0 for s0 in range(stack.n_layers - width + 1) if s0 != min(ablated_layers)]
        for s0 in rng.choice(starts, size=min(params.n_controls, len(starts)), replace=False).tolist():
            block = list(range(s0, s0 + width))
            ctrl = patching.answer_scores(stack, pairs, z_edit=ablation.zero_heads_edit(
                [(layer, h) for layer in block for h in range(stack.n_heads)]))
            controls.append({"layers": block, "logp_a": _mean_ci(ctrl.first, params),
                             "logp_a_answer": _mean_ci(ctrl.answer, params),
                             "exact_a": _mean_ci(ctrl.exact, params)})
        change = runs.direct - clean.direct  # [n, layers, heads]
        cm, clo, chi = bootstrap_mean_ci(change, n_boot=params.n_boot, seed=params.seed)
        arrays[f"procedure.{it}.direct_change.mean"], arrays[f"procedure.{it}.direct_change.lo"] = cm, clo
        arrays[f"procedure.{it}.direct_change.hi"] = chi
        later = cm.copy()
        later[: max(ablated_layers) + 1] = -np.inf
        order = np.argsort(-later, axis=None)[:5]
        first = rec["first_layer"]
        steps.append({
            "ablated_layers": list(ablated_layers),
            **rec,
            "logp_a": _mean_ci(logp_abl, params),
            "logp_a_answer": _mean_ci(a_abl.answer, params),
            "exact_a": _mean_ci(a_abl.exact, params),
            "logp_b_answer": _mean_ci(grid.answer_b.answer, params),
            # the runner's log P(first token) against the bridge's, on the first batch
            "runner_matches_bridge": float(np.abs(runs.logp[: check.n] - b_logp.numpy()).max()),
            "random_layer_controls": controls,
            "backup_heads": [[int(i // stack.n_heads), int(i % stack.n_heads), float(cm.flat[i]),
                              float(clo.flat[i]), float(chi.flat[i])] for i in order],
        })
    data = {"model": model.spec.name, "n_layers": stack.n_layers, "n_heads": stack.n_heads,
            "n_kv_heads": stack.n_kv, "n_pairs": params.n_pairs, "k": params.k, "seed": params.seed,
            "threshold": params.threshold, "tasks": summary, "procedure_task": name, "procedure": steps,
            "step0_from_patching": from_patching}
    return arrays, data
