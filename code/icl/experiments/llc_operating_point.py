"""The learning coefficient of the phase-change model at its own operating point: calibration, a γ sweep,
a curvature control, and the free energy of the two phases (chapter 9, after ``llc_phase_change``).

``llc_phase_change`` estimates the local learning coefficient (LLC) at checkpoints of the phase-change
transformer with SGLD settings (``γ = 1000``, ``nβ = n/log n ≈ 148``, minibatches of 32, 250 steps)
far from those at which ``slt_llc`` calibrated the estimator (``γ = 1``, ``nβ ≈ 1086``, full batch,
20,000 steps). This experiment asks what the numbers at the transformer's settings mean:

* **Calibration at the operating point.** The same estimator, with exactly the transformer's ``n``,
  ``β``, ``γ``, step size, minibatch size, chain length, burn-in, number of chains and control
  variate (each step records ``L_m(w) − L_m(w*)``), on models of known λ (``slt_llc``'s families).
  A *loss scale* ``s`` multiplies each model's loss (Gaussian noise of variance ``1/s``): λ does not
  depend on it, but the curvature ``s ∇²L`` does, so the scales show where in the curvature range the
  estimator returns λ. Exact targets (closed form or quadrature) separate the sampler from the
  estimator, and the *curvature proxy* ``(nβ / 2γ) tr ∇²L_n(w*)`` is what the estimator tends to
  when ``γ ≫ nβ × curvature``: for a quadratic loss the target is ``(nβ/2) Σ h_i / (nβ h_i + γ)``.
* **γ sweep.** SGLD at the checkpoints before, at and after the transition
  (:func:`icl.experiments.llc_phase_change.reference_checkpoints`) at further values of ``γ``; the
  value of ``llc_phase_change`` (read from its entry, not recomputed) is the middle one. In the
  curvature-proxy regime the estimate scales like ``1/γ``.
* **Curvature control.** A Hutchinson estimate of ``tr ∇²L_n(w*)`` at every checkpoint, for the very
  loss the chains sample (per-sequence negative log-likelihood, mean over the ``n`` sequences),
  with an interval over probes, and the largest Hessian eigenvalue by power iteration at the three
  reference checkpoints. The function ``h ↦ h / (nβ h + γ)`` is concave, so sharpening every
  curvature by a factor ``c`` raises the quadratic target by at most ``c``: a rise of the LLC by
  more than the rise of ``tr H`` is more than a uniformly sharper minimum can give.
* **Free energy of the two phases.** With ``L`` the loss per sequence and ``λ̂`` the estimate at the
  checkpoints before and after, ``F_i(n) = n L_i + λ_i log n``; the phase with more loss and a
  smaller coefficient is preferred up to the ``n`` where the two cross. Bootstrap over chains and
  sequences gives its interval.

Intuition. An LLC estimate at finite ``γ`` counts directions around ``w*`` whose curvature, in units
of the noise scale ``γ / nβ``, is large, and weighs the others by their curvature. Where most
curvatures are far below ``γ / nβ``, counting has turned into measuring sharpness; the calibration
models and the Hessian of the transformer say which regime its numbers are in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from icl import slt, timing, toymodels as tm
from icl.experiments import between, each_float, llc_phase_change as lpc, phase_change as pc, slt_llc, text, with_threads

NAME = "llc_operating_point"
VERSION = 1
CHAPTER = "report/10-slt.qmd"
USES_MODEL = False
DEPENDS = ("phase_change", "llc_phase_change")
DESCRIPTION = "LLC at the transformer's SGLD settings: calibration, gamma sweep, Hutchinson tr H, phase free energies"
THREADS = 1
CALIB_SPECS = "model specs as in slt_llc: linear-D, mono-P1[-P2..], rrr-M-N-H-r"

_LP = lpc.Params()


@dataclass(frozen=True)
class Params:
    seed: int = 0
    # calibration at the operating point (the SGLD settings are llc_phase_change's defaults)
    calib_models: tuple[str, ...] = ("linear-10", "mono-1", "mono-1-1", "mono-1-2", "rrr-3-3-3-1")
    loss_scales: tuple[str, ...] = ("1", "10", "100")
    n_datasets: int = 3
    # gamma sweep at the reference checkpoints (llc_phase_change's gamma is the third value)
    sweep_gammas: tuple[str, ...] = ("300", "3000")
    # curvature
    hutch_probes: int = 16
    hutch_batch: int = 64
    power_iters: int = 15
    power_batch: int = 128
    noise_samples: int = 64   # per-sample gradients for the minibatch-noise ratio
    # free-energy bootstrap
    n_boot: int = 2000

    def validate(self) -> None:
        for spec in self.calib_models:
            slt_llc.parse(spec)
        if any(float(s) <= 0 for s in self.loss_scales) or any(float(g) <= 0 for g in self.sweep_gammas):
            raise ValueError("loss scales and gammas must be positive")
        if float(_LP.gamma) in [float(g) for g in self.sweep_gammas]:
            raise ValueError("the sweep's gammas must differ from llc_phase_change's (read from its entry)")
        if self.hutch_probes < 2 or self.n_boot < 10:
            raise ValueError("need hutch_probes >= 2 and n_boot >= 10")
        if not 1 <= self.hutch_batch <= _LP.n or not 1 <= self.power_batch <= _LP.n or not 2 <= self.noise_samples <= _LP.n:
            raise ValueError("batches must be within the llc_phase_change sample")


LIMITS = {"calib_models": text(CALIB_SPECS), "loss_scales": each_float(1e-3, 1e6), "n_datasets": between(1, 20),
          "sweep_gammas": each_float(1e-3, 1e7), "hutch_probes": between(2, 1000), "hutch_batch": between(1, 100_000),
          "power_iters": between(1, 1000), "power_batch": between(1, 100_000),
          "noise_samples": between(2, 1024), "n_boot": between(10, 100_000)}


def content_digest(p: Params) -> str:
    h = hashlib.sha256(lpc.content_digest(_LP).encode())
    for spec in p.calib_models:  # the first samples of each calibration model's first dataset
        data, _, _ = slt_llc.build(spec, 256, p.seed)
        h.update(spec.encode())
        h.update(data.x.numpy().tobytes())
        h.update(data.y.numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ calibration at the point

def scaled_exact_target(spec: str, data: slt.RegressionData, w_star: torch.Tensor, scale: float, beta: float,
                        gamma: float) -> float:
    """``nβ E[s (L_n(w) − L_n(w*))]`` under ``exp(−nβ s L_n − γ|w − w*|²/2)``, exactly: closed form for
    linear regression, quadrature for monomials with at most two parameters; NaN otherwise."""
    kind, nums = slt_llc.parse(spec)
    n = data.n
    x, y = data.x.numpy(), data.y.numpy()
    if kind == "linear":
        w_hat = np.linalg.solve(x.T @ x, x.T @ y[:, 0])
        return slt.gaussian_tempered_expectation(scale * (x.T @ x / n), w_hat, w_star.numpy(), n, beta, gamma)
    if kind != "mono" or len(nums) > 2:
        return float("nan")
    sxx, sxy = float(x[:, 0] @ x[:, 0]), float(x[:, 0] @ y[:, 0])
    h = min(8.0 / math.sqrt(gamma), 25.0)

    def nL(A: np.ndarray, B: np.ndarray) -> np.ndarray:  # n s (L_n(w) − L_n(0)); B is a dummy for one parameter
        g = A ** nums[0] * (B ** nums[1] if len(nums) == 2 else 1.0)
        return scale * (0.5 * sxx * g ** 2 - sxy * g)

    return slt.tempered_expectation(nL, 2, beta, gamma, half_width=h)


def hessian_trace_at(loss: slt.LossFn, w_star: torch.Tensor) -> float:
    """``tr ∇²L_n(w*)`` of a small calibration model, exactly (autograd Hessian, float64)."""
    H = torch.autograd.functional.hessian(lambda w: loss(w[None], None)[0], w_star)
    return float(torch.trace(H))


def minibatch_noise_ratio(per_sample_grads: np.ndarray, step_size: float, nbeta: float, batch: int) -> float:
    """How much noise the minibatch gradient adds to an SGLD step, relative to the injected noise: the
    step's minibatch term ``(ε/2) nβ (∇L_m − ∇L_n)`` has total variance ``(ε/2)² (nβ)² tr Cov(∇ℓ_i) / b``,
    the injected ``N(0, ε I)`` has ``ε d``. ``per_sample_grads``: ``[samples, d]``. Well below 1 the
    chain samples the tempered posterior; at 1 and above it runs hotter, and the estimate is inflated."""
    g = np.asarray(per_sample_grads, dtype=np.float64)
    tr_cov = float(g.var(axis=0, ddof=1).sum())
    return (step_size / 2) ** 2 * nbeta ** 2 * tr_cov / batch / (step_size * g.shape[1])


def per_sample_gradients(loss: slt.LossFn, w_star: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    """Gradients at ``w*`` of the loss of each single sample ``idx[i]`` of a calibration model: ``[len(idx), d]``."""
    out = []
    for i in idx:
        w = w_star.detach().clone()[None].requires_grad_(True)
        (g,) = torch.autograd.grad(loss(w, i.reshape(1))[0], w)
        out.append(g[0].numpy())
    return np.stack(out)


def calibrate(p: Params, lp: lpc.Params, say: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The estimator at the transformer's settings on the calibration models, at every loss scale."""
    beta = 1.0 / math.log(lp.n)
    nbeta = lp.n * beta
    scales = np.array([float(s) for s in p.loss_scales])
    S, C = len(scales), lp.num_chains
    arrays: dict[str, np.ndarray] = {"calib.scales": scales}
    rows: dict[str, Any] = {}
    for spec in p.calib_models:
        lam, m, d = slt_llc.truth(spec)
        est = np.empty((p.n_datasets, S, C))
        target = np.empty((p.n_datasets, S))
        trace_h = np.empty(p.n_datasets)
        noise = np.empty((p.n_datasets, S))
        for ds in range(p.n_datasets):
            data, w_star, loss = slt_llc.build(spec, lp.n, p.seed + ds)
            row_scale = torch.as_tensor(scales).repeat_interleave(C)  # [S*C]: one loss scale per group

            def centred(w: torch.Tensor, idx: torch.Tensor | None, _loss=loss, _w=w_star) -> torch.Tensor:
                # the transformer run's control variate: s (L_m(w) − L_m(w*)) on the step's own minibatch
                return row_scale * (_loss(w, idx) - _loss(_w[None], idx))

            with np.errstate(all="ignore"):  # a scale too stiff for the step size diverges, in its own rows
                res = slt.sgld_llc_groups(centred, w_star[None].repeat(S, 1), lp.n, num_chains=C,
                                          num_steps=lp.num_steps, num_burnin=lp.num_burnin, step_size=lp.step_size,
                                          gamma=lp.gamma, batch_size=lp.batch_size, seed=p.seed + 50_000 + ds)
            est[ds] = np.stack([r.llc_chains for r in res])
            target[ds] = [scaled_exact_target(spec, data, w_star, float(s), beta, lp.gamma) for s in scales]
            trace_h[ds] = hessian_trace_at(loss, w_star)
            g = per_sample_gradients(loss, w_star, torch.arange(p.noise_samples))
            noise[ds] = [minibatch_noise_ratio(float(s) * g, lp.step_size, nbeta, lp.batch_size) for s in scales]
        proxy = nbeta / (2 * lp.gamma) * scales[None, :] * trace_h[:, None]  # [datasets, scales]
        arrays[f"calib.{spec}.llc_chains"] = est
        arrays[f"calib.{spec}.target"] = target
        arrays[f"calib.{spec}.proxy"] = proxy
        arrays[f"calib.{spec}.noise_ratio"] = noise
        per_ds = est.mean(2)  # [datasets, scales]
        rows[spec] = {
            "lambda": lam, "m": m, "d": d, "trace_h": float(trace_h.mean()),
            "by_scale": {str(s): {
                "estimate": _finite(per_ds[:, j].mean()),
                "spread_datasets": _finite(per_ds[:, j].std(ddof=1)) if p.n_datasets > 1 else None,
                "ratio_to_lambda": _finite(per_ds[:, j].mean() / lam),
                "diverged": bool(not np.isfinite(per_ds[:, j]).all() or np.abs(per_ds[:, j]).max() > 1e3 * max(d, 1)),
                "exact_target": None if not np.isfinite(target[:, j]).all() else float(target[:, j].mean()),
                "proxy": float(proxy[:, j].mean()),
                "noise_ratio": float(noise[:, j].mean()),
            } for j, s in enumerate(p.loss_scales)},
        }
        say(f"calibration {spec}: λ={lam:g}, estimates {np.round(per_ds.mean(0), 3)} at scales {p.loss_scales}")
    return arrays, {"models": rows, "nbeta": nbeta, "gamma": lp.gamma, "curvature_threshold": lp.gamma / nbeta}


