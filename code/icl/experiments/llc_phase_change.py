"""The local learning coefficient over training of the phase-change model (chapter 9, after chapter 7).

The ``phase_change`` experiment trains a 2-layer attention-only transformer whose induction heads form
abruptly (around step 6,100 of 8,000 at the default settings) and keeps its weights at a list of steps
(``checkpoints``, denser around the change). This experiment reads those checkpoints from the cached
``phase_change`` entry (``DEPENDS``) instead of training again. Only when it is asked for other training
parameters or for steps that entry did not keep does it rerun the same training — the same function,
:func:`icl.experiments.phase_change._train_one`, with the same seeds — copying the weights through its
``on_checkpoint`` hook; at ``phase_change``'s defaults such a rerun is compared bit for bit with the entry.

At each checkpoint ``w*`` the local learning coefficient is estimated with :func:`icl.slt.sgld_llc`
(Lau et al. 2023): ``λ̂(w*) = nβ (E[L_n(w)] − L_n(w*))`` under the posterior tempered by ``β = 1/log n``
and localised by a Gaussian of precision ``γ`` around ``w*``. Choices, all in :class:`Params`:

* a *sample* is one sequence of ``n_ctx`` tokens from the training distribution; ``L_n`` is the mean
  over ``n`` fixed sequences of the sequence's negative log-likelihood (the sum over its ``n_ctx − 1``
  next-token losses), the same ``n`` sequences for every checkpoint;
* SGLD uses minibatches of ``batch_size`` sequences; in the estimate each step records
  ``L_m(w) − L_m(w*)`` on its own minibatch (a control variate: its mean over minibatches is
  ``L_n(w) − L_n(w*)``, its variance far smaller than that of ``L_m(w) − L_n(w*)``). The gradient,
  and so the chain, are those of plain SGLD;
* every checkpoint uses the same SGLD seed (the same minibatches and noise), so differences between
  checkpoints are not blurred by independent sampling noise; the spread is over ``num_chains`` chains;
* the norm of the full-sample gradient at each checkpoint is stored beside the estimate, since a
  large gradient lets the chains find lower loss than ``w*`` and drags the estimate down.

Intuition. ``λ̂`` counts, roughly, how many directions around ``w*`` the loss curves upward in,
relative to the noise scale set by ``nβ`` and ``γ``; a more degenerate solution (more flat directions)
has a smaller ``λ̂``. Checkpoints of a model still being trained are not local minima, so what SGLD
measures there also depends on the gradient at ``w*``, the localisation and the chain length: values
are comparable between checkpoints of this run, not with ``λ`` of other models or papers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl import slt, timing, toymodels as tm
from icl.experiments import phase_change as pc, with_threads
from icl.experiments import between, each_int

NAME = "llc_phase_change"
VERSION = 3  # 2: checkpoints read from the phase_change entry; 3: chains batched, L_m(w*) looked up
CHAPTER = "report/10-slt.qmd"
USES_MODEL = False
DEPENDS = ("phase_change",)
DESCRIPTION = "SGLD local learning coefficient at checkpoints of the phase-change model"
THREADS = 1  # a rerun (non-default training parameters) reproduces phase_change only at its thread count
TRACE_POINTS = 60  # thinned SGLD traces kept per chain

_PC = pc.Params()


@dataclass(frozen=True)
class Params:
    # training: the phase_change defaults (other phase_change parameters stay at their defaults)
    seed: int = _PC.seed
    steps: int = _PC.steps
    eval_every: int = _PC.eval_every
    d_model: int = _PC.d_model
    # checkpoints (multiples of eval_every), denser around the phase change
    checkpoints: tuple[int, ...] = (100, 500, 1000, 2000, 3500, 5000, 5600, 5800, 6000, 6100, 6200,
                                    6400, 6600, 7000, 8000)
    # SGLD
    n: int = 1024            # sequences in the fixed sample that defines L_n
    batch_size: int = 32     # sequences per SGLD minibatch
    step_size: float = 2e-5
    gamma: float = 1000.0
    num_chains: int = 4
    num_steps: int = 250
    num_burnin: int = 100

    def validate(self) -> None:
        pc_params(self).validate()
        steps = checkpoint_steps(self)
        if not steps or any(s < 0 or s > self.steps or s % self.eval_every for s in steps):
            raise ValueError("checkpoints must be multiples of eval_every in [0, steps]")
        if steps != sorted(set(steps)):
            raise ValueError("checkpoints must be increasing and distinct")
        if self.n < 2 or not 1 <= self.batch_size <= self.n:
            raise ValueError("need n >= 2 and 1 <= batch_size <= n")
        if self.num_chains < 2 or not 0 <= self.num_burnin < self.num_steps:
            raise ValueError("need num_chains >= 2 and 0 <= num_burnin < num_steps")
        if self.step_size <= 0 or self.gamma < 0:
            raise ValueError("need step_size > 0 and gamma >= 0")


LIMITS = {"steps": between(1, 100_000), "eval_every": between(1, 100_000), "d_model": between(8, 512),
          "checkpoints": each_int(0, 100_000), "n": between(2, 100_000), "batch_size": between(1, 100_000),
          "step_size": between(1e-9, 1.0), "gamma": between(0.0, 1e9), "num_chains": between(2, 64),
          "num_steps": between(1, 100_000), "num_burnin": between(0, 100_000)}


def checkpoint_steps(p: Params) -> list[int]:
    return [int(s) for s in p.checkpoints]  # CLI overrides arrive as strings


def pc_params(p: Params) -> pc.Params:
    """The ``phase_change`` parameters of the training run (its defaults unless overridden here)."""
    return dataclasses.replace(_PC, seed=p.seed, steps=p.steps, eval_every=p.eval_every, d_model=p.d_model,
                               checkpoints=tuple(checkpoint_steps(p)))


def same_training(q: pc.Params) -> bool:
    """Whether ``q`` trains exactly the model of ``phase_change``'s defaults (the kept steps aside)."""
    return dataclasses.replace(q, checkpoints=_PC.checkpoints) == _PC


