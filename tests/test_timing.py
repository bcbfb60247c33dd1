"""Timings are provenance: recorded through icl.timing, stored in meta.json, never in an entry's data,
so the same seed gives the same data checksum."""

import dataclasses

from icl import experiments, timing
from icl.config import Config
from icl.experiments import bayes_toy


def test_record_collect_and_timed():
    timing.record("lost", 1.0)  # nobody collecting: dropped, no error
    with timing.collect() as outer:
        timing.record("a", 1.5)
        timing.record("a", 0.5)
        with timing.timed("b"):
            pass
        with timing.collect() as inner:
            timing.record("c", 2.0)
        timing.record("d", 3.0)
    assert outer["a"] == 2.0 and outer["b"] >= 0 and outer["d"] == 3.0 and "c" not in outer
    assert inner == {"c": 2.0}


def test_same_seed_same_data_checksum_with_timing_in_provenance(tmp_path, timing_keys):
    """Two forced runs of a timed experiment: identical data and data_sha256, timings in meta.json."""
    params = dataclasses.replace(bayes_toy.Params(), steps=40, eval_every=20, n_eval=16, k=4)
    config = Config(cache_dir=tmp_path, cache_mode="refresh")
    first, _ = experiments.run("bayes_toy", config, params)
    first_meta = dict(first.meta)
    second, _ = experiments.run("bayes_toy", config, params)
    assert first.key == second.key
    assert first_meta["data_sha256"] == second.meta["data_sha256"]
    assert first_meta["arrays_sha256"] == second.meta["arrays_sha256"]
    assert timing_keys(second.data) == []
    assert set(second.timing) == {"train_seconds"} and second.timing["train_seconds"] > 0
    assert second.meta["elapsed_s"] >= second.timing["train_seconds"] - 0.01
