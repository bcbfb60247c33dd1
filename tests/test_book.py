"""The book without Quarto: structure, every chapter executed through a Jupyter kernel from the
committed cache (as Quarto's Jupyter engine would), and the committed cache itself."""

from __future__ import annotations

import re

import nbformat
import pytest

from icl import experiments, quarto
from icl.cache import Cache, key_of
from icl.config import REPO_ROOT, Config

CHAPTERS = quarto.book_files(REPO_ROOT)


def test_structure_has_no_problems():
    assert quarto.check_structure(REPO_ROOT) == []


def test_book_lists_parts_and_the_reproduce_appendix():
    listed = [p.relative_to(REPO_ROOT).as_posix() for p in CHAPTERS]
    assert listed[0] == "index.qmd"
    assert "report/appendix-reproduce.qmd" in listed
    assert "part:" in (REPO_ROOT / "_quarto.yml").read_text()


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_executes_from_committed_cache(chapter, tmp_path, monkeypatch):
    env = {"ICL_CACHE": "readonly", "ICL_MODEL": "smollm2-135m",
           "ICL_CACHE_DIR": str(REPO_ROOT / "cache")}
    out = tmp_path / "executed.ipynb"
    values = quarto.execute_qmd(chapter, REPO_ROOT, env=env, save_to=out)
    for expr, value in values.items():
        assert value and value not in ("nan", "None"), (expr, value)
    nb = nbformat.read(out, as_version=4)
    qmd = quarto.parse_qmd(chapter)
    figure_cells = [c for c in qmd.cells if c.kind == "code" and str(c.options.get("label", "")).startswith("fig-")]
    executed = [c for c in nb.cells if c.cell_type == "code"]
    for cell in executed:
        label = re.search(r"#\|\s*label:\s*(\S+)", cell.source)
        if label and label.group(1).startswith("fig-"):
            kinds = {k for o in cell.outputs for k in o.get("data", {})}
            assert "image/png" in kinds, f"{chapter.name}: {label.group(1)} drew no figure"
            assert not any(o.output_type == "error" for o in cell.outputs)
    assert len(figure_cells) == sum(
        1 for c in executed if re.search(r"#\|\s*label:\s*fig-", c.source))


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


@pytest.mark.quarto
@pytest.mark.slow
@pytest.mark.skipif(quarto.quarto_executable() is None, reason="quarto is not installed")
def test_quarto_renders_the_book(monkeypatch):
    import sys

    monkeypatch.setenv("ICL_CACHE", "readonly")
    monkeypatch.setenv("QUARTO_PYTHON", sys.executable)
    quarto.render(REPO_ROOT)
    index = REPO_ROOT / "_book" / "index.html"
    assert index.is_file()
    html = "".join(p.read_text() for p in (REPO_ROOT / "_book").rglob("*.html"))
    assert "fig-surprisal" in html