def reference_checkpoints(ckpt_steps: Any, transition: dict[str, Any]) -> dict[str, int]:
    """The one definition of "before", "at" and "after" the phase change that the book uses.

    ``before``: the last checkpoint strictly before the onset of the transition window (where the
    induction score has risen 10% of the way); ``at``: the checkpoint nearest the midpoint (50%; the
    earlier of two equally near); ``after``: the last checkpoint. A single checkpoint each, never a
    maximum over several: the largest of several noisy estimates is biased upwards."""
    steps = sorted(int(s) for s in ckpt_steps)
    before = [s for s in steps if s < int(transition["onset"])]
    if not before:
        raise ValueError("no checkpoint before the onset of the transition")
    mid = int(transition["step"])
    return {"before": before[-1], "at": min(steps, key=lambda s: (abs(s - mid), s)), "after": steps[-1]}


def llc_sample(p: Params, data: tm.MarkovRepeatData) -> torch.Tensor:
    """The fixed sample of ``n`` training-distribution sequences that defines ``L_n``: ``[n, n_ctx]``."""
    return data.sample(p.n, torch.Generator().manual_seed(30_000 + p.seed))[0]


def content_digest(p: Params) -> str:
    q = pc_params(p)
    data, heldout, lens, probe = pc.eval_sets(q)
    h = hashlib.sha256(pc.content_digest(q).encode())
    h.update(llc_sample(p, data).numpy().tobytes())
    return h.hexdigest()


