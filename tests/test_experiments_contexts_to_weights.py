"""The contexts_to_weights experiment at small settings, on a small regression model stored in a
temporary cache."""

import dataclasses

import numpy as np
import pytest

from icl import experiments, timing
from icl.cache import Cache
from icl.config import Config
from icl.experiments import contexts_to_weights as cw
from icl.experiments import icl_regression as ir


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    p = dataclasses.replace(ir.Params(), steps=20, d_model=16, n_layers=1, n_heads=2, n_eval=50, n_boot=20,
                            lsa_steps=10, warmup=5)
    arrays, data = ir.compute(p)
    inputs = experiments.key_inputs(ir, p, Config())
    return Cache(tmp_path_factory.mktemp("cache")).store(inputs, arrays, data)


def test_small_sweep(upstream, timing_keys):
    p = dataclasses.replace(cw.Params(), ks=("1", "3"), lrs=("0", "0.001", "10"), steps=4, record=("1", "4"),
                            n_contexts=3, n_query=5)
    with timing.collect() as times:
        arrays, data = cw.compute(p, upstream={"icl_regression": upstream})
        _, again = cw.compute(p, upstream={"icl_regression": upstream})
    assert data == again and timing_keys(data) == [] and set(times) == {"finetune_seconds"}
    assert arrays["gap"].shape == (2, 3, 2)
    # learning rate 0: the weights do not move, the gap is the gap with no update
    assert np.allclose(arrays["gap"][:, 0, :], arrays["gap_no_update"][:, None], rtol=1e-5)
    assert np.allclose(arrays["finetune_pred"][:, 0, 1], arrays["no_context_pred"][None], atol=1e-6)
    # a positive learning rate moves the prediction; a huge one diverges or at least moves it far
    assert not np.allclose(arrays["gap"][:, 1, :], arrays["gap_no_update"][:, None])
    assert set(data["best"]) == {"1", "3"}
    assert arrays["modified_keys.same_values.exact_lse"].max() < 1e-12


def test_depends_on_the_regression_entry():
    assert cw.DEPENDS == ("icl_regression",)
    p = cw.Params()
    assert cw.content_digest(p) != cw.content_digest(dataclasses.replace(p, seed=1))
