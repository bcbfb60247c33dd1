"""Is a transformer trained on a rule family Bayes-optimal in context? A test against the exact posterior.

A small transformer (:class:`icl.toybayes.TinyGPT`) is trained from scratch on fresh sequences from the
rule family of :mod:`icl.toybayes`. Every ``eval_every`` steps it is scored on a fixed held-out set:
for each example index ``k`` we compare its predictive distribution for ``y_k`` with the exact
posterior predictive, by ``KL(exact || model)``, and its cross-entropy with the Bayes-optimal one.
The exact predictive of a learner that ignores the context (the prior predictive) gives the scale:
it is what "no in-context learning at all" costs.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from icl import timing, toymodels as tm
from icl.experiments import between, with_threads
from icl.stats import bootstrap_mean_ci
from icl.toybayes import RuleFamily, TinyGPT, answer_logprobs, exact_predictive, kl_per_example

NAME = "bayes_toy"
VERSION = 2  # 2: fused AdamW; the trained weights are kept in the entry (for c2w_toy)
CHAPTER = "report/02-bayes.qmd"
USES_MODEL = False
DESCRIPTION = "small transformer trained on a rule family vs the exact Bayesian posterior predictive"
THREADS = 1  # training is deterministic only for a fixed thread count; one keeps it cheap too


@dataclass(frozen=True)
class Params:
    k: int = 16
    noise: float = 0.1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 8000
    batch: int = 64
    lr: float = 1e-3
    eval_every: int = 500
    n_eval: int = 512
    seed: int = 0

    def validate(self) -> None:
        if self.steps < self.eval_every or self.k < 2:
            raise ValueError("need steps >= eval_every and k >= 2")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")

    @property
    def family(self) -> RuleFamily:
        return RuleFamily(noise=self.noise)


LIMITS = {"k": between(2, 64), "noise": between(0.001, 0.999), "d_model": between(8, 512),
          "n_layers": between(1, 8), "n_heads": between(1, 16), "steps": between(1, 200_000),
          "batch": between(1, 4096), "lr": between(1e-6, 1.0), "eval_every": between(1, 200_000),
          "n_eval": between(2, 8192)}


def content_digest(params: Params) -> str:
    return hashlib.sha256(repr(asdict(params.family)).encode()).hexdigest()


def prior_predictive(family: RuleFamily, tokens: torch.Tensor) -> torch.Tensor:
    """What a learner that ignores all earlier pairs should predict: [batch, k, vocab] log-probs."""
    x = tokens[:, 0::2]
    hyp = family.hypotheses.to(torch.float64)
    pred = hyp[None, None, :, 0] * x[..., None] + hyp[None, None, :, 1]
    onehot = torch.nn.functional.one_hot(pred.long(), family.vocab).to(torch.float64)
    emit = (1 - family.noise) * onehot + family.noise / family.vocab
    return emit.mean(dim=2).log()


def evaluate(model: TinyGPT, tokens: torch.Tensor, exact: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logp = answer_logprobs(model, tokens)
    model.train()
    y = tokens[:, 1::2, None]
    return {
        "kl": kl_per_example(exact, logp),  # [n_eval, k]
        "model_ce": -logp.gather(-1, y)[..., 0],
        "bayes_ce": -exact.gather(-1, y)[..., 0],
    }


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    return _train(params, progress)


def load_net(params: Params, arrays: dict[str, np.ndarray]) -> TinyGPT:
    """The trained model of an entry of this experiment (computed with ``params``), in eval mode."""
    family = params.family
    net = TinyGPT(family.vocab, 2 * params.k, params.d_model, params.n_layers, params.n_heads, 4 * params.d_model)
    return tm.load_state_arrays(net, arrays, "net.").eval()


@dataclass
class Trained:
    """A trained model and what it was scored on: everything :func:`train` produces."""

    net: TinyGPT
    eval_tokens: torch.Tensor  # [n_eval, 2k]
    exact: torch.Tensor  # [n_eval, k, vocab] exact posterior predictive (log-probabilities)
    prior: torch.Tensor  # [n_eval, k, vocab] prior predictive (log-probabilities)
    steps: list[int]
    kl_curve: list[np.ndarray]  # per evaluation: mean KL per example index [k]
    ce_curve: list[np.ndarray]
    train_loss: list[float]
    seconds: float  # training time: provenance, recorded with icl.timing by the callers


def train(params: Params, progress: bool = False) -> Trained:
    """Train the model of this experiment from the seed, exactly as :func:`compute` does.

    Deterministic for a fixed thread count (the caller sets it; :func:`compute` uses ``THREADS``). The
    weights are kept in the entry (``net.*``; :func:`load_net`), so other experiments read them.
    """
    family = params.family
    torch.manual_seed(params.seed)
    eval_gen = torch.Generator().manual_seed(10_000 + params.seed)
    train_gen = torch.Generator().manual_seed(params.seed)
    eval_tokens, _ = family.sample(params.n_eval, params.k, eval_gen)
    exact = exact_predictive(family, eval_tokens)
    prior = prior_predictive(family, eval_tokens)
    net = TinyGPT(family.vocab, 2 * params.k, params.d_model, params.n_layers, params.n_heads, 4 * params.d_model)
    opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=0.0, fused=True)
    steps, kl_curve, ce_curve, train_loss = [], [], [], []
    running, start = [], time.perf_counter()
    for step in tqdm(range(1, params.steps + 1), desc="bayes_toy", disable=not progress, leave=False):
        tokens, _ = family.sample(params.batch, params.k, train_gen)
        loss = -answer_logprobs(net, tokens).gather(-1, tokens[:, 1::2, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step % params.eval_every == 0:
            ev = evaluate(net, eval_tokens, exact)
            steps.append(step)
            kl_curve.append(ev["kl"].mean(0).numpy())
            ce_curve.append(ev["model_ce"].mean(0).numpy())
            train_loss.append(float(np.mean(running)))
            running = []
    return Trained(net, eval_tokens, exact, prior, steps, kl_curve, ce_curve, train_loss, time.perf_counter() - start)


def _train(params: Params, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    t = train(params, progress)
    family, net, eval_tokens, exact, prior = params.family, t.net, t.eval_tokens, t.exact, t.prior
    steps, kl_curve, ce_curve, train_loss = t.steps, t.kl_curve, t.ce_curve, t.train_loss
    timing.record("train_seconds", t.seconds)
    ev = evaluate(net, eval_tokens, exact)
    kl_prior = kl_per_example(exact, prior)
    kl_mean, kl_lo, kl_hi = bootstrap_mean_ci(ev["kl"].numpy(), seed=params.seed)
    pr_mean, pr_lo, pr_hi = bootstrap_mean_ci(kl_prior.numpy(), seed=params.seed)
    # One held-out sequence's predictive distributions at a few k, for a picture.
    show = torch.tensor([1, 2, 4, params.k])
    with torch.no_grad():
        model_show = answer_logprobs(net.eval(), eval_tokens[:1])[0, show - 1].exp().numpy()
    arrays = {
        "steps": np.array(steps, dtype=np.int32),
        "kl_over_training": np.stack(kl_curve).astype(np.float32),  # [n_evals, k]
        "model_ce_over_training": np.stack(ce_curve).astype(np.float32),
        "train_loss": np.array(train_loss, dtype=np.float32),
        "kl.mean": kl_mean, "kl.lo": kl_lo, "kl.hi": kl_hi,
        "kl_prior.mean": pr_mean, "kl_prior.lo": pr_lo, "kl_prior.hi": pr_hi,
        "model_ce": ev["model_ce"].mean(0).numpy(), "bayes_ce": ev["bayes_ce"].mean(0).numpy(),
        "show_k": show.numpy(), "show_exact": exact[0, show - 1].exp().numpy(), "show_model": model_show,
        "show_tokens": eval_tokens[0].numpy(),
        **tm.state_arrays(net, "net."),  # the trained weights, for c2w_toy
    }
    n_params = sum(p.numel() for p in net.parameters())
    data = {
        "n_params": int(n_params),
        "n_hypotheses": len(family.slopes) * len(family.intercepts),
        "vocab": family.vocab,
        "final_kl_mean": float(ev["kl"].mean()),
        "final_kl_last": [float(kl_mean[-1]), float(kl_lo[-1]), float(kl_hi[-1])],
        "final_kl_first": [float(kl_mean[0]), float(kl_lo[0]), float(kl_hi[0])],
        "prior_kl_last": [float(pr_mean[-1]), float(pr_lo[-1]), float(pr_hi[-1])],
        "bayes_ce_mean": float(ev["bayes_ce"].mean()),
        "model_ce_mean": float(ev["model_ce"].mean()),
        "log_vocab": math.log(family.vocab),
    }
    return arrays, data
