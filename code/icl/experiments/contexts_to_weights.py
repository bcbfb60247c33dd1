"""Contexts to weights (chapter 8): is an in-context prediction a small weight update? (Q1 of note 004)

For the regression transformer trained by the experiment ``icl_regression`` (read from its cache
entry), and for contexts of ``k`` examples, we compare on held-out queries ``x``

* the in-context prediction ``T_w(c, x)``: the model reads the ``k`` examples, then ``x``;
* the prediction after fine-tuning, ``T_{w+Δw}(x)``: a copy of the model takes ``n`` full-batch
  gradient steps (all parameters, learning rate ``η``) on the ``k`` context pairs, each fed alone as a
  one-token prompt ``x_i → y_i``, and then reads ``x`` with no context.

The squared gap between the two, the error of each against the truth ``w·x``, and the gap before any
step (``T_w(x)``, the no-context prediction) are recorded for every ``k``, ``η`` and ``n`` in the sweep.
The contexts are the same across all settings: the first ``k`` examples of one fixed set of prompts.

The numerical check of the attention algebra of the same chapter (modified keys, LSE ≈ max) is stored
here too (:func:`icl.attention_algebra.modified_keys_error`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from icl import attention_algebra as aa
from icl import regression as rg
from icl import timing
from icl.experiments import between, each_float, each_int, reporter, with_threads

NAME = "contexts_to_weights"
VERSION = 1
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = False
DESCRIPTION = "in-context prediction T_w(c, x) vs prediction after gradient steps on c; modified-keys check"
THREADS = 1
DEPENDS = ("icl_regression",)  # the trained model comes from that experiment's cache entry
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class Params:
    seed: int = 0
    ks: tuple[str, ...] = ("1", "3", "5", "10", "19")
    lrs: tuple[str, ...] = ("0.001", "0.01", "0.1")
    steps: int = 100
    record: tuple[str, ...] = ("1", "3", "10", "30", "100")
    n_contexts: int = 32
    n_query: int = 32
    value_noise: float = 0.3

    def validate(self) -> None:
        from icl.experiments import icl_regression

        base = icl_regression.Params()
        if not all(0 < int(k) < base.max_k for k in self.ks):
            raise ValueError(f"every k must be in 1..{base.max_k - 1}")
        if not all(0 < int(n) <= self.steps for n in self.record):
            raise ValueError("record steps must be in 1..steps")
        [float(x) for x in self.lrs]


LIMITS = {"ks": each_int(1, 127), "lrs": each_float(1e-6, 10.0), "steps": between(1, 10_000),
          "record": each_int(1, 10_000), "n_contexts": between(1, 1024), "n_query": between(1, 1024),
          "value_noise": between(0.0, 10.0)}


def contexts(p: Params) -> rg.Tasks:
    from icl.experiments import icl_regression

    base = icl_regression.Params()
    g = torch.Generator().manual_seed(40_000 + p.seed)
    return rg.sample_tasks(p.n_contexts, max(int(k) for k in p.ks), base.d, base.noise, g, n_query=p.n_query)


def content_digest(p: Params) -> str:
    h = hashlib.sha256()
    t = contexts(p)
    for a in (t.w, t.X, t.y, t.Xq):
        h.update(a.numpy().tobytes())
    return h.hexdigest()


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from icl.experiments import icl_regression

    p = params
    p.validate()
    reg_entry = upstream["icl_regression"]
    net = icl_regression.load_model(reg_entry)
    d = reg_entry.data["params"]["d"]
    ks, lrs, record = [int(k) for k in p.ks], [float(x) for x in p.lrs], [int(n) for n in p.record]
    say = reporter(NAME, progress)
    t = contexts(p)
    nK, nL, nR, C, m = len(ks), len(lrs), len(record), p.n_contexts, p.n_query
    say(f"in-context predictions for k in {ks}, {C} contexts x {m} queries")
    icl = np.zeros((nK, C, m))
    ft = np.zeros((nK, nL, nR, C, m))
    truth = t.yq.numpy()
    with torch.no_grad():
        base = net.predict(t.X[:, :0], t.y[:, :0], t.Xq).numpy()  # T_w(x): no context
        for a, k in enumerate(ks):
            icl[a] = net.predict(t.X[:, :k], t.y[:, :k], t.Xq).numpy()
    say(f"fine-tuning {nK * nL * C} model copies for {p.steps} steps (k x learning rate x context)")
    start = time.perf_counter()
    # every (k, lr, context) is one copy of the model; all are fine-tuned together
    K = max(ks)
    grid = [(a, b, c) for a in range(nK) for b in range(nL) for c in range(C)]
    idx_c = torch.tensor([c for _, _, c in grid])
    mask = torch.tensor([[1.0 if i < ks[a] else 0.0 for i in range(K)] for a, _, _ in grid])
    lr_t = torch.tensor([lrs[b] for _, b, _ in grid])
    preds = rg.finetune_many(net, t.X[idx_c, :K], t.y[idx_c, :K], mask, t.Xq[idx_c], lr_t, p.steps, record)
    for r, n in enumerate(record):
        ft[:, :, r] = preds[n].view(nK, nL, C, m).numpy()
    timing.record("finetune_seconds", time.perf_counter() - start)
    finite = np.isfinite(ft)
    ft_safe = np.where(finite, ft, np.nan)
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diverged runs: NaN, reported in `diverged`
        gap = np.nanmean((ft_safe - icl[:, None, None]) ** 2, axis=(-1, -2))  # [k, lr, n]
        ft_err = np.nanmean((ft_safe - truth) ** 2, axis=(-1, -2)) / d
    diverged = (~finite).any(axis=-1).mean(axis=-1)  # fraction of contexts with a non-finite prediction
    icl_err = ((icl - truth) ** 2).mean(axis=(-1, -2)) / d
    gap0 = ((icl - base) ** 2).mean(axis=(-1, -2))
    arrays = {
        "ks": np.asarray(ks), "lrs": np.asarray(lrs), "record": np.asarray(record),
        "gap": gap, "finetune_error": ft_err, "diverged": diverged, "icl_error": icl_err,
        "gap_no_update": gap0, "no_context_error": np.asarray(((base - truth) ** 2).mean() / d),
        "icl_pred": icl.astype(np.float32), "finetune_pred": ft.astype(np.float32),
        "no_context_pred": base.astype(np.float32), "truth": truth.astype(np.float32),
    }
    # best setting per k: the (lr, n) with the smallest gap
    best = {}
    for a, k in enumerate(ks):
        g = np.where(np.isfinite(gap[a]), gap[a], np.inf)
        b, r = np.unravel_index(np.argmin(g), g.shape)
        best[str(k)] = {"lr": lrs[b], "steps": record[r], "gap": float(gap[a, b, r]),
                        "gap_no_update": float(gap0[a]), "finetune_error": float(ft_err[a, b, r]),
                        "icl_error": float(icl_err[a])}
    say("modified-keys check of the attention algebra")
    mk = {name: aa.modified_keys_error(np.asarray(SCALES), value_noise=vn, seed=p.seed)
          for name, vn in (("same_values", 0.0), ("value_noise", p.value_noise))}
    for name, res in mk.items():
        for key, value in res.items():
            arrays[f"modified_keys.{name}.{key}"] = value
    arrays["modified_keys.scales"] = np.asarray(SCALES)
    data = {
        "regression_entry": reg_entry.key[:16],
        "best": best,
        "threads": THREADS,
        "params": json.loads(json.dumps(asdict(p))),
        "d": d,
    }
    return arrays, data
