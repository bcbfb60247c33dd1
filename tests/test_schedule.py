"""icl.schedule: experiments computed in worker processes, in dependency order, each exactly once."""

from __future__ import annotations

import json
import textwrap

import pytest

from icl import experiments, schedule
from icl.config import Config
from icl.errors import ConfigError

FAKE = '''
import hashlib, time
from dataclasses import dataclass
import numpy as np
import torch

NAME = "{name}"
VERSION = 1
CHAPTER = "none"
USES_MODEL = False
DESCRIPTION = "a fake experiment for the scheduler's tests"
{depends}

@dataclass(frozen=True)
class Params:
    seed: int = 0
    def validate(self):
        pass

def content_digest(params):
    return hashlib.sha256(NAME.encode()).hexdigest()

def compute(params, model, progress=False, upstream=None):
    time.sleep(0.3)
    seen = {{k: float(v.arrays["value"][0]) for k, v in (upstream or {{}}).items()}}
    data = {{"threads": torch.get_num_threads(), "upstream": seen, "finished": time.time()}}
    return {{"value": np.array([len(NAME) + sum(seen.values())])}}, data
'''


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_exps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    graph = {"fake_a": (), "fake_b": ("fake_a",), "fake_c": ("fake_a",), "fake_d": ("fake_b", "fake_c")}
    for name, deps in graph.items():
        depends = f"DEPENDS = {deps!r}" if deps else ""
        (pkg / f"{name}.py").write_text(textwrap.dedent(FAKE.format(name=name, depends=depends)))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = {name: f"fake_exps.{name}" for name in graph}
    monkeypatch.setattr(experiments, "REGISTRY", {**experiments.REGISTRY, **registry})
    return registry, Config(cache_dir=tmp_path / "cache")


def test_closure_puts_dependencies_first(fakes):
    assert schedule.closure(["fake_d"]) == ["fake_a", "fake_b", "fake_c", "fake_d"]


def test_runs_in_dependency_order_in_workers_with_one_thread(fakes):
    registry, config = fakes
    done = schedule.run_many(["fake_d"], config, jobs=2, registry=registry)
    assert sorted(d.name for d in done) == ["fake_a", "fake_b", "fake_c", "fake_d"]
    assert all(d.computed for d in done)
    entries = {n: experiments.run(n, config.with_(cache_mode="readonly"))[0] for n in registry}
    fin = {n: e.data["finished"] for n, e in entries.items()}
    assert fin["fake_a"] < min(fin["fake_b"], fin["fake_c"]) and max(fin["fake_b"], fin["fake_c"]) < fin["fake_d"]
    assert {e.data["threads"] for e in entries.values()} == {1}
    assert entries["fake_d"].data["upstream"] == {"fake_b": 6 + 6.0, "fake_c": 6 + 6.0}
    # everything is cached now: nothing is computed again
    again = schedule.run_many(["fake_d"], config, jobs=2, registry=registry)
    assert not any(d.computed for d in again)


def test_refresh_recomputes_only_what_was_named(fakes):
    registry, config = fakes
    schedule.run_many(["fake_b"], config, jobs=1, registry=registry)
    before = json.loads((experiments.run("fake_a", config)[0].path / "meta.json").read_text())
    done = schedule.run_many(["fake_b"], config.with_(cache_mode="refresh"), jobs=1, registry=registry)
    assert [d.name for d in done if d.computed] == ["fake_b"]
    after = json.loads((experiments.run("fake_a", config)[0].path / "meta.json").read_text())
    assert before == after


def test_a_cycle_is_a_config_error(fakes, monkeypatch):
    import fake_exps.fake_a as a

    monkeypatch.setattr(a, "DEPENDS", ("fake_d",), raising=False)
    with pytest.raises(ConfigError, match="cycle"):
        schedule.closure(["fake_d"])


def test_critical_path_puts_a_long_chain_first(fakes):
    rank = schedule.critical_path(["fake_a", "fake_b", "fake_c", "fake_d"],
                                  {"fake_a": 1.0, "fake_b": 5.0, "fake_c": 1.0, "fake_d": 2.0})
    assert rank == {"fake_d": 2.0, "fake_b": 7.0, "fake_c": 3.0, "fake_a": 8.0}
