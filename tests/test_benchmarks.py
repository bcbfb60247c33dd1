"""The benchmark scripts stay runnable: they cover every experiment that uses a model, and the GPU
benchmark's own logic (checkpoint, load, per-experiment rows, the induction_ablation threshold) runs on
a tiny checkpoint on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icl import experiments

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL_EXPERIMENTS = {n for n in experiments.names() if experiments.get(n).USES_MODEL}


def test_the_memory_projection_names_every_model_experiment():
    import llama3_memory

    assert set(llama3_memory.SMALL) | set(llama3_memory.NOT_PROJECTED) == MODEL_EXPERIMENTS
    assert not set(llama3_memory.SMALL) & set(llama3_memory.NOT_PROJECTED)


def test_the_gpu_benchmark_runs_every_model_experiment_upstream_first():
    import llama3_gpu

    assert set(llama3_gpu.ORDER) == MODEL_EXPERIMENTS
    for i, name in enumerate(llama3_gpu.ORDER):
        assert all(dep in llama3_gpu.ORDER[:i] for dep in getattr(experiments.get(name), "DEPENDS", ()))


def test_the_gpu_benchmark_refuses_without_a_gpu_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llama3_gpu.py"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_the_gpu_benchmark_logic_on_a_tiny_checkpoint(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llama3_gpu.py"), "--tiny", "--device", "cpu",
                        "--only", "logit_lens,induction_heads,induction_ablation", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {row["experiment"]: row for row in res["rows"]}
    assert list(rows) == ["logit_lens", "induction_heads", "induction_ablation"]
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert res["layers"] == 2 and res["tiny"] and float(rows["induction_ablation"]["set"]["threshold"]) > 0


def test_the_cold_compute_projection_follows_dependencies_and_workers():
    """A chapter's cold time is its experiments and their dependencies scheduled on the workers: a chain
    adds up, independent experiments overlap."""
    import cold_compute

    secs = {n: 1.0 for n in experiments.names()} | {"patching": 10.0, "ablation": 5.0, "logit_lens": 4.0}
    assert experiments.get("ablation").DEPENDS == ("patching",)
    assert cold_compute.project(["ablation"], secs, 2) == 15.0  # waits for patching
    assert cold_compute.project(["patching", "logit_lens"], secs, 2) == 10.0  # side by side
    assert cold_compute.project(["patching", "logit_lens"], secs, 1) == 14.0


def test_the_statistics_check_finds_interval_triples_in_an_entry():
    import cold_compute

    data = {"a": [1.0, 0.5, 1.5], "b": {"c": 2.0, "c_ci": [1.0, 3.0]}, "flags": [True, False, True],
            "not_ci": [3.0, 1.0, 2.0], "list": [[0.1, 0.0, 0.2], [5, 6]]}
    assert cold_compute._triples_in(data) == {"/a": (1.0, 0.5, 1.5), "/b/c": (2.0, 1.0, 3.0),
                                              "/list/0": (0.1, 0.0, 0.2)}


def test_the_cold_compute_record_appendix_b_reads_covers_every_experiment():
    """benchmarks/results/cold_compute.json, whose table Appendix B shows, is a run of every experiment
    with two workers that reproduced every committed entry, with a projected time for every chapter."""
    from icl import quarto

    rec = json.loads((REPO / "benchmarks" / "results" / "cold_compute.json").read_text())
    assert set(rec["experiments"]) == set(experiments.names()) and rec["jobs"] == 2
    assert all(v["result"] == "identical" and v["seconds"] > 0 for v in rec["experiments"].values())
    pages = {p.relative_to(REPO).as_posix() for p in quarto.book_files(REPO)}
    assert set(rec["chapters"]) <= pages and "report/04-patching.qmd" in rec["chapters"]
    assert rec["total_s"] >= max(v["seconds"] for v in rec["experiments"].values())
