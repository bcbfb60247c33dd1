import hashlib
import json
import os

import numpy as np
import pytest

from icl import experiments
from icl.cache import Cache, key_of
from icl.config import Config
from icl.errors import CacheCorruptError, CacheMissError

INPUTS = {
    "experiment": "demo",
    "version": 1,
    "model": {"id": "m", "fingerprint": "f", "dtype": "float32"},
    "content_sha256": "abc",
    "params": {"n": 3, "tasks": ["a", "b"]},
    "seed": 0,
}


def test_key_is_stable_and_order_free():
    reordered = dict(reversed(list(INPUTS.items())))
    assert key_of(INPUTS) == key_of(reordered)
    # The canonical form is spelled out: sorted keys, no spaces. Changing it would orphan every
    # committed entry.
    assert key_of({"b": [1.5, "x"], "a": 1}) == hashlib.sha256(b'{"a":1,"b":[1.5,"x"]}').hexdigest()


@pytest.mark.parametrize("path,value", [
    (("experiment",), "other"), (("version",), 2), (("model", "id"), "m2"), (("model", "fingerprint"), "g"),
    (("model", "dtype"), "bfloat16"), (("content_sha256",), "abd"), (("params", "n"), 4), (("seed",), 1),
])
def test_key_changes_with_every_input(path, value):
    changed = json.loads(json.dumps(INPUTS))
    target = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    assert key_of(changed) != key_of(INPUTS)


def _store(cache):
    arrays = {"x": np.arange(6.0).reshape(2, 3), "flag": np.array([True, False])}
    return cache.store(INPUTS, arrays, {"answer": 42, "curve": [1.0, 2.5]}, {"device": "cpu"})


def test_round_trip(tmp_path):
    cache = Cache(tmp_path)
    stored = _store(cache)
    loaded = cache.load(INPUTS)
    assert loaded is not None and loaded.key == stored.key == key_of(INPUTS)
    assert loaded.data == {"answer": 42, "curve": [1.0, 2.5]}
    assert np.array_equal(loaded.arrays["x"], np.arange(6.0).reshape(2, 3))
    assert loaded.meta["device"] == "cpu" and "created" in loaded.meta and "git_commit" in loaded.meta
    assert cache.load({**INPUTS, "seed": 5}) is None
    assert list(cache.entries()) == [stored.path]


def test_overwrite_replaces_whole_entry(tmp_path):
    cache = Cache(tmp_path)
    _store(cache)
    cache.store(INPUTS, {"y": np.ones(2)}, {"answer": 43})
    entry = cache.load(INPUTS)
    assert entry.data == {"answer": 43} and set(entry.arrays) == {"y"}
    assert cache.leftovers() == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    real_replace = os.replace

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        _store(cache)
    monkeypatch.setattr(os, "replace", real_replace)
    assert cache.load(INPUTS) is None
    assert list(cache.entries()) == [] and cache.leftovers() == []


@pytest.mark.parametrize("damage", ["truncate_arrays", "edit_data", "edit_key_inputs", "drop_meta",
                                    "drop_arrays", "garbage_meta"])
def test_corruption_is_detected_and_never_used(tmp_path, damage):
    cache = Cache(tmp_path)
    entry = _store(cache)
    arrays, meta_path = entry.path / "arrays.npz", entry.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "truncate_arrays":
        arrays.write_bytes(arrays.read_bytes()[:-20])
    elif damage == "edit_data":
        meta["data"]["answer"] = 41
        meta_path.write_text(json.dumps(meta))
    elif damage == "edit_key_inputs":
        meta["key_inputs"]["seed"] = 9
        meta_path.write_text(json.dumps(meta))
    elif damage == "drop_meta":
        meta_path.unlink()
    elif damage == "drop_arrays":
        arrays.unlink()
    elif damage == "garbage_meta":
        meta_path.write_text("{not json")
    with pytest.raises(CacheCorruptError, match="corrupt"):
        cache.load(INPUTS)


def test_readonly_never_loads_a_model(tmp_path, monkeypatch, clean_env):
    from icl import models

    def forbidden(*a, **k):
        raise AssertionError("readonly mode loaded a model")

    monkeypatch.setattr(models, "load", forbidden)
    cfg = Config(cache_dir=tmp_path, cache_mode="readonly")
    with pytest.raises(CacheMissError, match="python -m icl run surprisal"):
        experiments.run("surprisal", cfg)


def test_modes_use_and_refresh(tmp_path, monkeypatch, tiny_llama):
    """'use' computes once then loads; 'refresh' recomputes."""
    from icl.experiments import surprisal

    calls = []
    real = surprisal.compute

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(surprisal, "compute", counting)
    cfg = Config(model=str(tiny_llama.spec.location), cache_dir=tmp_path, dtype="float32")
    params = experiments.make_params(surprisal, {"tasks": "identity,random", "n_prompts": "3", "k": "4"})
    first, _ = experiments.run("surprisal", cfg, params, loaded=tiny_llama)
    again, _ = experiments.run("surprisal", cfg, params, loaded=tiny_llama)
    assert len(calls) == 1 and again.key == first.key
    experiments.run("surprisal", cfg.with_(cache_mode="refresh"), params, loaded=tiny_llama)
    assert len(calls) == 2
