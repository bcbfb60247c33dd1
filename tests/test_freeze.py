"""icl.freeze: what a chapter read is recorded during a Quarto render, and a frozen chapter is thawed
exactly when one of those cache entries changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl import experiments, freeze
from icl.cache import key_of
from icl.config import REPO_ROOT, Config

NAME = "slt_free_energy"  # a model-free experiment whose entry is committed


@pytest.fixture
def project(tmp_path, clean_env):
    root = tmp_path / "proj"
    (root / "report").mkdir(parents=True)
    doc = root / "report" / "ch.qmd"
    doc.write_text('# ch\n\n```{python}\nres = book.load("x")\n```\n')
    clean_env.setenv("ICL_CACHE_DIR", str(REPO_ROOT / "cache"))
    clean_env.setenv("QUARTO_PROJECT_ROOT", str(root))
    clean_env.setenv("QUARTO_DOCUMENT_PATH", str(root / "report"))
    clean_env.setenv("QUARTO_DOCUMENT_FILE", "ch.qmd")
    (root / "_freeze" / "report" / "ch" / "execute-results").mkdir(parents=True)
    return root, doc, clean_env


def committed_entry():
    module = experiments.get(NAME)
    key = key_of(experiments.key_inputs(module, experiments.make_params(module), Config.from_env()))
    path = REPO_ROOT / "cache" / NAME / key[:16] / "meta.json"
    assert path.is_file()
    return key, path


def test_record_then_unchanged_is_not_stale(project):
    root, doc, _ = project
    freeze.start()
    key, meta = committed_entry()
    freeze.record(NAME, {}, key, meta)
    freeze.record(NAME, {}, key, meta)  # read twice, recorded once
    record = freeze.record_path(root, doc)
    assert len(json.loads(record.read_text())) == 1
    assert freeze.why_stale(root, doc) is None
    assert freeze.thaw(root, [doc]) == []


@pytest.mark.parametrize("field, value, expected", [
    ("meta_sha256", "0" * 64, "cache entry changed"),
    ("key", "f" * 64, "another cache key"),
    ("params", {"no_such_param": "1"}, "has no parameter"),
])
def test_a_changed_entry_thaws_the_chapter(project, field, value, expected):
    root, doc, _ = project
    key, meta = committed_entry()
    freeze.record(NAME, {}, key, meta)
    record = freeze.record_path(root, doc)
    items = json.loads(record.read_text())
    items[0][field] = value
    record.write_text(json.dumps(items))
    [(thawed, why)] = freeze.thaw(root, [doc])
    assert thawed == doc and expected in why
    assert not (root / "_freeze" / "report" / "ch" / "execute-results").exists()
    assert freeze.thaw(root, [doc]) == []  # nothing frozen any more: Quarto executes it anyway


def test_another_cache_folder_or_no_record_thaws(project, tmp_path):
    root, doc, env = project
    assert "no record" in freeze.why_stale(root, doc)
    key, meta = committed_entry()
    freeze.record(NAME, {}, key, meta)
    env.setenv("ICL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert "gone" in freeze.why_stale(root, doc)


def test_executed_page_that_reads_no_entry_needs_no_record(project):
    """A frozen page whose code reads no cache entry (it only imports the helpers) has nothing to go
    stale against, so it stays frozen without a record."""
    root, doc, _ = project
    doc.write_text("# ch\n\n```{python}\nfrom icl.book import setup\nbook = setup()\n```\n")
    assert freeze.why_stale(root, doc) is None


def test_start_forgets_and_nothing_is_recorded_outside_quarto(project):
    root, doc, env = project
    key, meta = committed_entry()
    freeze.record(NAME, {}, key, meta)
    freeze.start()
    assert not (freeze.record_path(root, doc)).exists()
    env.delenv("QUARTO_DOCUMENT_FILE")
    freeze.record(NAME, {}, key, meta)
    assert not (freeze.record_path(root, doc)).exists()
