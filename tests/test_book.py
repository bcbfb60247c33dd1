"""The book: its sources' structure, a cold render by the real Quarto checked as a reader would see it,
the freezer's invalidation, and the committed cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import pytest

from icl import experiments, freeze, quarto
from icl.cache import Cache, key_of
from icl.config import REPO_ROOT, Config

CHAPTERS = quarto.book_files(REPO_ROOT)


def test_chapter_sources_have_no_problems():
    assert quarto.check_sources(REPO_ROOT) == []


def test_book_lists_parts_and_the_reproduce_appendix():
    listed = [p.relative_to(REPO_ROOT).as_posix() for p in CHAPTERS]
    assert listed[0] == "index.qmd"
    assert "report/appendix-reproduce.qmd" in listed
    assert "part:" in (REPO_ROOT / "_quarto.yml").read_text()


def test_committed_cache_matches_current_code():
    """Every experiment's entry for the default model and default parameters is committed and
    verifies; a change to an experiment, its prompts or its parameters without recomputing fails here."""
    config = Config(cache_mode="readonly", cache_dir=REPO_ROOT / "cache")
    for name in experiments.names():
        entry, loaded = experiments.run(name, config)
        assert loaded is None
        assert entry.meta["versions"]["torch"].startswith("2.13.0")


def test_no_stale_or_corrupt_entries_are_committed():
    cache = Cache(REPO_ROOT / "cache")
    config = Config(cache_mode="readonly", cache_dir=REPO_ROOT / "cache")
    current = set()
    for name in experiments.names():
        module = experiments.get(name)
        current.add(key_of(experiments.key_inputs(module, experiments.make_params(module), config)))
    for path in cache.entries():
        entry = cache.read(path)  # raises if corrupt
        status = experiments.entry_status(entry, config)  # entries for other models are the book's too
        assert entry.key in current or status.state == "other-model", experiments.misplaced_advice(entry, status)
    assert cache.leftovers() == []
    size = sum(p.stat().st_size for p in (REPO_ROOT / "cache").rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"committed cache is {size / 2**20:.1f} MiB"


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^make test$", ci, re.M)


SKIP_NO_QUARTO = pytest.mark.skipif(quarto.quarto_executable() is None,
                                    reason="quarto is not on PATH (install it from quarto.org; CI builds one)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, request):
    """The book rendered cold by the real ``quarto render`` in a copy of the project (nothing frozen)."""
    root = tmp_path_factory.mktemp("book")
    # benchmarks/results: Appendix B reads the memory benchmark's table from there
    for name in ["_quarto.yml", "index.qmd", "references.bib", "report", "code", "cache", "benchmarks/results"]:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                            dirs_exist_ok=True)
        else:
            shutil.copy2(src, root / name)
    env = {"ICL_CACHE": "readonly", "ICL_MODEL": "smollm2-135m", "ICL_CACHE_DIR": str(root / "cache")}
    env.update({var: None for var in ("ICL_DEVICE", "ICL_DTYPE") if var in os.environ})
    start = time.time()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # Quarto's output is shown as it comes, never swallowed
        log = quarto.render(root, env=env)
    return root, log, env, time.time() - start


@pytest.mark.quarto
@pytest.mark.slow
@SKIP_NO_QUARTO
def test_quarto_renders_every_page_without_a_defect(rendered):
    root, log, _, seconds = rendered
    sys.stderr.write(f"cold render of the book: {seconds:.0f} s\n")
    problems = quarto.log_problems(log) + quarto.check_html(root / "_book")
    assert problems == [], "\n".join(problems)
    for chapter in quarto.book_files(root):
        page = root / "_book" / chapter.relative_to(root).with_suffix(".html")
        assert page.is_file(), f"{chapter.name} was not rendered"
    html = "".join(p.read_text() for p in (root / "_book").rglob("*.html"))
    figures = re.findall(r"^#\|\s*label:\s*(fig-[\w-]+)", "".join(
        c.read_text() for c in quarto.book_files(root)), re.M)
    assert len(figures) > 30
    for label in figures:
        assert f'id="{label}"' in html, f"{label} is not in the rendered book"


@pytest.mark.quarto
@pytest.mark.slow
@SKIP_NO_QUARTO
def test_freezer_rerun_is_limited_to_chapters_whose_entries_changed(rendered, monkeypatch):
    """After a render every chapter that reads the cache has a record; the pre-render step keeps them
    all frozen, and thaws exactly the chapter whose record no longer matches its cache entry."""
    root, _, env, _ = rendered
    for var, value in env.items():
        if value is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, value)
    chapters = quarto.book_files(root)
    records = {c: freeze.record_path(root, c) for c in chapters}
    reading = [c for c in chapters if "book.load(" in c.read_text()]
    assert reading and all(records[c].is_file() for c in reading)
    assert freeze.thaw(root, chapters) == []
    patching = root / "report" / "04-patching.qmd"
    entries = json.loads(records[patching].read_text())
    entries[0]["meta_sha256"] = "0" * 64
    records[patching].write_text(json.dumps(entries))
    thawed = freeze.thaw(root, chapters)
    assert [(doc.name, "entry changed" in why) for doc, why in thawed] == [("04-patching.qmd", True)]
    assert not (root / "_freeze" / "report" / "04-patching" / "execute-results").exists()
