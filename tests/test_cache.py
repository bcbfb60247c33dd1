import hashlib
import json
import os
import time
from pathlib import Path

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
    real_rename = os.rename

    def crash(src, dst):
        raise OSError(28, "disk full")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        _store(cache)
    monkeypatch.setattr(os, "rename", real_rename)
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


def test_edited_provenance_is_detected(tmp_path):
    """Provenance is covered by meta_sha256: an edited elapsed_s is not shown as if it were true."""
    cache = Cache(tmp_path)
    entry = cache.store(INPUTS, {"x": np.ones(2)}, {"answer": 42}, {"elapsed_s": 316.0, "device": "cpu"})
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["elapsed_s"] = 9999
    (entry.path / "meta.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(CacheCorruptError, match="meta.json does not match its checksum"):
        cache.load(INPUTS)


def test_older_format_is_refused_with_its_reason(tmp_path):
    cache = Cache(tmp_path)
    entry = _store(cache)
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["format"] = 1
    del meta["meta_sha256"]
    (entry.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="format 1, written by an older version of icl"):
        cache.load(INPUTS)
    # ... and reseal upgrades it, keeping key, data and provenance
    upgraded = cache.reseal(entry.path, lambda m: None, formats=(1, 2))
    assert upgraded.meta["format"] == 2 and upgraded.key == entry.key and upgraded.data == entry.data
    assert upgraded.meta["created"] == entry.meta["created"] and cache.load(INPUTS).key == entry.key


def test_reseal_moves_a_field_and_rewrites_the_checksums(tmp_path):
    cache = Cache(tmp_path)
    entry = cache.store(INPUTS, {"x": np.ones(2)}, {"answer": 42, "train_seconds": 3.5})

    def move(meta):
        meta["timing"] = {"train_seconds": meta["data"].pop("train_seconds")}

    moved = cache.reseal(entry.path, move)
    assert moved.data == {"answer": 42} and moved.timing == {"train_seconds": 3.5} and moved.key == entry.key
    with pytest.raises(ValueError, match="may not change"):
        cache.reseal(entry.path, lambda m: m["key_inputs"].update(seed=3))


def test_corrupt_advice_depends_on_whether_the_entry_is_committed(tmp_path, monkeypatch):
    """A committed entry is restored from git in an instant; an uncommitted one is deleted and
    recomputed. --force is not suggested (it would not repair a corrupt dependency)."""
    import shutil
    import subprocess

    from icl.cache import restore_advice

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    cache = Cache(repo / "cache")
    committed = _store(cache)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "cache")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "entry")
    rel = committed.path.relative_to(repo)
    monkeypatch.chdir(repo)
    assert restore_advice(committed.path) == f"It is committed: restore it with `git checkout -- {rel}`"
    monkeypatch.chdir(tmp_path)
    assert f"`git -C {repo} checkout -- {rel}`" in restore_advice(committed.path)
    (committed.path / "arrays.npz").write_bytes(b"x")
    with pytest.raises(CacheCorruptError, match="It is committed: restore it with `git -C"):
        cache.load(INPUTS)
    other = Cache(tmp_path / "untracked")
    entry = _store(other)
    (entry.path / "arrays.npz").write_bytes(b"x")
    with pytest.raises(CacheCorruptError) as err:
        other.load(INPUTS)
    assert f"rm -r {entry.path}" in str(err.value) and "--force" not in str(err.value)


def test_cache_folder_that_is_a_file_is_refused(tmp_path):
    from icl.errors import CacheDirError

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(CacheDirError, match="is a file, not a folder"):
        Cache(afile)
    with pytest.raises(CacheDirError, match="is a file, not a folder"):
        Cache(afile / "below").check_writable("surprisal")


def test_unwritable_cache_folder_is_refused_before_writing(unwritable_folder):
    from icl.errors import CacheDirError

    folder = unwritable_folder
    with pytest.raises(CacheDirError, match="is not writable"):
        Cache(folder / "cache").check_writable("surprisal")
    with pytest.raises(CacheDirError, match="is not writable"):
        _store(Cache(folder / "cache"))
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------------ kills, leftovers and races

_CHILD = """
import os, sys, numpy as np
from pathlib import Path
from icl import cache as c
INPUTS = {inputs!r}
cache = c.Cache(Path(sys.argv[1]))
mode = sys.argv[2]
if mode == "kill-between-renames":
    real = os.rename
    def rename(src, dst):
        if ".old-" in str(dst):
            real(src, dst)
            os._exit(137)  # like kill -9: no cleanup runs
        real(src, dst)
    os.rename = rename
elif mode == "kill-after-tmp":
    c.Cache._write = staticmethod(lambda folder, files: os._exit(137))
elif mode == "race":  # forced writes of one key, each followed by a load, while others do the same
    for i in range(int(sys.argv[3])):
        cache.store(INPUTS, {{"x": np.arange(3.0)}}, {{"answer": 42}}, {{"writer": os.getpid()}})
        assert cache.load(INPUTS).data == {{"answer": 42}}
    sys.exit(0)
cache.store(INPUTS, {{"x": np.arange(3.0)}}, {{"answer": 43}})
"""


def _child(tmp_path, *args):
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(inputs=INPUTS))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), *args],
                            stderr=subprocess.PIPE, text=True)


def test_kill_between_the_two_renames_loses_nothing(tmp_path):
    cache = Cache(tmp_path / "cache")
    good = _store(cache)
    proc = _child(tmp_path, "kill-between-renames")
    assert proc.wait(timeout=120) == 137
    assert not good.path.exists()  # the kill left the good entry only under its hidden name ...
    assert sorted(left.kind for left in cache.leftover_info()) == ["old", "tmp"]
    entry = cache.load(INPUTS)  # ... and the next look for it renames it back
    assert entry is not None and entry.data == good.data
    assert [left.kind for left in cache.leftover_info()] == ["tmp"]  # the new entry, never installed


def test_kill_after_the_temporary_folder_appears_is_cleaned_up(tmp_path, monkeypatch):
    from icl import cache as cache_module

    cache = Cache(tmp_path / "cache")
    proc = _child(tmp_path, "kill-after-tmp")
    assert proc.wait(timeout=120) == 137
    (left,) = cache.leftover_info()
    assert left.kind == "tmp" and not left.stale  # newer than this process: it could be a live write
    assert cache.load(INPUTS) is None
    monkeypatch.setattr(cache_module, "PROCESS_START", time.time() + 1)  # as seen by a later process
    (left,) = cache.leftover_info()
    assert left.stale and "process" in left.describe()
    _store(cache)  # any write in that experiment's folder removes stale leftovers
    assert cache.leftovers() == [] and cache.load(INPUTS).data["answer"] == 42


def test_leftovers_of_a_live_process_are_kept(tmp_path, monkeypatch):
    from icl import cache as cache_module

    cache = Cache(tmp_path)
    live = tmp_path / "demo" / f".{key_of(INPUTS)[:16]}.tmp-{os.getpid()}-abcd1234"
    live.mkdir(parents=True)
    monkeypatch.setattr(cache_module, "PROCESS_START", time.time() + 1)
    assert cache.clean() == [] and live.exists()


def test_concurrent_forced_writes_of_one_key_end_with_a_valid_entry(tmp_path):
    procs = [_child(tmp_path, "race", "40") for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    cache = Cache(tmp_path / "cache")
    entry = cache.load(INPUTS)
    assert entry is not None and entry.data == {"answer": 42}
    assert [p.name for p in cache.entries()] == [entry.path.name] and cache.leftovers() == []
