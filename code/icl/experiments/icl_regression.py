"""In-context linear regression, trained here (chapter 8).

A small transformer (:class:`icl.regression.RegressionTransformer`) is trained from scratch on prompts
``x_1, y_1, …, x_K, y_K`` with ``y = w·x + noise`` and ``w ~ N(0, I_d)``, predicting each ``y_i`` from the
examples before it. On a fixed evaluation set we measure its normalised excess error after ``k``
examples, for every ``k < K``, beside minimum-norm least squares, ridge with ``λ = σ²`` (the posterior
mean: Bayes-optimal) and one gradient-descent step from ``w = 0`` with the best step size for that ``k``
(fitted on a separate calibration set).

Then linear self-attention: the layer built to equal one GD step (:func:`icl.regression.gd_lsa`) is
compared with the GD prediction in float64 and float32; its context is turned into a weight update of
its own matrix ``M``, exactly; and a layer with free ``P``, ``Q`` is trained to see what it learns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from icl import regression as rg
from icl import timing
from icl import toymodels as tm
from icl.experiments import between, with_threads
from icl.stats import bootstrap_mean_ci

NAME = "icl_regression"
VERSION = 1
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = False
DESCRIPTION = "transformer trained here on in-context linear regression vs least squares, ridge, one GD step; LSA = GD"
THREADS = 1


@dataclass(frozen=True)
class Params:
    seed: int = 0
    d: int = 5
    max_k: int = 20
    noise: float = 0.25
    d_model: int = 48
    n_layers: int = 3
    n_heads: int = 4
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    n_eval: int = 2000
    n_boot: int = 1000
    lsa_k: int = 10
    lsa_steps: int = 1500
    lsa_lr: float = 1e-2
    lsa_batch: int = 256

    def validate(self) -> None:
        if self.d < 1 or self.max_k < 2 or self.noise < 0 or self.lsa_k < 1:
            raise ValueError("need d >= 1, max_k >= 2, noise >= 0, lsa_k >= 1")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")


LIMITS = {"d": between(1, 64), "max_k": between(2, 128), "noise": between(0.0, 10.0), "d_model": between(8, 512),
          "n_layers": between(1, 12), "n_heads": between(1, 16), "steps": between(1, 100_000),
          "batch": between(1, 4096), "lr": between(1e-6, 1.0), "warmup": between(1, 100_000),
          "n_eval": between(2, 20_000), "n_boot": between(20, 10_000), "lsa_k": between(1, 128),
          "lsa_steps": between(1, 100_000), "lsa_lr": between(1e-6, 10.0), "lsa_batch": between(1, 8192)}


def model_config(p: Params) -> rg.RegressionConfig:
    return rg.RegressionConfig(d=p.d, max_k=p.max_k, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads)


def eval_tasks(p: Params) -> tuple[rg.Tasks, rg.Tasks]:
    """The evaluation set (``n_eval`` prompts of ``max_k`` examples) and a calibration set for the GD step size."""
    g = torch.Generator().manual_seed(10_000 + p.seed)
    return (rg.sample_tasks(p.n_eval, p.max_k, p.d, p.noise, g),
            rg.sample_tasks(p.n_eval, p.max_k, p.d, p.noise, g))


def content_digest(p: Params) -> str:
    h = hashlib.sha256()
    for t in eval_tasks(p):
        t.hash_into(h)
    return h.hexdigest()


def build_model(p: Params, seed_offset: int = 0) -> rg.RegressionTransformer:
    torch.manual_seed(p.seed + seed_offset)
    return rg.RegressionTransformer(model_config(p))


def train_model(p: Params, progress: bool = False) -> tuple[rg.RegressionTransformer, list[float]]:
    """AdamW, linear warm-up then cosine decay, fresh tasks every step; loss on every prediction."""
    from tqdm.auto import tqdm

    model = build_model(p)
    g = torch.Generator().manual_seed(p.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / p.warmup) * 0.5 * (1 + np.cos(np.pi * min(s, p.steps) / p.steps)))
    losses = []
    for _ in tqdm(range(p.steps), desc="regression transformer", disable=not progress, mininterval=2.0):
        t = rg.sample_tasks(p.batch, p.max_k, p.d, p.noise, g)
        loss = ((model.predict_all(t.X, t.y) - t.y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, losses


def baselines_by_k(ev: rg.Tasks, cal: rg.Tasks, p: Params) -> dict[str, np.ndarray]:
    """Predictions ``[n_eval, max_k]`` of each estimator for example ``i`` after the ``i`` examples before it
    (float64), and the fitted GD step sizes."""
    X, y = ev.X.double(), ev.y.double()
    n, K, d = X.shape
    out = {name: np.zeros((n, K)) for name in ("least_squares", "ridge", "gd_step")}
    lrs = np.zeros(K)
    for k in range(K):
        Xq = X[:, k:k + 1]
        if k == 0:
            continue  # every estimator predicts 0 with no examples
        Xc, yc = X[:, :k], y[:, :k]
        out["least_squares"][:, k] = rg.least_squares(Xc, yc, Xq)[:, 0].numpy()
        out["ridge"][:, k] = rg.ridge(Xc, yc, Xq, p.noise ** 2)[:, 0].numpy()
        cX, cy = cal.X.double(), cal.y.double()
        target = torch.einsum("nd,nd->n", cX[:, k], cal.w.double())[:, None]
        lrs[k] = rg.best_gd_lr(cX[:, :k], cy[:, :k], cX[:, k:k + 1], target)
        out["gd_step"][:, k] = rg.gd_step(Xc, yc, Xq, lrs[k])[:, 0].numpy()
    out["zero"] = np.zeros((n, K))
    return {**out, "gd_lrs": lrs}


def lsa_checks(p: Params) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    g = torch.Generator().manual_seed(30_000 + p.seed)
    k, d = p.lsa_k, p.d
    out: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    # 1. the constructed layer equals one GD step, for several step sizes, in float64 and float32
    errs = {}
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        t = rg.sample_tasks(1000, k, d, p.noise, g, n_query=8, dtype=dtype)
        worst, scale = 0.0, 0.0
        for lr in (0.1, 0.5, 1.0):
            lsa = rg.gd_lsa(d, k, lr, dtype=dtype)
            with torch.no_grad():
                a, b = lsa(t.X, t.y, t.Xq), rg.gd_step(t.X, t.y, t.Xq, lr)
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(b.abs().max()))
        errs[name] = {"max_abs_error": worst, "max_abs_prediction": scale, "eps": float(torch.finfo(dtype).eps)}
    out["identity"] = errs
    # 2. context -> weights, exactly: the context's sum, or one gradient step on M, replaces the context
    t = rg.sample_tasks(200, k, d, p.noise, g, n_query=8, dtype=torch.float64)
    lr = 0.5
    lsa = rg.gd_lsa(d, k, lr)
    e_sum, e_grad = 0.0, 0.0
    with torch.no_grad():
        in_context = lsa(t.X, t.y, t.Xq)
    for i in range(t.X.shape[0]):
        dM = rg.lsa_weight_update(lsa, t.X[i], t.y[i])
        e_sum = max(e_sum, float((rg.lsa_no_context(lsa, t.Xq[i], dM) - in_context[i]).abs().max()))
        dM = rg.gd_on_M(lsa, t.X[i], t.y[i], lr=k ** 2 / lr)
        e_grad = max(e_grad, float((rg.lsa_no_context(lsa, t.Xq[i], dM) - in_context[i]).abs().max()))
    out["context_as_weights"] = {"sum_max_abs_error": e_sum, "gd_on_M_max_abs_error": e_grad,
                                 "gd_on_M_lr": k ** 2 / lr, "n_tasks": int(t.X.shape[0])}
    # 3. a trained linear self-attention layer
    with timing.timed("lsa_train_seconds"):
        trained, losses = rg.lsa_train(d, k, p.noise, p.lsa_steps, p.lsa_lr, p.lsa_batch, seed=p.seed)
    arrays["lsa.P"] = trained.P.detach().numpy().astype(np.float32)
    arrays["lsa.Q"] = trained.Q.detach().numpy().astype(np.float32)
    arrays["lsa.train_loss"] = np.asarray(losses, dtype=np.float32)
    t = rg.sample_tasks(p.n_eval, k, d, p.noise, g, n_query=1)
    cal = rg.sample_tasks(p.n_eval, k, d, p.noise, g, n_query=1)
    with torch.no_grad():
        pred = trained(t.X, t.y, t.Xq)
    best = rg.best_gd_lr(cal.X, cal.y, cal.Xq, cal.yq)
    gd = rg.gd_step(t.X, t.y, t.Xq, best)
    Pm, Qm = trained.P.detach(), trained.Q.detach()
    # effective step size read off the weights: prediction = (1/k) P[y,y] Σ y_i x_iᵀ Q[x,x] x + (other terms)
    eff = float(Pm[d, d] * torch.diagonal(Qm[:d, :d]).mean())
    out["trained"] = {
        "error": float(rg.excess_error(pred, t.yq, d).mean()),
        "gd_error": float(rg.excess_error(gd, t.yq, d).mean()),
        "ridge_error": float(rg.excess_error(rg.ridge(t.X.double(), t.y.double(), t.Xq.double(), p.noise ** 2).float(),
                                             t.yq, d).mean()),
        "gap_to_gd": float(((pred - gd) ** 2).mean()),
        "pred_var": float((gd ** 2).mean()),
        "best_gd_lr": best,
        "effective_lr": eff,
        "offdiag_max": float(max(Qm[:d, :d].sub(torch.diag(torch.diagonal(Qm[:d, :d]))).abs().max(),
                                 Pm[d, :d].abs().max(), Pm[:d].abs().max())),
    }
    return arrays, out


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    with timing.timed("train_seconds"):
        net, losses = train_model(p, progress)
    ev, cal = eval_tasks(p)
    with torch.no_grad():
        pred = net.predict_all(ev.X, ev.y).double().numpy()
    truth = torch.einsum("nkd,nd->nk", ev.X.double(), ev.w.double()).numpy()
    preds = {"transformer": pred, **baselines_by_k(ev, cal, p)}
    lrs = preds.pop("gd_lrs")
    arrays: dict[str, np.ndarray] = {"train_loss": np.asarray(losses, dtype=np.float32), "gd_lrs": lrs}
    summary: dict[str, Any] = {}
    for name, pr in preds.items():
        err = (pr - truth) ** 2 / p.d
        mean, lo, hi = bootstrap_mean_ci(err, n_boot=p.n_boot, seed=p.seed)
        arrays[f"{name}.mean"], arrays[f"{name}.lo"], arrays[f"{name}.hi"] = mean, lo, hi
        summary[name] = {str(k): [float(mean[k]), float(lo[k]), float(hi[k])] for k in range(p.max_k)}
    # the transformer's prediction against ridge's, per k (how close to Bayes-optimal it is)
    gap = (preds["transformer"] - preds["ridge"]) ** 2 / p.d
    arrays["transformer_vs_ridge.mean"] = gap.mean(0)
    arrays.update(tm.state_arrays(net, "model."))
    lsa_arrays, lsa = lsa_checks(p)
    arrays.update(lsa_arrays)
    data = {
        "errors": summary,
        "n_params": sum(x.numel() for x in net.parameters()),
        "final_train_loss": float(np.mean(losses[-100:])),
        "lsa": lsa,
        "threads": THREADS,
        "params": json.loads(json.dumps(asdict(p))),
        "ci_level": 0.95,
    }
    return arrays, data


def load_model(entry: Any) -> rg.RegressionTransformer:
    """The trained transformer of a cache entry of this experiment."""
    p = Params(**{k: v for k, v in entry.data["params"].items()})
    return tm.load_state_arrays(rg.RegressionTransformer(model_config(p)), entry.arrays, "model.").eval()