def sequence_loss_fn(model: tm.AttnOnlyTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, slt.LossFn]:
    """``w* [d]`` and the loss for :func:`icl.slt.sgld_llc`: per-sequence negative log-likelihood
    (nats summed over the ``n_ctx − 1`` predictions), averaged over the sequences ``tokens[idx]``
    (``tokens``: ``[n, n_ctx]``). With a minibatch the loss returned is ``L_m(w) − L_m(w*)`` (the
    control variate; the gradient is unchanged); with ``idx=None`` it is ``L_n(w) − L_n(w*)``, zero
    at ``w*``. All chains go through the model in one batched pass
    (:meth:`icl.toymodels.AttnOnlyTransformer.chains_forward`), and the per-sequence losses at ``w*``
    are computed once, so ``L_m(w*)`` of a minibatch is a lookup."""
    named = list(model.named_parameters())
    shapes = [v.shape for _, v in named]
    sizes = [v.numel() for _, v in named]
    dtype = named[0][1].dtype
    w_star = torch.cat([v.detach().reshape(-1) for _, v in named]).to(torch.float64)
    per_seq = tokens.shape[1] - 1

    def seq_losses(w: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:  # w [C, d] -> [C, batch] nats
        C = w.shape[0]
        pieces = torch.split(w.to(dtype), sizes, dim=1)
        params = {k: p.reshape(C, *shape) for (k, _), p, shape in zip(named, pieces, shapes)}
        logits = model.chains_forward(params, toks)  # [C, batch, n_ctx, vocab]
        V = logits.shape[-1]
        ce = torch.nn.functional.cross_entropy(logits[:, :, :-1].reshape(-1, V),
                                               toks[:, 1:].repeat(C, 1).reshape(-1), reduction="none")
        return ce.view(C, toks.shape[0], per_seq).sum(-1)

    with torch.no_grad():
        star = torch.cat([seq_losses(w_star[None], tokens[i:i + 256])[0] for i in range(0, len(tokens), 256)])
        star = star.to(torch.float64)  # [n] per-sequence loss at w*

    def centred(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:  # w [chains, d] -> [chains]
        if idx is None:
            losses = torch.cat([seq_losses(w, tokens[i:i + 256]) for i in range(0, len(tokens), 256)], 1)
            return losses.to(torch.float64).mean(1) - star.mean()
        return seq_losses(w, tokens[idx]).to(torch.float64).mean(1) - star[idx].mean()

    return w_star, centred


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    q = pc_params(p)
    wanted = checkpoint_steps(p)
    torch.manual_seed(p.seed)
    np.random.seed(p.seed)
    data, heldout, _, probe = pc.eval_sets(q)
    states: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int, net: tm.AttnOnlyTransformer) -> None:
        if step in wanted:
            states[step] = copy.deepcopy(net.state_dict())

    stored = _stored(q, wanted, upstream)
    if stored is not None:  # phase_change kept these checkpoints: read them, train nothing
        entry = upstream["phase_change"]  # type: ignore[index]
        a = entry.arrays
        log = {"step": a["L2.step"], "prefix_matching": a["L2.prefix_matching"],
               "prev_token": a["L2.prev_token"], "heldout_loss": a["L2.heldout_loss"],
               "probe_loss": a["L2.probe_loss"]}
        losses = a["L2.train_loss"]
        states.update(stored)
        net = tm.AttnOnlyTransformer(pc.model_config(q, 2))
        reproduction = {"compared": False, "reused": True, "phase_change_key": entry.key}
    else:  # other training parameters or checkpoints: rerun phase_change's training, keeping them
        with timing.timed("train_seconds"):
            net, log, losses = pc._train_one(q, 2, data, heldout, probe, progress, on_checkpoint=keep)
        reproduction = {**_compare(q, log, losses, net, upstream), "reused": False}
    best_induction = log["prefix_matching"][:, 1].max(-1)  # [evals] layer-1 best head
    arrays: dict[str, np.ndarray] = {
        "train_loss": np.asarray(losses, dtype=np.float32),
        "eval_step": log["step"].astype(np.int32),
        "best_induction": best_induction.astype(np.float32),
        "best_prev_token": log["prev_token"][:, 0].max(-1).astype(np.float32),
        "heldout_loss": log["heldout_loss"].mean(1).astype(np.float32),
        "icl_score": pc.icl_score(log["probe_loss"], q).astype(np.float32),
    }

    # ---- SGLD at each checkpoint
    tokens = llc_sample(p, data)  # [n, n_ctx]
    K, C = len(wanted), p.num_chains
    llc_chains = np.empty((K, C))
    loss_star = np.empty(K)
    grad_norm = np.empty(K)
    idx = np.linspace(0, p.num_steps - 1, TRACE_POINTS).astype(int)
    traces = np.empty((K, C, TRACE_POINTS), dtype=np.float32)
    for k, step in enumerate(wanted):
        t0 = time.perf_counter()
        ckpt = tm.AttnOnlyTransformer(pc.model_config(q, 2))
        ckpt.load_state_dict(states[step])
        w_star, loss = sequence_loss_fn(ckpt, tokens)
        mean_loss = tm.next_token_loss(ckpt(tokens), tokens)  # per token, on the SGLD sample
        grads = torch.autograd.grad(mean_loss, list(ckpt.parameters()))
        loss_star[k] = float(mean_loss.detach())
        grad_norm[k] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        res = slt.sgld_llc(loss, w_star, p.n, num_chains=C, num_steps=p.num_steps, num_burnin=p.num_burnin,
                           step_size=p.step_size, gamma=p.gamma, batch_size=p.batch_size,
                           seed=40_000 + p.seed)
        llc_chains[k] = res.llc_chains
        traces[k] = (res.nbeta * res.loss_trace[:, idx]).astype(np.float32)
        timing.record("llc_seconds", time.perf_counter() - t0)
        if progress:
            print(f"step {step}: LLC {res.llc:.1f} ± {res.spread:.1f} (chains {np.round(res.llc_chains, 1)})",
                  flush=True)
    arrays.update({
        "ckpt_step": np.asarray(wanted, dtype=np.int32),
        "llc_chains": llc_chains.astype(np.float64),
        "ckpt_loss": loss_star.astype(np.float64),  # L_n(w*) per token on the SGLD sample
        "ckpt_grad_norm": grad_norm,                # |∇ L_n(w*)| of the per-token loss: w* is no minimum
        "trace": traces,                            # nβ (L_m(w) − L_m(w*)) along each chain
        "trace_step": idx.astype(np.int32),
    })
    llc_mean = llc_chains.mean(1)
    transition = pc.locate_transition(log["step"], best_induction)
    summary: dict[str, Any] = {
        "llc": {str(s): {"mean": float(m), "sd": float(c.std(ddof=1)), "grad_norm": float(gn)}
                for s, m, c, gn in zip(wanted, llc_mean, llc_chains, grad_norm)},
        "transition_induction": transition,
        "reproduction": reproduction,
        "n": p.n, "beta": 1.0 / np.log(p.n), "nbeta": p.n / np.log(p.n),
        "tokens_per_sample": int(tokens.shape[1] - 1),
        "n_params": net.n_params(),
        "all_finite": bool(np.isfinite(llc_chains).all()),
        "threads": THREADS,
        "params": json.loads(json.dumps(dataclasses.asdict(p))),
    }
    return arrays, summary


def _stored(q: pc.Params, wanted: list[int], upstream: dict[str, Any] | None
            ) -> dict[int, dict[str, torch.Tensor]] | None:
    """The checkpoints the cached ``phase_change`` entry kept, if it was trained with these parameters
    (its defaults) and kept every step wanted; else ``None``."""
    entry = (upstream or {}).get("phase_change")
    if entry is None or not same_training(q) or "L2.ckpt_step" not in entry.arrays:
        return None
    kept = set(int(s) for s in entry.arrays["L2.ckpt_step"])
    if not set(wanted) <= kept:
        return None
    out = {}
    for step in wanted:
        prefix = f"L2.ckpt.{step}."
        out[step] = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in entry.arrays.items()
                     if k.startswith(prefix)}
    return out


