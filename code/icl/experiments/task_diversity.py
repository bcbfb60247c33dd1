"""Task diversity: when does a regression transformer stop memorising its training tasks? (chapter 9)

Raventós et al. (2023) trained transformers on in-context linear regression whose tasks ``w`` come
from a *finite* pool of ``M`` vectors drawn once from ``N(0, I_d)``, and varied ``M``. Two predictors
compete. The Bayes predictor for the training distribution, the *discrete* posterior mean over the
``M`` pool tasks (here :func:`dmmse`, "dMMSE"), is optimal on the training tasks but poor on a new
``w``; ridge with ``λ = σ²``, Bayes-optimal for ``w ~ N(0, I_d)``, is what generalises. With few tasks
the trained model behaves like the dMMSE predictor; beyond a threshold number of tasks it behaves
like ridge on new tasks, although that is not Bayes-optimal for what it was trained on.

Here ``M`` runs over a log grid plus ``M = ∞`` (a fresh ``w`` every prompt, the setting of
``icl_regression``), with ``seeds`` models per ``M``. All ``len(Ms) × seeds`` models are trained
together as one batched program: their parameters are stacked on a leading axis
(``torch.func.stack_module_state``) and the forward pass is ``vmap``-ed over it, so one Adam step
updates every model (Adam acts elementwise, so the models stay independent). Each model draws its own
batches from its own pool.

Evaluated on prompts whose tasks come from the model's own pool (*training tasks*) and on prompts with
new tasks ``w ~ N(0, I_d)`` (*new tasks*, the same prompts for every model), after ``k = 1 … K−1``
examples: the errors of the model, dMMSE and ridge, and the model's prediction agreement
``SPD(T, A) = E[(T − A)²]/d`` with each (Akyürek et al. 2023), with bootstrap intervals over prompts.
The declared summary per model is the mean over ``k`` of ``SPD(T, ridge) − SPD(T, dMMSE)`` on new
tasks: negative means the model is closer to ridge, positive closer to the training-task posterior.
For ``M = ∞`` the two references coincide (the posterior mean under the Gaussian prior *is* ridge).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from icl import regression as rg
from icl import timing
from icl.experiments import between, each_int, reporter, with_threads
from icl.stats import bootstrap_mean_ci

NAME = "task_diversity"
VERSION = 1
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = False
DESCRIPTION = "regression transformers trained on M distinct tasks (M on a log grid, and infinite): dMMSE vs ridge"
THREADS = 1
INFINITE = 0  # the value of M that stands for a fresh task every prompt


@dataclass(frozen=True)
class Params:
    seed: int = 0
    Ms: tuple[str, ...] = ("2", "8", "32", "128", "512", "2048", "0")  # "0": infinitely many (fresh tasks)
    seeds: int = 2
    d: int = 3
    max_k: int = 8
    noise: float = 0.25
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 3000
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    n_eval: int = 500
    n_boot: int = 500

    def validate(self) -> None:
        Ms = [int(m) for m in self.Ms]
        if any(m < 0 for m in Ms) or len(set(Ms)) != len(Ms):
            raise ValueError("Ms: distinct task counts >= 1, or 0 for infinitely many")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")


LIMITS = {"Ms": each_int(0, 1 << 20), "seeds": between(1, 16), "d": between(1, 64), "max_k": between(2, 64),
          "noise": between(1e-3, 10.0), "d_model": between(8, 256), "n_layers": between(1, 8),
          "n_heads": between(1, 16), "steps": between(1, 100_000), "batch": between(1, 4096),
          "lr": between(1e-6, 1.0), "warmup": between(1, 100_000), "n_eval": between(20, 20_000),
          "n_boot": between(20, 10_000)}


def model_grid(p: Params) -> list[tuple[int, int]]:
    """``(M, seed)`` of every model, in the order of the stacked axis."""
    return [(int(m), s) for m in p.Ms for s in range(p.seeds)]


def task_pool(p: Params, M: int, s: int) -> torch.Tensor:
    """The ``M`` training tasks ``[M, d]`` of model ``(M, s)`` (empty for ``M = ∞``)."""
    if M == INFINITE:
        return torch.zeros(0, p.d)
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"pool {p.seed} {M} {s}".encode()).hexdigest()[:12], 16))
    return torch.randn(M, p.d, generator=g)


def new_task_prompts(p: Params) -> rg.Tasks:
    """The evaluation prompts with new tasks ``w ~ N(0, I_d)``, shared by every model."""
    g = torch.Generator().manual_seed(80_000 + p.seed)
    return rg.sample_tasks(p.n_eval, p.max_k, p.d, p.noise, g)


def content_digest(p: Params) -> str:
    h = hashlib.sha256()
    new_task_prompts(p).hash_into(h)
    for M, s in model_grid(p):
        h.update(task_pool(p, M, s).numpy().tobytes())
    return h.hexdigest()


def dmmse(pool: torch.Tensor, X: torch.Tensor, y: torch.Tensor, noise: float) -> torch.Tensor:
    """Posterior-mean prediction under the uniform prior on the ``M`` tasks of ``pool`` ``[M, d]``, for
    every prompt ``X`` ``[n, K, d]``, ``y`` ``[n, K]`` and every ``k``: the prediction of ``y_k`` from the
    ``k`` examples before it, ``[n, K]`` (``k = 0``: the pool's mean task). Gaussian noise ``σ`` gives
    ``log p(m | c) = −Σ_i (y_i − w_m·x_i)² / 2σ² + const``."""
    pred_all = torch.einsum("nkd,md->nkm", X.double(), pool.double())  # [n, K, M]: w_m · x_i
    sq = (y.double()[..., None] - pred_all) ** 2  # [n, K, M]
    before = torch.cumsum(sq, 1) - sq  # [n, K, M]: sum over the examples before i
    post = torch.softmax(-before / (2 * noise ** 2), -1)
    return (post * pred_all).sum(-1)


def ridge_all(X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge prediction of ``y_k`` from the ``k`` examples before it, for every ``k``: ``[n, K]``."""
    X, y = X.double(), y.double()
    n, K, d = X.shape
    out = torch.zeros(n, K, dtype=torch.float64)
    for k in range(1, K):
        out[:, k] = rg.ridge(X[:, :k], y[:, :k], X[:, k:k + 1], lam)[:, 0]
    return out


def train_models(p: Params, progress: bool = False) -> tuple[rg.RegressionTransformer, dict[str, torch.Tensor], np.ndarray]:
    """Train every ``(M, seed)`` model together; returns a template model, the stacked trained
    parameters ``{name: [N, ...]}`` and the training losses ``[steps, N]``."""
    from tqdm.auto import tqdm

    cfg = rg.RegressionConfig(d=p.d, max_k=p.max_k, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads)
    grid = model_grid(p)
    models = []
    for i, (M, s) in enumerate(grid):
        torch.manual_seed(90_000 + 1000 * p.seed + s)  # the same initialisation for every M of one seed
        models.append(rg.RegressionTransformer(cfg))
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0])

    def forward(prm: dict[str, torch.Tensor], buf: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (prm, buf), (tokens,))

    batched = vmap(forward)
    pools = [task_pool(p, M, s) for M, s in grid]
    N, B, K, d = len(grid), p.batch, p.max_k, p.d
    g = torch.Generator().manual_seed(95_000 + p.seed)
    opt = torch.optim.Adam(list(params.values()), lr=p.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / p.warmup) * 0.5 * (1 + np.cos(np.pi * min(s, p.steps) / p.steps)))
    losses = np.zeros((p.steps, N), dtype=np.float32)
    for step in tqdm(range(p.steps), desc=NAME, disable=not progress, mininterval=2.0):
        w = torch.empty(N, B, d)
        for i, (M, _) in enumerate(grid):
            if M == INFINITE:
                w[i] = torch.randn(B, d, generator=g)
            else:
                w[i] = pools[i][torch.randint(M, (B,), generator=g)]
        X = torch.randn(N, B, K, d, generator=g)
        y = torch.einsum("nbkd,nbd->nbk", X, w) + p.noise * torch.randn(N, B, K, generator=g)
        tokens = rg.interleave(X.view(N * B, K, d), y.view(N * B, K)).view(N, B, 2 * K, d + 1)
        out = batched(params, buffers, tokens)[:, :, 0::2]  # [N, B, K]
        per_model = ((out - y) ** 2).mean(dim=(1, 2))
        opt.zero_grad(set_to_none=True)
        per_model.sum().backward()
        opt.step()
        sched.step()
        losses[step] = per_model.detach().numpy()
    return template, {k: v.detach() for k, v in params.items()}, losses


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    say = reporter(NAME, progress)
    grid = model_grid(p)
    say(f"training {len(grid)} models together ({len(p.Ms)} task counts x {p.seeds} seeds)")
    with timing.timed("train_seconds"):
        template, stacked, losses = train_models(p, progress)
    buffers = {k: v[None].expand(len(grid), *v.shape) for k, v in template.named_buffers()}
    new = new_task_prompts(p)
    lam = p.noise ** 2
    truth_new = torch.einsum("nkd,nd->nk", new.X.double(), new.w.double())
    ridge_new = ridge_all(new.X, new.y, lam)
    arrays: dict[str, np.ndarray] = {"Ms": np.asarray([int(m) for m in p.Ms]), "train_loss": losses}
    per_model: dict[str, list[np.ndarray]] = {}
    summary = []
    for i, (M, s) in enumerate(grid):
        prm = {k: v[i] for k, v in stacked.items()}
        buf = {k: v[i] for k, v in buffers.items()}
        pool = task_pool(p, M, s)
        g = torch.Generator().manual_seed(85_000 + 1000 * p.seed + i)
        if M == INFINITE:
            train_t = rg.sample_tasks(p.n_eval, p.max_k, p.d, p.noise, g)
        else:  # prompts whose tasks come from this model's pool
            idx = torch.randint(M, (p.n_eval,), generator=g)
            X = torch.randn(p.n_eval, p.max_k, p.d, generator=g)
            w = pool[idx]
            y = torch.einsum("nkd,nd->nk", X, w) + p.noise * torch.randn(p.n_eval, p.max_k, generator=g)
            train_t = rg.Tasks(w, X, y, X[:, :1], y[:, :1])
        stats = []
        for t, truth, ridge in ((new, truth_new, ridge_new),
                                (train_t, None, None)):
            if truth is None:
                truth = torch.einsum("nkd,nd->nk", t.X.double(), t.w.double())
                ridge = ridge_all(t.X, t.y, lam)
            with torch.no_grad():
                T = functional_call(template, (prm, buf), (rg.interleave(t.X, t.y),))[:, 0::2].double()
            D = ridge if M == INFINITE else dmmse(pool, t.X, t.y, p.noise)
            stats += [rg.excess_error(T, truth, p.d), rg.excess_error(D, truth, p.d),
                      rg.excess_error(ridge, truth, p.d), rg.prediction_gap(T, D, p.d),
                      rg.prediction_gap(T, ridge, p.d),
                      (rg.prediction_gap(T, ridge, p.d) - rg.prediction_gap(T, D, p.d))[:, 1:].mean(1, keepdim=True)]
        names = [f"{where}.{what}" for where in ("new", "train")
                 for what in ("error", "dmmse_error", "ridge_error", "spd_dmmse", "spd_ridge", "preference")]
        entry: dict[str, Any] = {"M": M if M != INFINITE else None, "seed": s}
        for name, v in zip(names, stats):
            mean, lo, hi = bootstrap_mean_ci(v.numpy(), n_boot=p.n_boot, seed=p.seed)
            per_model.setdefault(f"{name}.mean", []).append(mean)
            per_model.setdefault(f"{name}.lo", []).append(lo)
            per_model.setdefault(f"{name}.hi", []).append(hi)
            if name.endswith("preference"):
                entry[name] = [float(mean[0]), float(lo[0]), float(hi[0])]
        # errors averaged over k = 1 .. K-1 (one number per model, as Raventos et al. report)
        for name, v in zip(names, stats):
            if not name.endswith("preference"):
                mean, lo, hi = bootstrap_mean_ci(v[:, 1:].mean(1).numpy(), n_boot=p.n_boot, seed=p.seed)
                entry[f"{name}_avg"] = [float(mean), float(lo), float(hi)]
        summary.append(entry)
    for name, vals in per_model.items():
        arrays[name] = np.stack(vals)  # [model, K] (preference: [model, 1])
    data = {"models": summary, "grid": [[M, s] for M, s in grid], "threads": THREADS,
            "n_params": int(sum(v[0].numel() for v in stacked.values())),
            "final_train_loss": [float(x) for x in losses[-100:].mean(0)],
            "params": json.loads(json.dumps(asdict(p))), "ci_level": 0.95}
    return arrays, data
