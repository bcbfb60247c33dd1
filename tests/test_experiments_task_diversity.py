"""The task_diversity experiment: the discrete-prior Bayes predictor on planted pools, the batched
training against one model's own forward pass, and a small run."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import functional_call

from icl import experiments
from icl import regression as rg
from icl.config import Config
from icl.experiments import task_diversity as td


def test_dmmse_identifies_the_pool_task_and_starts_at_the_pool_mean():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(4, 3, generator=g) * 3
    X = torch.randn(50, 6, 3, generator=g)
    w = pool[1].expand(50, 3)
    y = torch.einsum("nkd,nd->nk", X, w) + 0.01 * torch.randn(50, 6, generator=g)
    pred = td.dmmse(pool, X, y, 0.1)
    truth = torch.einsum("nkd,nd->nk", X.double(), w.double())
    assert torch.allclose(pred[:, 0], torch.einsum("nd,d->n", X[:, 0].double(), pool.double().mean(0)), atol=1e-9)
    assert (pred[:, 3:] - truth[:, 3:]).abs().max() < 1e-6  # three examples single out the task


def test_ridge_all_is_ridge_at_every_k():
    t = rg.sample_tasks(20, 6, 3, 0.25, torch.Generator().manual_seed(1))
    r = td.ridge_all(t.X, t.y, 0.0625)
    for k in (1, 4):
        direct = rg.ridge(t.X[:, :k].double(), t.y[:, :k].double(), t.X[:, k:k + 1].double(), 0.0625)[:, 0]
        assert torch.allclose(r[:, k], direct)
    assert torch.all(r[:, 0] == 0)


@pytest.fixture(scope="module")
def small():
    p = dataclasses.replace(td.Params(), Ms=("2", "0"), seeds=2, steps=6, d_model=16, n_eval=60, n_boot=30)
    return p, td.compute(p), td.compute(p)


def test_small_run(small, timing_keys):
    p, (A, D), (A2, D2) = small
    assert D == D2 and timing_keys(D) == [] and all(np.array_equal(A[k], A2[k]) for k in A)
    assert [m["M"] for m in D["models"]] == [2, 2, None, None]
    assert A["new.error.mean"].shape == (4, p.max_k) and A["train_loss"].shape == (6, 4)
    for m in D["models"]:
        if m["M"] is None:  # infinitely many tasks: dMMSE is ridge, no preference
            assert m["new.preference"] == [0.0, 0.0, 0.0]
    # the two seeds of one M start from different weights and see different tasks
    assert not np.array_equal(A["new.error.mean"][0], A["new.error.mean"][1])


def test_batched_forward_is_each_models_own_forward():
    from torch.func import stack_module_state, vmap

    cfg = rg.RegressionConfig(d=3, max_k=4, d_model=16, n_layers=2, n_heads=2)
    models = [rg.RegressionTransformer(cfg) for _ in range(3)]
    params, buffers = stack_module_state(models)
    tokens = torch.randn(3, 5, 8, 4)
    out = vmap(lambda prm, buf, x: functional_call(models[0], (prm, buf), (x,)))(params, buffers, tokens)
    for i, m in enumerate(models):
        assert torch.allclose(out[i], m(tokens[i]), atol=1e-6)


def test_pools_differ_by_model_and_are_reproducible():
    p = td.Params()
    a, b = td.task_pool(p, 8, 0), td.task_pool(p, 8, 1)
    assert a.shape == (8, p.d) and not torch.equal(a, b) and torch.equal(a, td.task_pool(p, 8, 0))
    assert td.task_pool(p, td.INFINITE, 0).shape == (0, p.d)


def test_committed_result():
    entry, _ = experiments.run("task_diversity", Config(cache_mode="readonly"))
    D = entry.data
    assert len(D["models"]) == len(td.Params().Ms) * td.Params().seeds
    # on their own training tasks, models trained on two tasks beat ridge (they exploit the pool)
    few = [m for m in D["models"] if m["M"] == 2]
    assert all(m["train.error_avg"][0] < m["train.ridge_error_avg"][0] for m in few)