def _compare(q: pc.Params, log: dict[str, np.ndarray], losses: list[float], net: tm.AttnOnlyTransformer,
             upstream: dict[str, Any] | None) -> dict[str, Any]:
    """Does this rerun reproduce the cached ``phase_change`` result exactly? Only meaningful when the
    training parameters are ``phase_change``'s defaults (those of its cached entry)."""
    entry = (upstream or {}).get("phase_change")
    if entry is None or not same_training(q):
        return {"compared": False}
    a = entry.arrays
    out: dict[str, Any] = {"compared": True}
    pairs = {
        "train_loss": (np.asarray(losses, dtype=np.float32), a["L2.train_loss"]),
        "prefix_matching": (log["prefix_matching"].astype(np.float32), a["L2.prefix_matching"]),
        "prev_token": (log["prev_token"].astype(np.float32), a["L2.prev_token"]),
        "heldout_loss": (log["heldout_loss"].astype(np.float32), a["L2.heldout_loss"]),
        "probe_loss": (log["probe_loss"].astype(np.float32), a["L2.probe_loss"]),
    }
    for name, (mine, cached) in pairs.items():
        out[f"{name}_equal"] = bool(mine.shape == cached.shape and np.array_equal(mine, cached))
    final = tm.state_arrays(net, "L2.state.")
    out["final_weights_equal"] = all(np.array_equal(v, a[k]) for k, v in final.items())
    out["max_abs_weight_diff"] = float(max(np.abs(v - a[k]).max() for k, v in final.items()))
    out["transition_step_cached"] = entry.data["L2"]["transition_induction"]["step"]
    return out
