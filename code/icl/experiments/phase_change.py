"""The induction-head phase change in a small attention-only transformer, trained here (chapter 7).

Two models are trained from scratch on :class:`icl.toymodels.MarkovRepeatData` (a sparse random Markov
chain in which half of the sequences start with ``L`` random tokens repeated once): the 2-layer model
in which induction heads can form, and a 1-layer control in which they cannot (an induction head needs
a previous-token head in an earlier layer). Every ``eval_every`` steps we record

* the per-token loss on a fixed held-out batch of the training distribution (for the derivative of the
  loss with respect to log token index) and on a fixed probe of repeated random tokens;
* the ICL score: on the probe, loss at token ``icl_late`` minus loss at token ``icl_early`` (nats;
  negative means later tokens are easier, i.e. in-context learning);
* every head's previous-token and prefix-matching score (on the probe, :mod:`icl.heads`) and its
  eigenvalue copying score (from the weights).

After training the final weights are kept (both models are < 200 KB) and the induction heads of the
2-layer model are ablated, singly and together, zero and mean ablation, to see the ICL score collapse.
The phase-change step is located by a stated rule (:func:`locate_transition`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from icl import heads, timing, toymodels as tm
from icl.experiments import between, each_int, with_threads

NAME = "phase_change"
VERSION = 2  # 2: fused QKV + SDPA forward and fused AdamW; L2 weights kept at `checkpoints`
CHAPTER = "report/08-phase-change.qmd"
USES_MODEL = False
DESCRIPTION = "2-layer attention-only transformer trained here: induction heads, ICL score, 1-layer control"
THREADS = 1  # the same seed gives the same weights at a fixed thread count


@dataclass(frozen=True)
class Params:
    seed: int = 0
    steps: int = 8000
    lr: float = 3e-3
    batch: int = 32
    eval_every: int = 100
    d_model: int = 64
    n_heads: int = 4
    vocab: int = 64
    n_ctx: int = 64
    n_successors: int = 4
    n_heldout: int = 512
    n_probe: int = 256
    probe_len: int = 32
    icl_early: int = 10
    icl_late: int = 50
    induction_threshold: float = 0.3
    # steps at which the 2-layer model's weights are kept (for llc_phase_change), denser around the change
    checkpoints: tuple[int, ...] = (100, 500, 1000, 2000, 3500, 5000, 5600, 5800, 6000, 6100, 6200,
                                    6400, 6600, 7000, 8000)

    def validate(self) -> None:
        if not (0 < self.icl_early < self.probe_len <= self.icl_late < 2 * self.probe_len <= self.n_ctx):
            raise ValueError("need 0 < icl_early < probe_len <= icl_late < 2 * probe_len <= n_ctx")
        if self.steps < self.eval_every or self.eval_every < 1:
            raise ValueError("need steps >= eval_every >= 1")
        steps = [int(s) for s in self.checkpoints]
        if any(s < 0 or s > self.steps or s % self.eval_every for s in steps) or steps != sorted(set(steps)):
            raise ValueError("checkpoints must be distinct, increasing multiples of eval_every in [0, steps]")
        if self.d_model % self.n_heads or self.n_successors > self.vocab:
            raise ValueError("need d_model a multiple of n_heads and n_successors <= vocab")


LIMITS = {"steps": between(1, 100_000), "lr": between(1e-6, 1.0), "batch": between(1, 1024),
          "eval_every": between(1, 100_000), "d_model": between(8, 512), "n_heads": between(1, 16),
          "vocab": between(4, 1024), "n_ctx": between(8, 512), "n_successors": between(1, 1024),
          "n_heldout": between(2, 4096), "n_probe": between(2, 4096), "probe_len": between(2, 256),
          "icl_early": between(1, 511), "icl_late": between(2, 511), "induction_threshold": between(0.0, 1.0),
          "checkpoints": each_int(0, 100_000)}


def data_spec(p: Params) -> tm.MarkovRepeatSpec:
    return tm.MarkovRepeatSpec(vocab=p.vocab, n_ctx=p.n_ctx, n_successors=p.n_successors)


def model_config(p: Params, n_layers: int) -> tm.AttnOnlyConfig:
    return tm.AttnOnlyConfig(n_layers=n_layers, d_model=p.d_model, n_heads=p.n_heads,
                             d_head=p.d_model // p.n_heads, vocab=p.vocab, n_ctx=p.n_ctx)


def eval_sets(p: Params) -> tuple[tm.MarkovRepeatData, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data source, a held-out batch of it (with repeat lengths) and the repeated-random probe."""
    data = tm.MarkovRepeatData(data_spec(p), seed=p.seed)
    g = torch.Generator().manual_seed(10_000 + p.seed)
    heldout, lens = data.sample(p.n_heldout, g)
    probe = tm.repeated_random_tokens(p.n_probe, p.probe_len, p.vocab, g)
    return data, heldout, lens, probe


