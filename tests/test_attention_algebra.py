"""The attention algebra of chapter 8 (icl.attention_algebra): SymPy identities and the modified-keys
approximation."""

import numpy as np
import sympy as sp

from icl import attention_algebra as aa


def test_every_sympy_check_passes():
    checks = aa.sympy_checks()
    assert len(checks) >= 6 and all(c.ok for c in checks)


def test_is_identity_rejects_wrong_identities():
    a, b = sp.symbols("a b", real=True)
    assert aa.is_identity(sp.exp(a + b), sp.exp(a) * sp.exp(b))
    assert not aa.is_identity(sp.log(sp.exp(a) + sp.exp(b)), sp.Max(a, b))  # LSE is not max
    assert not aa.is_identity(sp.exp(a) / (sp.exp(a) + sp.exp(b)), sp.exp(a - b))


def test_lse_bounds_numerically():
    rng = np.random.default_rng(0)
    for n in (2, 5, 50):
        x = rng.normal(size=(100, n)) * 3
        lse = aa.lse(x)
        assert np.all(lse >= x.max(1) - 1e-12) and np.all(lse <= x.max(1) + np.log(n) + 1e-12)


def test_modified_keys_exact_with_equal_values_and_max_improves_with_sharper_scores():
    r = aa.modified_keys_error(np.array([0.5, 4.0, 16.0]), n_trials=100)
    assert np.all(r["exact_lse"] < 1e-12)  # equal values: folding frozen entities into keys is exact
    assert r["max"][0] > 0.1 and r["max"][2] < 1e-3 and np.all(np.diff(r["max"]) < 0)
    noisy = aa.modified_keys_error(np.array([16.0]), value_noise=0.5, n_trials=100)
    assert noisy["exact_lse"][0] > 0.05  # different values: the approximation fails however sharp
