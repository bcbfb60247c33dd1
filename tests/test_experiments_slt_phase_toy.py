"""The slt_phase_toy experiment: exact free energies of a two-phase model recover the planted learning
coefficients and constants, the crossing sits where the free energies cross, and the composite of two
independent submodels switches at the submodels' own crossings."""

import math

import numpy as np
import pytest

from icl import experiments, slt
from icl.experiments import slt_phase_toy as toy


@pytest.fixture(scope="module")
def small():
    params = experiments.make_params(toy, {"log10_n_max": "5.5", "n_points": "34"})
    return params, toy.compute(params, None)


@pytest.mark.slow  # the fixture's quadrature takes about a minute on a busy core
def test_the_phases_have_the_planted_losses_and_coefficients(small):
    params, (arrays, data) = small
    ns = arrays["n"]
    for j, d in enumerate(params.deltas):
        s = data["submodels"][f"sub{j + 1}"]
        assert s["lambda_A_end"] == pytest.approx(0.5, abs=2e-3)
        assert s["lambda_B_end"] == pytest.approx(1.0, abs=2e-3)
        # Laplace with its constants is the large-n limit of the exact free energies
        FA, FB = arrays[f"sub{j + 1}.F_A"][-1], arrays[f"sub{j + 1}.F_B"][-1]
        assert FA - ns[-1] * float(d) - 0.5 * math.log(ns[-1]) == pytest.approx(s["c_A"], abs=2e-2)
        assert FB - math.log(ns[-1]) == pytest.approx(s["c_B"], abs=2e-2)
        # the energy E_n[K] is dF/dn: compare with a finite difference of the exact free energy
        dF = np.gradient(arrays[f"sub{j + 1}.F"], ns)
        mid = slice(5, -5)
        assert np.allclose(dF[mid], arrays[f"sub{j + 1}.energy"][mid], rtol=0.1, atol=1e-5)


@pytest.mark.slow  # the fixture's quadrature takes about a minute on a busy core
def test_crossing_is_where_the_exact_free_energies_cross(small):
    params, (arrays, data) = small
    for j, d in enumerate(params.deltas):
        s = data["submodels"][f"sub{j + 1}"]
        K = toy.submodel_K(float(d), params.a0, params.k)
        nodes = toy.phase_nodes(params.a0, params.k)
        for factor, sign in ((0.9, -1), (1.1, 1)):  # A preferred just below n*, B just above
            n = s["n_cross_exact"] * factor
            fa = slt.region_free_energy(K, *nodes["A"], [n])[0][0]
            fb = slt.region_free_energy(K, *nodes["B"], [n])[0][0]
            assert np.sign(fa - fb) == sign
        # the two-term formula ignores the O(1) constants and places the crossing later here
        assert s["n_cross_two_term"] > s["n_cross_laplace"] > s["n_cross_exact"] * 0.9
        assert s["n_cross_laplace"] == pytest.approx(s["n_cross_exact"], rel=0.05)


@pytest.mark.slow  # the fixture's quadrature takes about a minute on a busy core
def test_composite_switches_at_the_submodels_crossings(small):
    params, (arrays, data) = small
    total = sum(arrays[f"joint.{k}"] for k in ("AA", "AB", "BA", "BB"))
    assert np.allclose(total, 1.0)
    changes = [c for c in data["joint_changes"] if c["n"] > 50]
    assert [(c["from"], c["to"]) for c in changes] == [("AA", "BA"), ("BA", "BB")]
    n1, n2 = (data["submodels"][s]["n_cross_exact"] for s in ("sub1", "sub2"))
    ns = arrays["n"]
    step = ns[1] / ns[0]
    for c, n_sub in zip(changes, (n1, n2)):  # within one grid step of the submodel's own crossing
        assert n_sub / step ** 1.5 < c["n"] < n_sub * step ** 1.5


def test_barrier_separates_the_minima():
    K = toy.submodel_K(0.01, 0.6, 5.0)
    ab = toy.barrier(0.6, 5.0)
    a = np.linspace(0, 1, 2001)
    k = K(a, np.zeros_like(a))
    assert k[0] == pytest.approx(0.01) and K(np.array(0.6), np.array(0.0)) == pytest.approx(0.0)
    inner = a[(a > 0.05) & (a < 0.55)]
    assert abs(inner[np.argmax(K(inner, np.zeros_like(inner)))] - ab) < 1e-3