# ---------------------------------------------------------------------------------- the transformer

def sequence_batch_loss(model: tm.AttnOnlyTransformer, tokens: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss the chains sample, as a differentiable function of ``model``'s own parameters: the mean
    over ``tokens[idx]`` (``[n, n_ctx]``) of each sequence's summed next-token negative log-likelihood.
    It runs the per-head path of the model (the fused attention kernel has no double backward), the
    same function as the chains' batched forward."""
    ones = torch.ones(model.cfg.n_layers, model.cfg.n_heads)
    per_seq = tokens.shape[1] - 1

    def loss(idx: torch.Tensor) -> torch.Tensor:
        toks = tokens[idx]
        return tm.next_token_loss(model(toks, head_mask=ones), toks) * per_seq

    return loss


def crossing_n(dL: float, dlam: float) -> float:
    """Where the free energies ``n L_i + λ_i log n`` of two phases cross, with ``dL = L_1 − L_2`` the
    loss the second phase saves per sample and ``dlam = λ_2 − λ_1`` the coefficient it costs: the
    larger root of ``n dL = dlam log n``, beyond which the second phase is preferred. ``1.0`` when the
    second phase is preferred at every ``n ≥ 1`` (``dlam ≤ 0``, or ``dlam/dL ≤ e``, where the
    difference never changes sign); ``inf`` when it never is (``dL ≤ 0``)."""
    if not dL > 0:
        return float("inf")
    n0 = dlam / dL  # the difference n dL − dlam log n is convex with its minimum here
    if dlam <= 0 or n0 <= math.e:
        return 1.0
    f = lambda x: x * dL - dlam * math.log(x)  # noqa: E731
    lo, hi = n0, 2 * n0
    while f(hi) <= 0:
        hi *= 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return float(math.sqrt(lo * hi))


@with_threads
def compute(params: Params, model: Any = None, progress: bool = False,
            upstream: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = params
    p.validate()
    if not upstream or "phase_change" not in upstream or "llc_phase_change" not in upstream:
        raise ValueError("llc_operating_point reads the phase_change and llc_phase_change entries (DEPENDS)")
    say: Callable[[str], None] = (lambda s: print(f"{NAME}: {s}", flush=True)) if progress else (lambda s: None)
    lp_entry = upstream["llc_phase_change"]
    lp = lpc.Params(**{k: tuple(v) if isinstance(v, list) else v for k, v in lp_entry.data["params"].items()})
    if lp != _LP:
        raise ValueError("llc_operating_point analyses llc_phase_change at its default parameters")
    torch.manual_seed(p.seed)
    np.random.seed(p.seed)
    rng = np.random.default_rng(p.seed)
    with timing.timed("calibration_seconds"):
        arrays, calib = calibrate(p, lp, say)

    q = lpc.pc_params(lp)
    data, _, _, _ = pc.eval_sets(q)
    tokens = lpc.llc_sample(lp, data)  # [n, n_ctx]: the sample that defines L_n
    per_seq = tokens.shape[1] - 1
    steps = lpc.checkpoint_steps(lp)
    states = lpc._stored(q, steps, upstream)
    if states is None:
        raise ValueError("the phase_change entry does not hold llc_phase_change's checkpoints")
    transition = lp_entry.data["transition_induction"]
    ref = lpc.reference_checkpoints(steps, transition)
    la = lp_entry.arrays
    base_chains = {int(s): la["llc_chains"][k] for k, s in enumerate(la["ckpt_step"])}
    nbeta = lp.n / math.log(lp.n)

    # ---- Hutchinson trace at every checkpoint, top eigenvalue at the reference checkpoints
    K = len(steps)
    hutch = np.empty((K, p.hutch_probes))
    top = {}
    seq_loss_at = {}
    noise_ratio = {}
    for k, step in enumerate(steps):
        t0 = time.perf_counter()
        net = tm.AttnOnlyTransformer(pc.model_config(q, 2))
        net.load_state_dict(states[step])
        params_ = list(net.parameters())
        bl = sequence_batch_loss(net, tokens)
        hutch[k] = slt.hutchinson_trace(bl, params_, lp.n, num_probes=p.hutch_probes, batch_size=p.hutch_batch,
                                        seed=p.seed + 60_000)
        if step in ref.values():
            fixed = torch.arange(p.power_batch)
            top[step] = slt.top_hessian_eigenvalue(lambda: bl(fixed), params_, iters=p.power_iters,
                                                   seed=p.seed + 61_000)
            grads = []
            for i in range(p.noise_samples):  # per-sequence gradients of the loss the chains sample
                gi = torch.autograd.grad(bl(torch.tensor([i])), params_)
                grads.append(torch.cat([x.reshape(-1) for x in gi]).double().numpy())
            noise_ratio[step] = minibatch_noise_ratio(np.stack(grads), lp.step_size, nbeta, lp.batch_size)
            with torch.no_grad():
                seq_loss_at[step] = torch.cat([
                    tm.next_token_loss(net(tokens[i:i + 256]), tokens[i:i + 256], reduction="none").sum(-1)
                    for i in range(0, lp.n, 256)]).double().numpy()  # [n] nats per sequence
        timing.record("curvature_seconds", time.perf_counter() - t0)
        say(f"step {step}: tr H = {hutch[k].mean():.0f} ± {hutch[k].std(ddof=1) / math.sqrt(p.hutch_probes):.0f}"
            + (f", top eigenvalue {top[step][-1]:.1f}" if step in top else ""))
    arrays["ckpt_step"] = np.asarray(steps, dtype=np.int32)
    arrays["hutch"] = hutch
    for name, step in ref.items():
        arrays[f"top_eig.{name}"] = top[step]

    # ---- gamma sweep at the reference checkpoints (llc_phase_change's gamma read from its entry)
    gammas = [float(g) for g in p.sweep_gammas]
    all_gammas = sorted(gammas + [float(lp.gamma)])
    sweep = np.empty((3, len(all_gammas), lp.num_chains))  # [before/at/after, gamma, chain]
    for r, name in enumerate(("before", "at", "after")):
        step = ref[name]
        t0 = time.perf_counter()
        net = tm.AttnOnlyTransformer(pc.model_config(q, 2))
        net.load_state_dict(states[step])
        w_star, loss = lpc.sequence_loss_fn(net, tokens)
        res = slt.sgld_llc_groups(loss, w_star[None].repeat(len(gammas), 1), lp.n, num_chains=lp.num_chains,
                                  num_steps=lp.num_steps, num_burnin=lp.num_burnin, step_size=lp.step_size,
                                  gamma=gammas, batch_size=lp.batch_size, seed=40_000 + lp.seed)
        by_gamma = {g: rr.llc_chains for g, rr in zip(gammas, res)}
        by_gamma[float(lp.gamma)] = base_chains[step]
        sweep[r] = np.stack([by_gamma[g] for g in all_gammas])
        timing.record("sweep_seconds", time.perf_counter() - t0)
        say(f"gamma sweep at step {step} ({name}): {np.round(sweep[r].mean(1), 1)} at γ = {all_gammas}")
    arrays["sweep.gammas"] = np.asarray(all_gammas)
    arrays["sweep.llc_chains"] = sweep

    # ---- summaries with intervals
    tr_mean = hutch.mean(1)
    tr_se = hutch.std(1, ddof=1) / math.sqrt(p.hutch_probes)
    kb, ka = steps.index(ref["before"]), steps.index(ref["after"])
    paired = rng.integers(0, p.hutch_probes, (p.n_boot, p.hutch_probes))  # the probes are shared: paired
    ratio_h = hutch[ka][paired].mean(1) / hutch[kb][paired].mean(1)
    L_seq = {name: seq_loss_at[step] for name, step in ref.items()}  # [n] per reference checkpoint
    dL_seq = L_seq["before"] - L_seq["after"]  # paired over the same sequences
    gamma_rows = {}
    for j, g in enumerate(all_gammas):
        b, a = sweep[0, j], sweep[2, j]
        ib = rng.integers(0, len(b), (p.n_boot, len(b)))
        ia = rng.integers(0, len(a), (p.n_boot, len(a)))
        bb, aa = b[ib].mean(1), a[ia].mean(1)
        dl_boot = dL_seq[rng.integers(0, lp.n, (p.n_boot, lp.n))].mean(1)
        nstar = np.array([crossing_n(x, y) for x, y in zip(dl_boot, aa - bb)])
        proxy_b = nbeta / (2 * g) * hutch[kb]
        proxy_a = nbeta / (2 * g) * hutch[ka]
        gamma_rows[f"{g:g}"] = {
            "gamma": g,
            "before": _ci(b.mean(), bb), "at": float(sweep[1, j].mean()), "after": _ci(a.mean(), aa),
            "rise": _ci(a.mean() - b.mean(), aa - bb),
            "ratio": _ci(a.mean() / b.mean(), aa / bb) if b.mean() > 0 else None,
            "proxy_before": _ci_se(proxy_b), "proxy_after": _ci_se(proxy_a),
            "proxy_rise": _ci_se(proxy_a - proxy_b) if len(proxy_a) == len(proxy_b) else None,
            "llc_over_proxy_before": float(b.mean() / proxy_b.mean()),
            "llc_over_proxy_after": float(a.mean() / proxy_a.mean()),
            "n_cross": _ci(crossing_n(float(dL_seq.mean()), float(a.mean() - b.mean())), nstar),
            "n_cross_boot_at_one": float((nstar == 1.0).mean()),
        }
    # log-log slope of the estimate against gamma at each reference checkpoint (-1: curvature proxy)
    lg = np.log(np.asarray(all_gammas))
    slopes = {}
    for r, name in enumerate(("before", "at", "after")):
        means = sweep[r].mean(1)
        boot = sweep[r][:, rng.integers(0, lp.num_chains, (p.n_boot, lp.num_chains))].mean(2)  # [gamma, boot]
        ok = (means > 0).all()
        if ok:
            point = float(np.polyfit(lg, np.log(means), 1)[0])
            with np.errstate(invalid="ignore"):
                bs = np.array([np.polyfit(lg, np.log(col), 1)[0] if (col > 0).all() else np.nan for col in boot.T])
            slopes[name] = _ci(point, bs[np.isfinite(bs)]) if np.isfinite(bs).mean() > 0.9 else None
        else:
            slopes[name] = None
    out: dict[str, Any] = {
        "calibration": calib,
        "reference": ref,
        "transition": transition,
        "nbeta": nbeta, "n": lp.n, "tokens_per_sample": per_seq, "n_params": sum(v.numel() for v in states[steps[0]].values()),
        "trace_h": {str(s): {"mean": float(m), "se": float(e)} for s, m, e in zip(steps, tr_mean, tr_se)},
        "trace_ratio_after_before": _ci(tr_mean[ka] / tr_mean[kb], ratio_h),
        "top_eigenvalue": {name: float(top[step][-1]) for name, step in ref.items()},
        "noise_ratio": {name: float(noise_ratio[step]) for name, step in ref.items()},
        "top_eigenvalue_settled": {name: float(abs(top[step][-1] / top[step][-2] - 1)) for name, step in ref.items()},
        "loss_per_seq": {name: float(v.mean()) for name, v in L_seq.items()},
        "loss_per_token": {name: float(v.mean() / per_seq) for name, v in L_seq.items()},
        "loss_drop_per_seq": _ci(float(dL_seq.mean()),
                                 dL_seq[rng.integers(0, lp.n, (p.n_boot, lp.n))].mean(1)),
        "gammas": gamma_rows,
        "gamma_slope": slopes,
        "params": json.loads(json.dumps(dataclasses.asdict(p))),
    }
    return arrays, out


def _finite(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _ci(point: float, boot: np.ndarray) -> list[float]:
    """``[point, low, high]``: a point value with the 95% percentile interval of its bootstrap replicates."""
    lo, hi = np.quantile(np.asarray(boot, dtype=float), [0.025, 0.975])
    return [float(point), float(lo), float(hi)]


def _ci_se(values: np.ndarray) -> list[float]:
    """Mean with a normal 95% interval from independent replicates (Hutchinson probes)."""
    m, se = float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
    return [m, m - 1.96 * se, m + 1.96 * se]
