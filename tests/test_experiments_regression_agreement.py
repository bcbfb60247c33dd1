"""The regression_agreement experiment at small settings, on a small regression model stored in a
temporary cache, and the committed result."""

import dataclasses

import numpy as np
import pytest
import torch

from icl import experiments
from icl import regression as rg
from icl.cache import Cache
from icl.config import Config
from icl.experiments import icl_regression as ir
from icl.experiments import regression_agreement as ra


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    p = dataclasses.replace(ir.Params(), steps=20, d_model=16, n_layers=1, n_heads=2, n_eval=50, n_boot=20,
                            lsa_steps=10, warmup=5)
    arrays, data = ir.compute(p)
    upstream = Cache(tmp_path_factory.mktemp("cache")).store(experiments.key_inputs(ir, p, Config()), arrays, data)
    q = dataclasses.replace(ra.Params(), n_eval=200, n_ls=20_000, n_boot=50, gd_steps=("1", "4", "32"))
    first = ra.compute(q, upstream={"icl_regression": upstream})
    second = ra.compute(q, upstream={"icl_regression": upstream})
    return q, upstream, first, second


def test_agreement_against_direct_computation(small):
    q, upstream, (A, D), (A2, D2) = small
    assert D == D2 and all(np.array_equal(A[k], A2[k], equal_nan=True) for k in A)  # deterministic
    net = ir.load_model(upstream)
    ev, _ = ra.eval_sets(q)
    with torch.no_grad():
        T = net.predict_all(ev.X.float(), ev.y.float()).double()
    k, d = 7, 5
    ridge = rg.ridge(ev.X[:, :k], ev.y[:, :k], ev.X[:, k:k + 1], 0.25)[:, 0]
    assert A["spd.ridge:0.25.mean"][k] == pytest.approx(float(((T[:, k] - ridge) ** 2).mean() / d), rel=1e-9)
    ls = rg.least_squares(ev.X[:, :k], ev.y[:, :k], ev.X[:, k:k + 1])[:, 0]
    assert A["spd.least_squares.mean"][k] == pytest.approx(float(((T[:, k] - ls) ** 2).mean() / d), rel=1e-9)
    # one GD step with the calibrated factor is gd_step with step size factor / lambda_max of each prompt
    lam_max = torch.linalg.eigvalsh(ev.X[:, :k].transpose(1, 2) @ ev.X[:, :k] / k)[:, -1]
    gd1 = rg.gd_step(ev.X[:, :k], ev.y[:, :k], ev.X[:, k:k + 1], (float(A["gd_lr"][0, k]) / lam_max)[:, None])[:, 0]
    assert A["spd.gd:1.mean"][k] == pytest.approx(float(((T[:, k] - gd1) ** 2).mean() / d), rel=1e-9)
    # the best reference is the argmin of the agreement curves
    names = D["refs"]
    for kk in ("3", "12"):
        spds = [A[f"spd.{n}.mean"][int(kk)] for n in names]
        assert D["best"][kk]["reference"] == names[int(np.argmin(spds))]


def test_pythagoras_for_the_bayes_predictor(small):
    _, _, (A, _), _ = small
    # error(T) = SPD(T, ridge_sigma2) + error(ridge_sigma2) + cross, and the cross term is ~0 on average
    lhs = A["transformer.error.mean"][1:]
    rhs = A["spd.bayes.mean"][1:] + A["bayes.error.mean"][1:] + A["pythagoras.cross.mean"][1:]
    assert np.allclose(lhs, rhs, rtol=1e-9)
    covered = (A["pythagoras.cross.lo"][1:] <= 0) & (0 <= A["pythagoras.cross.hi"][1:])
    assert covered.mean() >= 0.7  # 95% intervals: most contain 0


def test_least_squares_tail_matches_the_theory(small):
    q, _, (A, D), _ = small
    ls = D["least_squares_tail"]
    for k in ("5", "6", "7"):
        theory = ls[k]["alpha_theory"]
        assert abs(ls[k]["alpha"][0] - theory) < 0.35, k
    assert ls["5"]["alpha"][2] < 1 and ls["9"]["alpha"][1] > 1  # infinite mean at k = d, finite at d + 4
    m, lo, hi = ls["5"]["median"]
    assert lo <= m <= hi and m < 0.2 < ls["5"]["mean"]  # the mean is dragged up by the tail
    assert [ls[k]["mean_finite_theory"] for k in ("4", "5", "6", "7", "9")] == [False, False, False, True, True]
    assert [ls[k]["alpha_theory"] for k in ("4", "5", "6", "7", "9")] == [1.0, 0.5, 1.0, 1.5, 2.5]


def test_median_ci_on_known_values():
    v = np.arange(1, 10001, dtype=float)
    m, lo, hi = ra.median_ci(v)
    assert m == 5000.5 and 4900 < lo < 5000 < 5001 < hi < 5100


def test_committed_result():
    entry, _ = experiments.run("regression_agreement", Config(cache_mode="readonly"))
    A, D = entry.arrays, entry.data
    d = D["d"]
    # least squares at k = d: a tail index near 1/2 (infinite mean), so the median is what we report
    assert D["least_squares_tail"][str(d)]["alpha"][2] < 1
    # the transformer's disagreement with ridge is its excess error over ridge (Pythagoras): the cross
    # term's interval contains 0 at nearly every k
    covered = (A["pythagoras.cross.lo"][1:] <= 0) & (0 <= A["pythagoras.cross.hi"][1:])
    assert covered.sum() >= len(covered) - 2
    # the transformer is several times worse than ridge at large k
    assert A["transformer_over_bayes.lo"][-1] > 5
