"""The llc_operating_point experiment: the crossing formula, the minibatch-noise ratio and the scaled exact
targets against known values; the reference checkpoints; and the committed entry against the entries it
reads (the γ of llc_phase_change is read, not recomputed)."""

import math

import numpy as np
import pytest
import torch

from icl.config import REPO_ROOT, Config
from icl.experiments import llc_operating_point as lop
from icl.experiments import llc_phase_change as lpc
from icl.experiments import slt_llc

COMMITTED = Config(cache_mode="readonly", cache_dir=REPO_ROOT / "cache")


def test_crossing_n_solves_the_free_energy_balance():
    for dL, dlam in ((28.0, 180.0), (0.002, 0.5), (1.0, 10.0)):
        n = lop.crossing_n(dL, dlam)
        assert n > dlam / dL
        assert n * dL == pytest.approx(dlam * math.log(n), rel=1e-9)
    assert lop.crossing_n(1.0, -3.0) == 1.0      # a phase with less loss and smaller λ wins at every n
    assert lop.crossing_n(10.0, 1.0) == 1.0      # dλ/dL < e: the difference never changes sign
    assert lop.crossing_n(-1.0, 3.0) == math.inf  # more loss and larger λ: never preferred


def test_minibatch_noise_ratio_of_planted_gradients():
    rng = np.random.default_rng(0)
    g = rng.normal(0, 2.0, size=(20_000, 5))  # Cov = 4 I: tr = 20
    r = lop.minibatch_noise_ratio(g, step_size=1e-3, nbeta=100.0, batch=10)
    assert r == pytest.approx((1e-3 / 2) ** 2 * 1e4 * 20 / 10 / (1e-3 * 5), rel=0.03)
    # the calibration models' per-sample gradients: linear regression at its fit has Cov ≈ E[x xᵀ] σ²
    _, w_star, loss = slt_llc.build("linear-10", 1024, 0)
    g = lop.per_sample_gradients(loss, w_star, torch.arange(1024))
    assert g.mean(0) == pytest.approx(np.zeros(10), abs=1e-9)  # the least-squares fit: gradients sum to 0
    assert g.var(0).sum() == pytest.approx(10.0, rel=0.2)


def test_scaled_target_is_the_calibration_target_at_scale_one_and_tends_to_lambda():
    beta = 1 / math.log(1024)
    for spec in ("linear-10", "mono-1-1"):
        data, w_star, _ = slt_llc.build(spec, 1024, 0)
        assert lop.scaled_exact_target(spec, data, w_star, 1.0, beta, 1000.0) == pytest.approx(
            slt_llc.exact_target(spec, data, w_star, beta, 1000.0), rel=1e-9)
    data, w_star, _ = slt_llc.build("linear-10", 1024, 0)
    stiff = lop.scaled_exact_target("linear-10", data, w_star, 1e5, beta, 1000.0)
    assert stiff == pytest.approx(5.0, rel=0.01)  # nβ s h ≫ γ: the Gaussian target counts d/2
    soft = lop.scaled_exact_target("linear-10", data, w_star, 1e-3, beta, 1000.0)
    proxy = 1024 * beta / 2000 * 1e-3 * float(torch.trace(data.x.T @ data.x / 1024))
    assert soft == pytest.approx(proxy, rel=0.01)  # nβ s h ≪ γ: the curvature proxy


def test_reference_checkpoints_follow_the_one_definition():
    steps = [100, 500, 5000, 5600, 5800, 6000, 6100, 6200, 8000]
    ref = lpc.reference_checkpoints(steps, {"onset": 5800, "step": 6150, "done": 6600})
    assert ref == {"before": 5600, "at": 6100, "after": 8000}
    with pytest.raises(ValueError):
        lpc.reference_checkpoints([6000, 7000], {"onset": 5800, "step": 6100})


def test_committed_entry_reads_llc_phase_change_and_is_consistent():
    from icl import experiments
    entry, _ = experiments.run("llc_operating_point", COMMITTED)  # committed: missing is a failure
    lp, _ = experiments.run("llc_phase_change", COMMITTED)
    d, a = entry.data, entry.arrays
    ref = d["reference"]
    assert ref == lpc.reference_checkpoints(lp.arrays["ckpt_step"], lp.data["transition_induction"])
    k = list(a["sweep.gammas"]).index(lpc.Params().gamma)
    steps = list(lp.arrays["ckpt_step"])
    for r, name in enumerate(("before", "at", "after")):
        assert np.array_equal(a["sweep.llc_chains"][r, k], lp.arrays["llc_chains"][steps.index(ref[name])])
    assert a["hutch"].shape == (len(steps), d["params"]["hutch_probes"])
    assert np.all(a["hutch"].mean(1) > 0)
    for g, row in d["gammas"].items():
        n, lo, hi = row["n_cross"]
        assert lo <= n <= hi
