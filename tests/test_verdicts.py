"""The task-vector chapter's verdicts, from the committed cache entries, follow their declared tests."""

import pytest

from icl import experiments
from icl.config import Config
from icl.verdicts import grade, overlap, task_vector_verdicts

NAMES = ("task_vectors", "function_vectors", "induction_heads", "ablation")


def test_grade_and_overlap():
    assert grade(4, 4) == grade(3, 4) == "holds"
    assert grade(1, 4) == "holds in part" and grade(0, 4) == "not reproduced"
    k, expected, p = overlap({(0, 0), (0, 1)}, {(0, 0), (1, 1)}, 100)
    assert k == 1 and expected == pytest.approx(0.04) and 0 < p < 0.1
    assert overlap({(0, 0)}, {(1, 1)}, 100)[2] == 1.0


def test_verdicts_from_the_committed_cache():
    cfg = Config(model="smollm2-135m", cache_mode="readonly")
    try:
        entries = [experiments.run(name, cfg)[0] for name in NAMES]
    except Exception as exc:  # pragma: no cover - a cache without these entries
        pytest.skip(f"cache entries not available: {exc}")
    v = task_vector_verdicts(*entries)
    n = len(v["names"])
    for key in ("c11", "c12", "c13"):
        assert v[key] in ("holds", "holds in part", "not reproduced")
    assert 0 <= v["n_tv"] <= n and 0 <= v["n_fv"] <= n
    assert v["c11"] == grade(min(v["n_tv"], v["n_fv"]), n)
    # the task-vector verdict follows the recovered fractions stored in the entry
    tv = entries[0].data["tasks"]
    assert v["n_tv"] == sum(tv[t]["recovered_at_best"][1] >= 0.5 and
                            tv[t]["ctrl_recovered_at_best"][2] < tv[t]["recovered_at_best"][1] for t in v["names"])
    assert v["n_linear"] + v["n_sat"] <= n
