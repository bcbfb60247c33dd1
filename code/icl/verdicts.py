"""Verdicts of the task-vector chapter, derived from cached results by the tests the chapter declares.

The chapter and the claims ledger both state these verdicts; computing them here, once, keeps the two
from drifting apart. Everything is read from the cache entries of ``task_vectors``,
``function_vectors``, ``induction_heads`` (which heads are induction heads) and ``ablation`` (which
heads grew when layers were ablated); nothing is computed from a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icl.growth import shape_verdict

RECOVERED = 0.5  # a task vector carries a rule when its recovered fraction's lower bound reaches this
INDUCTION = 0.3  # prefix-matching score that makes a head an induction head (the induction-head chapter)
OWN_X = 0.3  # attention to the own line's x that makes a head the post's x-to-y head
P_OVERLAP = 0.05  # hypergeometric p below which an overlap of head sets is more than chance


def overlap(chosen: set, family: set, population: int) -> tuple[int, float, float]:
    """(overlap, expected overlap by chance, hypergeometric P(overlap >= observed))."""
    from scipy import stats

    k = len(chosen & family)
    expected = len(chosen) * len(family) / population
    p = float(stats.hypergeom.sf(k - 1, population, len(family), len(chosen))) if k else 1.0
    return k, expected, p


def grade(n_ok: int, n_all: int) -> str:
    """``holds`` when all rules but at most one pass, ``holds in part`` when some do, else ``not reproduced``."""
    return "holds" if n_ok >= n_all - 1 else ("holds in part" if n_ok else "not reproduced")


def task_vector_verdicts(tv: Any, fv: Any, ih: Any, ab: Any) -> dict[str, Any]:
    """Every quantity the chapter's declared tests read, and the verdicts they give."""
    D, F, A = tv.data, fv.data, tv.arrays
    L, H = D["n_layers"], D["n_heads"]
    M = L * H
    names = list(tv.key_inputs["params"]["tasks"])
    T, G, P = D["tasks"], D["growth"], D["probe"]
    TL = D["tv_layer"]
    out: dict[str, Any] = {"names": names, "M": M, "tv_layer": TL}

    # task vectors
    rec = {n: [float(A[f"{n}.recovered.{s}"][TL]) for s in ("mean", "lo", "hi")] for n in names}
    ctrl = {n: [float(A[f"{n}.ctrl_recovered.{s}"][TL]) for s in ("mean", "lo", "hi")] for n in names}
    tv_holds = {n: T[n]["recovered_at_best"][1] >= RECOVERED and
                T[n]["ctrl_recovered_at_best"][2] < T[n]["recovered_at_best"][1] for n in names}
    out.update(rec_tv=rec, ctrl_tv=ctrl, tv_holds=tv_holds, n_tv=sum(tv_holds.values()))
    cross = {n: T[n]["cross"] for n in names}
    out.update(cross=cross, n_cross_moved=sum(c["shift"][1] > 0 for c in cross.values()),
               n_cross_won=sum(c["wins_after"] > 0.5 for c in cross.values()))

    # function vectors and heads
    top = F["top_heads"][: F["n_top"]]
    top_set = {(r[0], r[1]) for r in top}
    fv_beats = {n: F["fv"][n]["gain_at_fv_layer"][1] > 0 and
                F["fv"][n]["gain_at_fv_layer"][0] > max(F["fv"][n]["random_gain_at_fv_layer"]) for n in names}
    prefix = ih.arrays["prefix_matching"]
    induction = {(int(a), int(b)) for a, b in zip(*np.nonzero(prefix >= INDUCTION))}
    backup = {(r[0], r[1]) for s in ab.data["procedure"][1:] for r in s["backup_heads"]}
    out.update(top=top, top_set=top_set, fv_beats=fv_beats, n_fv=sum(fv_beats.values()), induction=induction,
               backup=backup, ov_ind=overlap(top_set, induction, M), ov_bak=overlap(top_set, backup, M))

    # x-to-y heads
    own_x = np.mean([A[f"{n}.to_own_x"] for n in names], axis=0)
    order = np.argsort(-own_x, axis=None)[:5]
    top_x = [(int(i // H), int(i % H), float(own_x.flat[i])) for i in order]
    ov_x = overlap({(a, b) for a, b, _ in top_x}, induction, M)
    xy_attends, xy_induction = top_x[0][2] >= OWN_X, ov_x[2] < P_OVERLAP
    n_xy = int(xy_attends) + int(xy_induction)
    out.update(own_x=own_x, top_x=top_x, ov_x=ov_x, xy_attends=xy_attends, xy_induction=xy_induction,
               c10="holds" if n_xy == 2 else ("holds in part" if n_xy else "not reproduced"))

    # growth with k
    shape = {n: shape_verdict(G[n]["projection"]["delta_bic"][0]) for n in names}
    shape_lo = {n: shape_verdict(G[n]["log_odds"]["delta_bic"][0]) for n in names}
    rises = {n: G[n]["projection"]["linear"]["b"][1] > 0 for n in names}
    n_linear = sum(shape[n] == "linear" and rises[n] for n in names)
    n_sat = sum(shape[n] == "saturating" for n in names)
    out.update(shape=shape, shape_lo=shape_lo, rises=rises, n_linear=n_linear, n_sat=n_sat,
               ratio={n: G[n]["projection"]["increment_ratio"] for n in names})

    # unit-digit probes
    targets = ["y_mod_10", "y_mod_2", "y_mod_5"]
    present = {t: P[t]["n_layers_above"] > 0 for t in targets + ["x_mod_10"]}
    out.update(targets=targets, present=present, n_present=sum(present[t] for t in targets))

    # integer-ness
    abl = F["ablate"]
    n_random = len([c for c in F["conditions"] if c.startswith("random_named")])

    def mass(n: str, s: str, i: int) -> float:  # at the output (the lens's last layer), after lens_ks[i] examples
        return float(A[f"{n}.sweep.number_mass.{s}"][-1, i])

    learnt = {n: mass(n, "lo", -1) > mass(n, "hi", 0) for n in names}

    def beats(n: str, cond: str, fam: str) -> bool:
        d = abl[n][cond]["d_number_mass"]
        return d[2] < 0 and d[0] < min(abl[n][f"{fam}.{i}"]["d_number_mass"][0] for i in range(n_random))

    ablated = list(F["ablate_tasks"])
    named = {n: beats(n, "named_heads", "random_named") for n in ablated}
    fvh = {n: beats(n, "fv_heads", "random_fv") for n in ablated}
    out.update(n_random=n_random, mass_k={n: (mass(n, "mean", 0), mass(n, "mean", -1)) for n in names},
               learnt_int=learnt, n_int_learnt=sum(learnt.values()), named_beats=named,
               n_named=sum(named.values()), fvh_beats=fvh, n_fvh=sum(fvh.values()))

    k = len(names)
    out["c11"] = grade(min(out["n_tv"], out["n_fv"]), k)
    out["c12"] = grade(n_linear, k)
    out["c12_shape"] = ("linear" if n_linear >= k - 1 else "saturating" if n_sat >= k - 1 else "mixed")
    out["ablated"] = ablated
    out["c13"] = ("holds" if out["n_int_learnt"] >= k - 1 and out["n_named"] == len(ablated) else
                  "holds in part" if out["n_int_learnt"] or out["n_named"] else "not reproduced")
    out["digits"] = "present" if out["n_present"] == 3 else ("partly present" if out["n_present"] else "absent")
    return out