def content_digest(p: Params) -> str:
    data, heldout, lens, probe = eval_sets(p)
    h = hashlib.sha256()
    for t in (data.transition, heldout, lens, probe):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def icl_score(loss_by_pos: np.ndarray, p: Params) -> np.ndarray:
    """Loss at token ``icl_late`` minus loss at token ``icl_early`` (``loss_by_pos[..., t - 1]`` is the
    loss of token ``t``); negative = in-context learning."""
    return loss_by_pos[..., p.icl_late - 1] - loss_by_pos[..., p.icl_early - 1]


@torch.no_grad()
def measure(model: tm.AttnOnlyTransformer, heldout: torch.Tensor, probe: torch.Tensor,
            head_mask: torch.Tensor | None = None, head_mean: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Per-token losses on both sets and every head's scores."""
    held_loss = tm.next_token_loss(model(heldout, head_mask=head_mask, head_mean=head_mean), heldout, "none")
    logits, cache = model(probe, return_cache=True, head_mask=head_mask, head_mean=head_mean)
    probe_loss = tm.next_token_loss(logits, probe, "none")
    L = model.cfg.n_layers
    return {
        "heldout_loss": held_loss.mean(0).numpy(),
        "probe_loss": probe_loss.mean(0).numpy(),
        "prev_token": torch.stack([heads.previous_token_score(cache["pattern"][i]) for i in range(L)]).numpy(),
        "prefix_matching": torch.stack([heads.prefix_matching_score(cache["pattern"][i], probe)
                                        for i in range(L)]).numpy(),
        "copying": torch.stack([heads.copying_score(model.W_E, model.W_V[i], model.W_O[i], model.W_U)
                                for i in range(L)]).numpy(),
    }


def locate_transition(steps: np.ndarray, score: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> dict[str, Any]:
    """Where a rising score crosses 10%, 50% and 90% of the way from its starting plateau (the median of
    the first tenth of the evaluations) to its final value (the median of the last tenth): the phase
    change is placed at the 50% crossing, its width is the 10%→90% interval. Crossings are the first
    evaluation at or above the level after which the score never falls back below it."""
    n = max(1, len(score) // 10)
    start, end = float(np.median(score[:n])), float(np.median(score[-n:]))
    out: dict[str, Any] = {"start": start, "end": end, "rise": end - start}
    for name, frac in (("onset", lo), ("step", 0.5), ("done", hi)):
        level = start + frac * (end - start)
        below = np.nonzero(score < level)[0]
        idx = 0 if len(below) == 0 else int(below[-1]) + 1
        out[name] = int(steps[min(idx, len(steps) - 1)])
    return out


def _train_one(p: Params, n_layers: int, data: tm.MarkovRepeatData, heldout: torch.Tensor,
               probe: torch.Tensor, progress: bool,
               on_checkpoint: Callable[[int, tm.AttnOnlyTransformer], None] | None = None,
               ) -> tuple[tm.AttnOnlyTransformer, dict[str, np.ndarray], list[float]]:
    """Train one model, measuring it every ``eval_every`` steps. ``on_checkpoint(step, model)``, if
    given, runs right after each measurement (steps 0, eval_every, ..., steps) and must not modify the
    model; it does not touch the training generator, so the run is the same with or without it (the
    ``llc_phase_change`` experiment copies checkpoints this way)."""
    model = tm.AttnOnlyTransformer(model_config(p, n_layers), generator=torch.Generator().manual_seed(p.seed))
    log: dict[str, list] = {}

    def on_eval(step: int) -> None:
        log.setdefault("step", []).append(step)
        for key, value in measure(model, heldout, probe).items():
            log.setdefault(key, []).append(value)
        if on_checkpoint is not None:
            on_checkpoint(step, model)

    losses = tm.train(model, lambda g: data.sample(p.batch, g)[0], steps=p.steps, lr=p.lr,
                      seed=p.seed + 1 + n_layers, eval_every=p.eval_every, on_eval=on_eval,
                      progress=progress, desc=f"{n_layers}-layer")
    return model, {k: np.asarray(v) for k, v in log.items()}, losses


def _ablations(model: tm.AttnOnlyTransformer, heldout: torch.Tensor, probe: torch.Tensor, p: Params,
               induction: list[tuple[int, int]], prev: list[tuple[int, int]]) -> tuple[dict, dict]:
    """ICL score and probe loss with heads removed: each head alone, the induction heads together, the
    same number of other last-layer heads, and the previous-token heads; zero and mean ablation."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    g = torch.Generator().manual_seed(20_000 + p.seed)
    means = model.head_means(tm.repeated_random_tokens(p.n_probe, p.probe_len, p.vocab, g))

    def run(ablate: list[tuple[int, int]], mode: str) -> dict[str, float]:
        mask = torch.ones(L, H)
        for layer, head in ablate:
            mask[layer, head] = 0
        r = measure(model, heldout, probe, mask, means if mode == "mean" else None)
        second = r["probe_loss"][p.probe_len:]
        return {"icl_score": float(icl_score(r["probe_loss"], p)), "probe_second_half": float(second.mean()),
                "heldout": float(r["heldout_loss"].mean())}

    others = [(L - 1, h) for h in range(H) if (L - 1, h) not in induction][: len(induction)]
    sets = {"none": [], "induction heads": induction, "other last-layer heads": others,
            "previous-token heads": prev}
    table = {mode: {name: run(heads_, mode) for name, heads_ in sets.items()} for mode in ("zero", "mean")}
    single = np.zeros((2, L, H), dtype=np.float32)  # [mode, layer, head] ICL score with that head ablated
    for m, mode in enumerate(("zero", "mean")):
        for layer in range(L):
            for head in range(H):
                single[m, layer, head] = run([(layer, head)], mode)["icl_score"]
    return {"sets": {k: [list(x) for x in v] for k, v in sets.items()}, "table": table}, {"ablate_single": single}


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    data, heldout, lens, probe = eval_sets(p)
    arrays: dict[str, np.ndarray] = {"heldout_repeat_len": lens.numpy().astype(np.int16)}
    summary: dict[str, Any] = {}
    trained = {}
    kept = [int(s) for s in p.checkpoints]

    def keep(step: int, net: tm.AttnOnlyTransformer) -> None:  # the 2-layer model's checkpoints
        if step in kept:
            arrays.update(tm.state_arrays(net, f"L2.ckpt.{step}."))

    for n_layers in (2, 1):
        with timing.timed(f"L{n_layers}.train_seconds"):
            net, log, losses = _train_one(p, n_layers, data, heldout, probe, progress,
                                          on_checkpoint=keep if n_layers == 2 else None)
        trained[n_layers] = net
        tag = f"L{n_layers}"
        arrays[f"{tag}.train_loss"] = np.asarray(losses, dtype=np.float32)
        for key, value in log.items():
            arrays[f"{tag}.{key}"] = value.astype(np.int32 if key == "step" else np.float32)
        arrays.update(tm.state_arrays(net, f"{tag}.state."))
        icl = icl_score(log["probe_loss"], p)
        arrays[f"{tag}.icl_score"] = icl.astype(np.float32)
        last = n_layers - 1
        best_induction = log["prefix_matching"][:, last].max(-1)
        arrays[f"{tag}.best_induction"] = best_induction.astype(np.float32)
        summary[tag] = {
            "n_params": net.n_params(),
            "final_heldout_loss": float(log["heldout_loss"][-1].mean()),
            "final_icl_score": float(icl[-1]),
            "initial_icl_score": float(icl[0]),
            "final_probe_second_half": float(log["probe_loss"][-1][p.probe_len:].mean()),
            "final_prefix_matching": log["prefix_matching"][-1].tolist(),
            "final_prev_token": log["prev_token"][-1].tolist(),
            "final_copying": log["copying"][-1].tolist(),
            "transition_induction": locate_transition(log["step"], best_induction),
            "transition_icl": locate_transition(log["step"], -icl),
        }
    final = {"prefix_matching": arrays["L2.prefix_matching"][-1], "prev_token": arrays["L2.prev_token"][-1]}
    induction = [(1, h) for h in range(p.n_heads) if final["prefix_matching"][1, h] > p.induction_threshold]
    prev = [(0, h) for h in range(p.n_heads) if final["prev_token"][0, h] > p.induction_threshold]
    abl, abl_arrays = _ablations(trained[2], heldout, probe, p, induction, prev)
    arrays.update(abl_arrays)
    arrays["L2.ckpt_step"] = np.asarray(kept, dtype=np.int32)
    summary["ablation"] = abl
    summary["induction_heads"] = [list(x) for x in induction]
    summary["previous_token_heads"] = [list(x) for x in prev]
    summary["bigram_entropy"] = data.bigram_entropy
    summary["uniform_entropy"] = float(np.log(p.vocab))
    summary["threads"] = THREADS
    summary["params"] = json.loads(json.dumps(asdict(p)))
    return arrays, summary
