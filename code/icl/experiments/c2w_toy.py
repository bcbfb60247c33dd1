"""Contexts to weights on the rule family of Part I (chapter 8): Q1 against an exact posterior.

The transformer of the experiment ``bayes_toy`` (chapter 2) predicts the answer to a query ``x`` after
``k`` pairs of a rule ``y = a x + b`` (with noisy answers), and the exact Bayes-optimal prediction, the
posterior predictive, is known. Its trained weights are read from the ``bayes_toy`` entry (``DEPENDS``),
so these are exactly the weights that chapter 2 measured; nothing is trained again.

For held-out contexts of ``k`` pairs (the first ``k`` pairs of one fixed set of sequences, so every
setting sees the same contexts) and every query ``x`` in ``0..n_x-1`` we compare

* the in-context prediction ``T_w(c, x)``: the model reads ``x_1 y_1 … x_k y_k x``;
* the prediction after fine-tuning, ``T_{w+Δw}(x)``: a copy of the model takes ``n`` full-batch steps
  (plain gradient descent or Adam, one learning rate each) on the cross-entropy of ``y_j`` given
  ``x_j``, each pair fed alone as the sequence ``x_j y_j``, and then reads ``x`` alone (exactly how the
  network sees a context-free query);
* the exact posterior predictive given the context, and the model's no-context prediction ``T_w(x)``.

All divergences are KL over the answer token (nats), averaged over the queries of each context:
``KL(in-context || fine-tuned)``, ``KL(exact || fine-tuned)``, ``KL(exact || in-context)``, and before
any step ``KL(in-context || no-context)``. Queries whose ``x`` is not among the context's ``x_j`` are
also averaged separately ("unseen"): there fine-tuning cannot simply have memorised the answer.

A control (``distil``) trains the same copies on the in-context predictions themselves, for every
query, instead of on the context pairs: it shows whether *some* small weight change reproduces the
in-context prediction (Q2), and how large it is (``||Δw||``, over the parameters a lone query uses).
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

from icl import timing
from icl.experiments import between, each_int, text, with_threads
from icl.toybayes import RuleFamily, answer_logprobs, exact_predictive, finetune_on_pairs, position0_params

NAME = "c2w_toy"
VERSION = 3  # 2: the model is read from the bayes_toy entry, not retrained; 3: fused Adam kernel per run of equal step sizes (toybayes.finetune_on_pairs)
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = False
DESCRIPTION = "rule family: in-context prediction vs fine-tuning on the context, against the exact posterior"
THREADS = 1
DEPENDS = ("bayes_toy",)  # the trained model is read from that entry


@dataclass(frozen=True)
class Params:
    seed: int = 0
    ks: tuple[str, ...] = ("1", "2", "4", "8")
    # optimizer:learning-rate settings of the sweep
    opts: tuple[str, ...] = ("sgd:0.01", "sgd:0.1", "adam:0.0001", "adam:0.001", "adam:0.01")
    steps: int = 300
    record: tuple[str, ...] = ("1", "3", "10", "30", "100", "300")
    n_contexts: int = 64
    # control (empty: none): train on the in-context predictions themselves, for all queries, instead
    # of on the context pairs; it shows how close some small weight change can come
    distil: str = "adam:0.001"

    def validate(self) -> None:
        from icl.experiments import bayes_toy

        if not all(0 < int(k) < bayes_toy.Params().k for k in self.ks):
            raise ValueError(f"every k must be in 1..{bayes_toy.Params().k - 1}")
        if not all(0 < int(n) <= self.steps for n in self.record):
            raise ValueError("record steps must be in 1..steps")
        for o in self.opts + ((self.distil,) if self.distil else ()):
            parse_opt(o)
        if self.n_contexts < 2:
            raise ValueError("need at least two contexts")


LIMITS = {"ks": each_int(1, 63), "opts": text("optimizer settings sgd:LR or adam:LR, LR in 0 .. 10"),
          "steps": between(1, 10_000), "record": each_int(1, 10_000), "n_contexts": between(2, 1024),
          "distil": text("sgd:LR or adam:LR", empty=True)}


def parse_opt(spec: str) -> tuple[str, float]:
    name, _, lr = spec.partition(":")
    try:
        rate = float(lr)
    except ValueError:
        rate = float("nan")
    if name not in ("sgd", "adam") or not 0 <= rate <= 10:
        raise ValueError(f"optimizer setting {spec!r} is not 'sgd:LR' or 'adam:LR' with LR in 0 .. 10")
    return name, rate


def contexts(p: Params, family: RuleFamily) -> torch.Tensor:
    """The held-out sequences whose first ``k`` pairs are the contexts: [n_contexts, 2 max(k)]."""
    g = torch.Generator().manual_seed(50_000 + p.seed)
    tokens, _ = family.sample(p.n_contexts, max(int(k) for k in p.ks), g)
    return tokens


def content_digest(p: Params) -> str:
    from icl.experiments import bayes_toy

    family = bayes_toy.Params().family
    h = hashlib.sha256(repr(asdict(family)).encode())
    h.update(contexts(p, family).numpy().tobytes())
    return h.hexdigest()


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis (log-probabilities in, nats out)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    return _compute(params, upstream["bayes_toy"], progress)


def _compute(p: Params, toy_entry: Any, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from icl.experiments import bayes_toy

    bp = bayes_toy.Params(**toy_entry.key_inputs["params"])
    family = bp.family
    if max(int(k) for k in p.ks) >= bp.k:
        raise ValueError(f"the model reads at most {bp.k} pairs: every k must be below {bp.k}")
    net = bayes_toy.load_net(bp, toy_entry.arrays)
    w_norm = float(torch.cat([v.flatten() for v in position0_params(net).values()]).norm())

    ks = [int(k) for k in p.ks]
    opts = [parse_opt(o) for o in p.opts]
    record = [int(n) for n in p.record]
    C, nx, nK, nO, nR = p.n_contexts, family.n_x, len(ks), len(opts), len(record)
    ctx = contexts(p, family)
    xq = torch.arange(nx)  # every query x
    start = time.perf_counter()

    with torch.no_grad():
        alone = torch.stack([xq, torch.zeros_like(xq)], 1)  # [nx, 2]: "x ?"
        no_ctx = answer_logprobs(net, alone)[:, 0]  # [nx, V]  T_w(x)
        prior = exact_predictive(family, alone)[:, 0]  # [nx, V]  exact, no context

    icl_exact = np.zeros((nK, C))  # KL(exact || in-context), mean over queries
    noctx_exact = np.zeros((nK, C))  # KL(exact || T_w(x))
    prior_exact = np.zeros((nK, C))  # KL(exact || prior predictive): what ignoring the context costs
    gap0 = np.zeros((nK, C))  # KL(in-context || T_w(x))
    gap = np.full((nK, nO, nR, C), np.nan)  # KL(in-context || fine-tuned)
    ft_exact = np.full((nK, nO, nR, C), np.nan)  # KL(exact || fine-tuned)
    gap_unseen = np.full((nK, nO, nR, C), np.nan)
    ft_exact_unseen = np.full((nK, nO, nR, C), np.nan)
    icl_exact_unseen, gap0_unseen = np.full((nK, C), np.nan), np.full((nK, C), np.nan)
    train_loss = np.full((nK, nO, nR, C), np.nan)  # cross-entropy on the context pairs after n steps
    delta = np.full((nK, nO, nR, C), np.nan)  # ||Δw||
    distil = parse_opt(p.distil) if p.distil else None
    distil_gap, distil_exact, distil_delta = (np.full((nK, nR, C), np.nan) for _ in range(3))
    unseen_frac = np.zeros(nK)

    def qmean(v: torch.Tensor, where: torch.Tensor | None = None) -> np.ndarray:  # [.., C, nx] -> [.., C]
        if where is None:
            return v.mean(-1).numpy()
        w = where.to(v.dtype)
        with np.errstate(invalid="ignore"):
            return ((v * w).sum(-1) / w.sum(-1)).numpy()  # NaN for a context with no unseen query

    for a, k in enumerate(ks):
        cx, cy = ctx[:, 0:2 * k:2], ctx[:, 1:2 * k:2]  # [C, k]
        seen = (cx[:, None, :] == xq[None, :, None]).any(-1)  # [C, nx]
        unseen = ~seen
        unseen_frac[a] = float(unseen.double().mean())
        # the context followed by each query: [C, nx, 2k + 2] ("y" of the query is a placeholder)
        seq = torch.cat([ctx[:, None, :2 * k].expand(C, nx, 2 * k),
                         torch.stack([xq, torch.zeros_like(xq)], 1)[None].expand(C, nx, 2)], -1)
        with torch.no_grad():
            exact = exact_predictive(family, seq.reshape(C * nx, -1))[:, k].view(C, nx, -1)
            icl = answer_logprobs(net, seq.reshape(C * nx, -1))[:, k].view(C, nx, -1)
        icl_exact[a] = qmean(_kl(exact, icl))
        noctx_exact[a] = qmean(_kl(exact, no_ctx[None].expand_as(exact)))
        prior_exact[a] = qmean(_kl(exact, prior[None].expand_as(exact)))
        gap0[a] = qmean(_kl(icl, no_ctx[None].expand_as(icl)))
        icl_exact_unseen[a] = qmean(_kl(exact, icl), unseen)
        gap0_unseen[a] = qmean(_kl(icl, no_ctx[None].expand_as(icl)), unseen)
        for name in ("sgd", "adam"):
            idx = [b for b, (o, _) in enumerate(opts) if o == name]
            if not idx:
                continue
            lrs = torch.tensor([opts[b][1] for b in idx for _ in range(C)])
            rep = len(idx)
            preds, losses, moved = finetune_on_pairs(
                net, cx.repeat(rep, 1), cy.repeat(rep, 1), torch.ones(rep * C, k),
                xq[None].expand(rep * C, nx), lrs, p.steps, record, optimizer=name)
            for r, n in enumerate(record):
                ftp = preds[n].view(rep, C, nx, -1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    for j, b in enumerate(idx):
                        gap[a, b, r] = qmean(_kl(icl, ftp[j]))
                        ft_exact[a, b, r] = qmean(_kl(exact, ftp[j]))
                        gap_unseen[a, b, r] = qmean(_kl(icl, ftp[j]), unseen)
                        ft_exact_unseen[a, b, r] = qmean(_kl(exact, ftp[j]), unseen)
                        train_loss[a, b, r] = losses[n].view(rep, C)[j].numpy()
                        delta[a, b, r] = moved[n].view(rep, C)[j].numpy()
        if distil:
            # control: the same copies trained to reproduce the in-context predictions on every query
            preds, losses, moved = finetune_on_pairs(
                net, xq[None].expand(C, nx), icl.exp().float(), torch.ones(C, nx), xq[None].expand(C, nx),
                torch.full((C,), distil[1]), p.steps, record, optimizer=distil[0])
            for r, n in enumerate(record):
                distil_gap[a, r] = qmean(_kl(icl, preds[n]))
                distil_exact[a, r] = qmean(_kl(exact, preds[n]))
                distil_delta[a, r] = moved[n].numpy()
    timing.record("finetune_seconds", time.perf_counter() - start)

    finite = np.isfinite(gap)
    diverged = (~finite).mean(-1)  # [k, opt, n]: fraction of contexts with a non-finite KL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = lambda v: np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=-1)  # noqa: E731
        arrays: dict[str, np.ndarray] = {
            "ks": np.asarray(ks), "lrs": np.asarray([lr for _, lr in opts]),
            "record": np.asarray(record), "unseen_fraction": unseen_frac,
            "gap": m(gap), "finetune_exact": m(ft_exact), "gap_unseen": m(gap_unseen),
            "finetune_exact_unseen": m(ft_exact_unseen), "train_loss": m(train_loss), "diverged": diverged,
            "icl_exact": icl_exact.mean(-1), "no_context_exact": noctx_exact.mean(-1),
            "prior_exact": prior_exact.mean(-1), "gap_no_update": gap0.mean(-1),
            "icl_exact_unseen": np.nanmean(icl_exact_unseen, -1),
            "gap_no_update_unseen": np.nanmean(gap0_unseen, -1),
            # per context, for intervals: [k, opt, n, context] and [k, context]
            "per_context.gap": gap.astype(np.float32), "per_context.finetune_exact": ft_exact.astype(np.float32),
            "per_context.icl_exact": icl_exact.astype(np.float32),
            "per_context.gap_no_update": gap0.astype(np.float32),
            "delta": m(delta), "distil.gap": m(distil_gap), "distil.exact": m(distil_exact),
            "distil.delta": m(distil_delta), "weight_norm": np.asarray(w_norm),
        }
    # the best setting per k: the (optimizer, lr, n) with the smallest mean KL(in-context || fine-tuned)
    best = {}
    for a, k in enumerate(ks):
        g = np.where(np.isfinite(arrays["gap"][a]), arrays["gap"][a], np.inf)
        b, r = np.unravel_index(np.argmin(g), g.shape)
        e = np.where(np.isfinite(arrays["finetune_exact"][a]), arrays["finetune_exact"][a], np.inf)
        b2, r2 = np.unravel_index(np.argmin(e), e.shape)
        best[str(k)] = {
            "opt": p.opts[b], "steps": record[r], "gap": float(arrays["gap"][a, b, r]),
            "gap_no_update": float(arrays["gap_no_update"][a]),
            "finetune_exact": float(arrays["finetune_exact"][a, b, r]),
            "gap_unseen": float(arrays["gap_unseen"][a, b, r]), "delta": float(arrays["delta"][a, b, r]),
            "icl_exact": float(arrays["icl_exact"][a]), "no_context_exact": float(arrays["no_context_exact"][a]),
            # the fine-tuned prediction closest to the exact posterior, wherever it is in the sweep
            "closest_to_exact": {"opt": p.opts[b2], "steps": record[r2],
                                 "finetune_exact": float(arrays["finetune_exact"][a, b2, r2]),
                                 "finetune_exact_unseen": float(arrays["finetune_exact_unseen"][a, b2, r2])},
        }
    data = {
        "bayes_toy_entry": toy_entry.key[:16],
        "best": best,
        "threads": THREADS,
        "n_x": nx,
        "vocab": family.vocab,
        "params": json.loads(json.dumps(asdict(p))),
        "bayes_toy_params": json.loads(json.dumps(asdict(bp))),
    }
    return arrays, data
