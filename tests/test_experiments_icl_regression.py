"""The icl_regression experiment at small settings: curves for every estimator, the LSA identities."""

import dataclasses

import numpy as np
import pytest

from icl import timing
from icl.stats import bootstrap_mean_ci
from icl.experiments import icl_regression as ir


def small_params():
    return dataclasses.replace(ir.Params(), steps=30, d_model=16, n_layers=1, n_heads=2, n_eval=300,
                               n_boot=50, lsa_steps=200, warmup=10)


@pytest.fixture(scope="module")
def small():
    p = small_params()
    return p, ir.compute(p)


def test_curves_for_every_estimator(small):
    p, (arrays, data) = small
    for name in ("transformer", "ridge", "least_squares", "gd_step", "zero"):
        mean, lo, hi = (arrays[f"{name}.{s}"] for s in ("mean", "lo", "hi"))
        assert mean.shape == (p.max_k,) and np.all(lo <= mean + 1e-12) and np.all(mean <= hi + 1e-12)
    # with no example every estimator predicts 0
    for name in ("ridge", "least_squares", "gd_step"):
        assert arrays[f"{name}.mean"][0] == pytest.approx(arrays["zero.mean"][0])
    # ridge is Bayes-optimal: on 300 prompts it beats least squares around k = d and one GD step later on
    r, ls, gd = arrays["ridge.mean"], arrays["least_squares.mean"], arrays["gd_step.mean"]
    assert r[p.d] < ls[p.d] and r[-1] < gd[-1] and r[-1] < 0.05
    assert data["errors"]["ridge"][str(p.max_k - 1)][0] == pytest.approx(r[-1])


def test_no_timing_in_the_results(small, timing_keys):
    p, (arrays, data) = small
    assert timing_keys(data) == []
    with timing.collect() as times:
        ir.lsa_checks(dataclasses.replace(p, lsa_steps=5))
    assert set(times) == {"lsa_train_seconds"}


def test_lsa_identities_and_trained_layer(small):
    p, (arrays, data) = small
    lsa = data["lsa"]
    assert lsa["identity"]["float64"]["max_abs_error"] < 1e-12
    assert lsa["identity"]["float32"]["max_abs_error"] < 1e-4
    assert lsa["context_as_weights"]["sum_max_abs_error"] < 1e-12
    assert lsa["context_as_weights"]["gd_on_M_max_abs_error"] < 1e-12
    assert arrays["lsa.P"].shape == (p.d + 1, p.d + 1)
    # even 200 steps move the trained layer's step size toward the best GD step size
    assert 0 < lsa["trained"]["effective_lr"] < 2 * lsa["trained"]["best_gd_lr"]


def test_model_round_trip_from_arrays(small):
    import torch

    p, (arrays, data) = small

    class FakeEntry:
        pass

    entry = FakeEntry()
    entry.arrays, entry.data = arrays, data
    model = ir.load_model(entry)
    X = torch.randn(2, 4, p.d)
    y = torch.randn(2, 4)
    assert model.predict_all(X, y).shape == (2, 4)
    # the model rebuilt from the stored arrays is the trained one: on the evaluation set it gives exactly
    # the stored error curve
    ev, _ = ir.eval_tasks(p)
    threads = torch.get_num_threads()
    torch.set_num_threads(ir.THREADS)  # as compute ran it
    try:
        with torch.no_grad():
            pred = model.predict_all(ev.X, ev.y).double().numpy()
    finally:
        torch.set_num_threads(threads)
    truth = torch.einsum("nkd,nd->nk", ev.X.double(), ev.w.double()).numpy()
    mean, _, _ = bootstrap_mean_ci((pred - truth) ** 2 / p.d, n_boot=p.n_boot, seed=p.seed)
    assert np.array_equal(mean, arrays["transformer.mean"])
    assert not np.array_equal(mean, arrays["zero.mean"])
