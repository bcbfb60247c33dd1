"""The induction-head phase change over seeds, with smeared keys, negative runs, a per-token-loss PCA and
an in-context score on held-out text (chapter 8).

``phase_change`` trains one 2-layer model and one 1-layer control: one sample of the transition. This
experiment trains, for each of ``n_seeds`` seeds (each its own Markov chain, initialisation, batches,
held-out batch and probe),

* ``L2`` — the 2-layer attention-only model and ``L1`` — the 1-layer control, as in ``phase_change``;
* ``L2s`` and ``L1s`` — the same with Olsson et al.'s *smeared keys* (:func:`icl.toymodels.smear_keys`:
  each key a learned per-head mix of the current and the previous position's), the architecture change
  under which a single layer can form an induction head and the transition should come earlier. They
  are trained for ``smeared_steps`` steps (a pilot run showed them settled well before that);

and, for the first ``n_negative`` seeds, two runs of the 2-layer model in which no phase change is
expected: ``L2.markov`` on the Markov chain alone (no repeated segments, nothing for an induction head
to do) and ``L2.low_lr`` at learning rate ``low_lr``. All variants of one seed start from the same
weights (the smeared models add one mixing weight per head) and read the same batches, so their
differences are paired. The models of one shape train as one program
(:func:`icl.toymodels.train_stacked`).

To fit five seeds of four architectures into a few minutes of one CPU thread, the setting is smaller
than ``phase_change``'s: the same width, heads and vocabulary, but sequences of ``n_ctx = 32`` tokens
(repeated segments of ``min_len``-``max_len - 1`` tokens) and a larger learning rate, under which the
transition comes within about 2,000 steps instead of 6,000.

Every ``eval_every`` steps each model is measured on its seed's held-out batch and probe:

* the **induction-probe score**: on repeated random tokens, loss at token ``icl_late`` (second copy)
  minus loss at token ``icl_early`` (first copy) (``phase_change``'s "ICL score");
* the **held-out ICL score**: the same difference on held-out sequences of the training distribution
  (Olsson et al.'s definition, on text of the kind the model was trained on);
* every head's previous-token and prefix-matching scores (on the probe), and the smearing weight
  ``sigma(alpha)`` of every head of the smeared models;
* the loss of every token of the held-out batch, for the per-token-loss PCA of Olsson et al.: one PCA
  per seed over the checkpoints of its 2-layer model and its 1-layer control.

The transition of each run is located with :func:`icl.experiments.phase_change.locate_transition` on
its best prefix-matching score (the best head of any layer); where its PCA trajectory moves fastest
with :func:`fastest_move`. The tests the chapter declares are evaluated by :func:`verdicts`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from icl import heads, timing, toymodels as tm
from icl.experiments import between, with_threads
from icl.experiments.phase_change import icl_score, locate_transition

NAME = "phase_seeds"
VERSION = 1
CHAPTER = "report/08-phase-change.qmd"
USES_MODEL = False
DESCRIPTION = "the phase change over seeds: 1 and 2 layers, smeared keys, negative runs, loss PCA, held-out ICL"
THREADS = 1  # the same seeds give the same weights at a fixed thread count

VARIANTS = {"L2": (2, False), "L1": (1, False), "L2s": (2, True), "L1s": (1, True)}  # name: layers, smeared
NEGATIVE = ("L2.markov", "L2.low_lr")  # 2-layer runs trained with L2, on the first n_negative seeds


@dataclass(frozen=True)
class Params:
    seed: int = 5  # the seeds are seed .. seed + n_seeds - 1 (seeds 0-4 were the pilot run)
    n_seeds: int = 5
    n_negative: int = 1
    steps: int = 2400
    smeared_steps: int = 1000
    lr: float = 1e-2
    low_lr: float = 1e-3
    batch: int = 32
    eval_every: int = 50
    d_model: int = 64
    n_heads: int = 4
    vocab: int = 64
    n_ctx: int = 32
    n_successors: int = 4
    min_len: int = 5  # repeated segments have a length in [min_len, max_len)
    max_len: int = 16
    n_heldout: int = 256
    n_probe: int = 128
    probe_len: int = 16
    icl_early: int = 5
    icl_late: int = 25
    induction_threshold: float = 0.3
    n_components: int = 3

    def validate(self) -> None:
        if not (0 < self.icl_early < self.probe_len <= self.icl_late < 2 * self.probe_len <= self.n_ctx):
            raise ValueError("need 0 < icl_early < probe_len <= icl_late < 2 * probe_len <= n_ctx")
        if self.eval_every < 1 or any(n < 10 * self.eval_every or n % self.eval_every
                                      for n in (self.steps, self.smeared_steps)):
            raise ValueError("need steps and smeared_steps multiples of eval_every, at least 10 of them")
        if self.d_model % self.n_heads or self.n_successors > self.vocab:
            raise ValueError("need d_model a multiple of n_heads and n_successors <= vocab")
        if not (1 <= self.min_len < self.max_len and 2 * (self.max_len - 1) <= self.n_ctx):
            raise ValueError("need 1 <= min_len < max_len and 2 * (max_len - 1) <= n_ctx")
        if self.n_negative > self.n_seeds:
            raise ValueError("need n_negative <= n_seeds")
        if self.n_components > 2 * (self.steps // self.eval_every + 1) - 1:
            raise ValueError("more components than checkpoints")


LIMITS = {"n_seeds": between(2, 64), "n_negative": between(0, 64), "steps": between(1, 100_000),
          "smeared_steps": between(1, 100_000), "lr": between(1e-6, 1.0), "low_lr": between(1e-6, 1.0),
          "batch": between(1, 1024), "eval_every": between(1, 100_000), "d_model": between(8, 512),
          "n_heads": between(1, 16), "vocab": between(4, 1024), "n_ctx": between(8, 512),
          "n_successors": between(1, 1024), "min_len": between(1, 256), "max_len": between(2, 257),
          "n_heldout": between(2, 4096), "n_probe": between(2, 4096), "probe_len": between(2, 256),
          "icl_early": between(1, 511), "icl_late": between(2, 511), "induction_threshold": between(0.0, 1.0),
          "n_components": between(1, 16)}


def seeds(p: Params) -> list[int]:
    return [p.seed + i for i in range(p.n_seeds)]


def data_spec(p: Params, repeats: bool = True) -> tm.MarkovRepeatSpec:
    return tm.MarkovRepeatSpec(vocab=p.vocab, n_ctx=p.n_ctx, n_successors=p.n_successors,
                               p_repeat=0.5 if repeats else 0.0, min_len=p.min_len, max_len=p.max_len)


def model_config(p: Params, n_layers: int, smeared: bool) -> tm.AttnOnlyConfig:
    return tm.AttnOnlyConfig(n_layers=n_layers, d_model=p.d_model, n_heads=p.n_heads, d_head=p.d_model // p.n_heads,
                             vocab=p.vocab, n_ctx=p.n_ctx, smeared_keys=smeared)


def eval_sets(p: Params, seed: int) -> tuple[tm.MarkovRepeatData, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed ``seed``'s data source, a held-out batch of it (with its repeat lengths) and its probe."""
    data = tm.MarkovRepeatData(data_spec(p), seed=seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    heldout, lens = data.sample(p.n_heldout, g)
    probe = tm.repeated_random_tokens(p.n_probe, p.probe_len, p.vocab, g)
    return data, heldout, lens, probe


def content_digest(p: Params) -> str:
    h = hashlib.sha256()
    for s in seeds(p):
        data, heldout, lens, probe = eval_sets(p, s)
        for t in (data.transition, heldout, lens, probe):
            h.update(t.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def measure(model: tm.AttnOnlyTransformer, heldout: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token held-out losses ``[n_heldout, n_ctx - 1]``, per-position probe losses and every head's
    previous-token and prefix-matching scores ``[layer, head]`` on the probe."""
    held = tm.next_token_loss(model(heldout), heldout, "none")
    logits, cache = model(probe, return_cache=True)
    out = {
        "heldout_tokens": held,
        "probe_loss": tm.next_token_loss(logits, probe, "none").mean(0),
        "prev_token": torch.stack([heads.previous_token_score(a) for a in cache["pattern"]]),
        "prefix_matching": torch.stack([heads.prefix_matching_score(a, probe) for a in cache["pattern"]]),
    }
    if model.cfg.smeared_keys:
        out["smear"] = torch.sigmoid(model.smear.detach())
    return out


def pca_scores(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of ``rows`` ``[n, features]`` (centred on their mean): the scores of every row
    on the first ``k`` components ``[n, k]`` and the fraction of the variance each explains ``[k]``. The
    sign of each component is fixed so that the first row scores negative on it."""
    x = rows - rows.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    scores = u[:, :k] * s[:k]
    scores *= np.where(scores[0] > 0, -1.0, 1.0)
    return scores, (s[:k] ** 2) / float((s ** 2).sum())


def fastest_move(steps: np.ndarray, path: np.ndarray, after: int) -> dict[str, Any]:
    """Where a trajectory ``path`` ``[checkpoint, component]`` moves fastest after step ``after`` (which
    leaves out the initial fall of the loss): the step that ends the longest move between neighbouring
    checkpoints, and that move's length over the median move after ``after`` (``ratio``)."""
    move = np.linalg.norm(np.diff(path, axis=0), axis=1)  # move[i]: from checkpoint i to i + 1
    late = steps[1:] > after
    i = int(np.argmax(np.where(late, move, -np.inf)))
    return {"step": int(steps[i + 1]), "ratio": float(move[i] / np.median(move[late]))}


def bend(path: np.ndarray, steps: np.ndarray, a: int, b: int, c: int) -> float:
    """The angle in degrees between a trajectory's way from step ``a`` to ``b`` and its way from ``b``
    to ``c`` (0: straight on, 90: a right angle)."""
    i, j, k = (int(np.searchsorted(steps, x)) for x in (a, b, c))
    u, v = path[j] - path[i], path[k] - path[j]
    cos = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-30))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def final(curve: np.ndarray) -> float:
    """Where a curve ends: the median of its last tenth of checkpoints (the end level of
    :func:`~icl.experiments.phase_change.locate_transition`), steadier than the last checkpoint alone."""
    return float(np.median(curve[-max(1, len(curve) // 10):]))


def t_interval(values: Any, level: float = 0.95) -> list[float]:
    """``[mean, low, high]``: Student-t interval for the mean of a few independent runs (``None`` where
    there are too few runs for it)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return [float(x.mean()) if len(x) else None, None, None]
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return [float(x.mean()), float(x.mean()) - half, float(x.mean()) + half]


def _copies(p: Params) -> dict[str, list[tuple[str, int]]]:
    """The runs of each shape, trained together: (run name, seed)."""
    s = seeds(p)
    groups = {v: [(v, x) for x in s] for v in VARIANTS}
    groups["L2"] += [(name, x) for name in NEGATIVE for x in s[: p.n_negative]]
    return groups


def _train_group(p: Params, group: str, copies: list[tuple[str, int]], sets: dict[int, tuple],
                 markov: dict[int, tm.MarkovRepeatData], progress: bool,
                 ) -> tuple[dict[str, np.ndarray], dict[tuple[str, int], np.ndarray]]:
    """Train the runs of one shape as one program: their curves ``{run.key: [seed, checkpoint, ...]}``
    and, for the plain variants, the held-out per-token losses at every checkpoint ``[checkpoint,
    n_heldout * (n_ctx - 1)]``."""
    n_layers, smeared = VARIANTS[group]
    steps = p.smeared_steps if smeared else p.steps
    cfg = model_config(p, n_layers, smeared)
    models = [tm.AttnOnlyTransformer(cfg, generator=torch.Generator().manual_seed(s)) for _, s in copies]
    sources = [markov[s] if run == "L2.markov" else sets[s][0] for run, s in copies]
    lrs = [p.low_lr if run == "L2.low_lr" else p.lr for run, _ in copies]
    work = tm.AttnOnlyTransformer(cfg)
    log: dict[str, list] = {}
    per_token: dict[tuple[str, int], list[np.ndarray]] = {}

    def on_eval(step: int, stacked: dict[str, torch.Tensor]) -> None:
        rows: dict[str, list] = {}
        for c, (run, s) in enumerate(copies):
            _, heldout, _, probe = sets[s]
            r = measure(tm.copy_of(stacked, c, work), heldout, probe)
            held = r.pop("heldout_tokens")
            if run in ("L2", "L1"):
                per_token.setdefault((run, s), []).append(held.numpy().ravel().copy())
            r["heldout_loss"] = held.mean(0)
            for key, value in r.items():
                rows.setdefault(key, []).append(value.numpy())
        for key, value in rows.items():
            log.setdefault(key, []).append(np.stack(value))

    with timing.timed(f"{group}.train_seconds"):
        losses = tm.train_stacked(models, lambda gs: tm.sample_many(sources, p.batch, gs)[0], steps=steps, lrs=lrs,
                                  seeds=[100_000 + s for _, s in copies], eval_every=p.eval_every,
                                  on_eval=on_eval, progress=progress, desc=group)
    curves = {k: np.stack(v, axis=1) for k, v in log.items()}  # [copy, checkpoint, ...]
    curves["train_loss"] = losses.T.reshape(len(copies), -1, p.eval_every).mean(-1)  # mean per eval interval
    arrays = {}
    for run in dict.fromkeys(run for run, _ in copies):
        idx = [c for c, (r, _) in enumerate(copies) if r == run]
        arrays.update({f"{run}.{key}": value[idx].astype(np.float32) for key, value in curves.items()})
    return arrays, {k: np.stack(v) for k, v in per_token.items()}


def _summarise(p: Params, run: str, arrays: dict[str, np.ndarray], steps: np.ndarray) -> dict[str, Any]:
    """Scores over training and, per seed, the transition and where each score ends."""
    # loss at token icl_late minus loss at token icl_early, on the probe and on held-out text: [seed, checkpoint]
    probe, held = icl_score(arrays[f"{run}.probe_loss"], p), icl_score(arrays[f"{run}.heldout_loss"], p)
    best = arrays[f"{run}.prefix_matching"].max(axis=(2, 3))  # the best head of any layer
    arrays[f"{run}.probe_score"], arrays[f"{run}.heldout_icl"], arrays[f"{run}.best_induction"] = probe, held, best
    runs = []
    for i in range(best.shape[0]):
        runs.append({
            "seed": p.seed + i,
            "transition": locate_transition(steps, best[i]),
            "to_75": locate_transition(steps, best[i], hi=0.75)["done"],  # where it stays above 75% of the rise
            "forms_induction": bool(final(best[i]) > p.induction_threshold),
            "final_induction": final(best[i]),
            "final_probe_score": final(probe[i]),
            "final_heldout_icl": final(held[i]),
            "final_heldout_loss": final(arrays[f"{run}.heldout_loss"][i].mean(-1)),
            "transition_heldout_icl": locate_transition(steps, -held[i]),
        })
    formed = [r["transition"]["step"] for r in runs if r["forms_induction"]]
    return {
        "runs": runs,
        "n_formed": len(formed),
        "transition_step": t_interval(formed),
        "final_probe_score": t_interval([r["final_probe_score"] for r in runs]),
        "final_heldout_icl": t_interval([r["final_heldout_icl"] for r in runs]),
        "final_induction": t_interval([r["final_induction"] for r in runs]),
    }


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    sets = {s: eval_sets(p, s) for s in seeds(p)}
    markov = {s: tm.MarkovRepeatData(data_spec(p, repeats=False), seed=s) for s in seeds(p)[: p.n_negative]}
    arrays: dict[str, np.ndarray] = {
        "step": np.arange(0, p.steps + 1, p.eval_every, dtype=np.int32),
        "step_smeared": np.arange(0, p.smeared_steps + 1, p.eval_every, dtype=np.int32),
    }
    per_token: dict[tuple[str, int], np.ndarray] = {}
    for group, copies in _copies(p).items():
        curves, tokens = _train_group(p, group, copies, sets, markov, progress)
        arrays.update(curves)
        per_token.update(tokens)
    summary: dict[str, Any] = {}
    for run in list(VARIANTS) + list(NEGATIVE):
        if f"{run}.probe_loss" in arrays:
            smeared = VARIANTS.get(run, (2, False))[1]
            summary[run] = _summarise(p, run, arrays, arrays["step_smeared" if smeared else "step"])

    # one PCA per seed over the checkpoints of its 2-layer model and its 1-layer control
    k, n_eval, steps = p.n_components, len(arrays["step"]), arrays["step"]
    scores = np.zeros((p.n_seeds, 2, n_eval, k), dtype=np.float32)
    explained = np.zeros((p.n_seeds, k), dtype=np.float32)
    for i, s in enumerate(seeds(p)):
        rows = np.concatenate([per_token[("L2", s)], per_token[("L1", s)]]).astype(np.float64)
        sc, explained[i] = pca_scores(rows, k)
        scores[i] = sc.reshape(2, n_eval, k)
        for j, run in enumerate(("L2", "L1")):
            r = summary[run]["runs"][i]
            r["pca_fastest"] = fastest_move(steps, sc.reshape(2, n_eval, k)[j], after=p.steps // 10)
        r2 = summary["L2"]["runs"][i]  # how much the 2-layer path bends: drift before the rise vs the rise
        r2["pca_bend"] = bend(scores[i, 0].astype(np.float64), steps, p.steps // 10,
                              r2["transition"]["onset"], r2["to_75"])
    arrays["pca.scores"], arrays["pca.explained"] = scores, explained

    diff = [a["transition"]["step"] - b["transition"]["step"] for a, b in
            zip(summary["L2"]["runs"], summary["L2s"]["runs"]) if a["forms_induction"] and b["forms_induction"]]
    summary["smeared_earlier"] = {"n": len(diff), "differences": diff, "interval": t_interval(diff)}
    summary["bigram_entropy"] = [sets[s][0].bigram_entropy for s in seeds(p)]
    summary["uniform_entropy"] = float(np.log(p.vocab))
    summary["n_params"] = {v: tm.AttnOnlyTransformer(model_config(p, *VARIANTS[v])).n_params() for v in VARIANTS}
    summary["threads"] = THREADS
    summary["params"] = json.loads(json.dumps(asdict(p)))
    return arrays, summary


# ------------------------------------------------------------------------------------- the tests
# Declared in the chapter before its results, with these thresholds.
TESTS = {
    "probe_below": -1.0,          # T1, T5: an induction-probe score that ends below this (nats) is induction
    "abrupt_fraction": 0.25,      # T2: 10% -> 75% of the rise within this fraction of the steps before it
    "spread_fraction": 0.25,      # T3: the 95% interval of the transition step within this fraction of its mean
    "control_probe_above": -0.5,  # T4: the 1-layer control's induction-probe score ends above this (nats)
    "heldout_gap": 0.2,           # T7: the 2-layer model's held-out ICL score ends this far below its control's
    "pca_seeds": 4,               # T8: the per-token losses move fastest inside the window in this many seeds
}


def verdicts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each test the chapter declares, evaluated on an entry's data: ``{name: {"pass": bool, ...}}``."""
    t, p = TESTS, data["params"]
    L2, L1, L1s = data["L2"]["runs"], data["L1"]["runs"], data["L1s"]["runs"]
    out: dict[str, dict[str, Any]] = {}
    out["T1_every_seed"] = {"pass": all(r["forms_induction"] and r["final_probe_score"] < t["probe_below"] for r in L2)}
    ratio = [(r["to_75"] - r["transition"]["onset"]) / max(r["transition"]["onset"], 1) for r in L2]
    out["T2_abrupt"] = {"pass": all(x <= t["abrupt_fraction"] for x in ratio), "ratios": ratio}
    mean, lo, hi = data["L2"]["transition_step"]
    half = None if lo is None else (hi - lo) / 2
    out["T3_spread"] = {"pass": data["L2"]["n_formed"] == len(L2) and half is not None
                        and half <= t["spread_fraction"] * mean, "half_width": half, "mean": mean}
    out["T4_control"] = {"pass": all(not r["forms_induction"] and r["final_probe_score"] > t["control_probe_above"]
                                     for r in L1)}
    out["T5_smeared_one_layer"] = {"pass": all(r["forms_induction"] and r["final_probe_score"] < t["probe_below"]
                                               for r in L1s)}
    diff = data["smeared_earlier"]
    out["T6_smeared_earlier"] = {"pass": diff["n"] == len(L2) and all(d > 0 for d in diff["differences"])
                                 and diff["interval"][1] is not None and diff["interval"][1] > 0}
    gaps = [c["final_heldout_icl"] - m["final_heldout_icl"] for m, c in zip(L2, L1)]
    out["T7_heldout_icl"] = {"pass": all(g >= t["heldout_gap"] for g in gaps), "gaps": gaps}
    inside = [r["transition"]["onset"] - p["eval_every"] <= r["pca_fastest"]["step"]
              <= r["transition"]["done"] + p["eval_every"] for r in L2]
    out["T8_pca_fastest"] = {"pass": sum(inside) >= t["pca_seeds"], "inside": inside}
    negative = [r for run in NEGATIVE if run in data for r in data[run]["runs"]]
    out["T9_negative"] = {"pass": all(not r["forms_induction"] for r in negative), "n": len(negative)}
    return out
