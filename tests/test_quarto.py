"""icl.quarto: the checks Quarto does not make (sources, rendered HTML, Quarto's log) and the runner."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from icl import quarto

FENCE = "```"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def book(tmp_path: Path, chapter: str) -> Path:
    write(tmp_path / "_quarto.yml", """
        project:
          type: book
        book:
          chapters:
            - index.qmd
            - part: "Results"
              chapters:
                - report/results.qmd
          appendices:
            - report/appendix.qmd
        """)
    write(tmp_path / "index.qmd", "# Preface\n")
    write(tmp_path / "report" / "appendix.qmd", "# Appendix\n")
    write(tmp_path / "report" / "results.qmd", chapter)
    return tmp_path


def figure(label: str, cap: str | None = "A caption.", callout: str | None = "default") -> str:
    opts = f"#| label: {label}\n" + (f'#| fig-cap: "{cap}"\n' if cap is not None else "")
    if callout == "default":
        callout = ('::: {.callout-note collapse="true"}\n## Reproduce this figure\n'
                   f"{FENCE}bash\npython -m icl run x\n{FENCE}\n:::\n")
    return f"{FENCE}{{python}}\n{opts}plot()\n{FENCE}\n\n{callout or ''}\n"


def test_book_files_follow_parts_and_appendices(tmp_path):
    root = book(tmp_path, "# R\n")
    assert [p.relative_to(root).as_posix() for p in quarto.book_files(root)] == [
        "index.qmd", "report/results.qmd", "report/appendix.qmd"]


def test_a_part_page_is_a_book_file(tmp_path):
    root = book(tmp_path, "# R\n")
    cfg = (root / "_quarto.yml").read_text().replace('part: "Results"', "part: report/part.qmd")
    (root / "_quarto.yml").write_text(cfg)
    write(root / "report" / "part.qmd", "# Results {.unnumbered}\n")
    assert [p.relative_to(root).as_posix() for p in quarto.book_files(root)] == [
        "index.qmd", "report/part.qmd", "report/results.qmd", "report/appendix.qmd"]


def test_clean_sources_have_no_problems(tmp_path):
    root = book(tmp_path, "# R\n\nAs @fig-a shows, with $k = 3$ and `{python} math(r\"k = \", k)`.\n\n"
                + figure("fig-a"))
    assert quarto.check_sources(root) == []


@pytest.mark.parametrize("chapter, expected", [
    ("See @fig-a.\n\n" + figure("fig-a", cap=None), "has no fig-cap"),
    ("No mention.\n\n" + figure("fig-a"), "never referred to as @fig-a"),
    ("See @fig-a.\n\n" + figure("fig-a", callout=None), "has no 'Reproduce this figure' callout"),
    ("See @fig-a.\n\n" + figure("fig-a", callout="::: {.callout-note}\n## Reproduce this figure\n"
                                "`python -m icl run x`\n:::\n"), 'is not collapse="true"'),
    ("See @fig-a.\n\n" + figure("fig-a", callout='::: {.callout-note collapse="true"}\n'
                                "## Reproduce this figure\nRun the experiment.\n:::\n"), "gives no 'python -m icl"),
    ("See @fig-a, where $d = `{python} d`$.\n\n" + figure("fig-a"), "inside $...$"),
])
def test_each_source_defect_is_reported(tmp_path, chapter, expected):
    problems = quarto.check_sources(book(tmp_path, "# R\n\n" + chapter))
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith("report/results.qmd:")


def test_a_callout_of_the_next_figure_does_not_count(tmp_path):
    chapter = "@fig-a and @fig-b.\n\n" + figure("fig-a", callout=None) + figure("fig-b")
    problems = quarto.check_sources(book(tmp_path, "# R\n\n" + chapter))
    assert len(problems) == 1 and "'fig-a' has no 'Reproduce" in problems[0]


def test_a_listed_file_that_is_missing_is_reported(tmp_path):
    root = book(tmp_path, "# R\n")
    (root / "report" / "appendix.qmd").unlink()
    assert quarto.check_sources(root) == ["_quarto.yml lists report/appendix.qmd, which does not exist"]


PAGE = """<html><head><title>t $x$</title><script>var a = "$np.float64(1)";</script></head><body>
<p>Fine prose with <span class="math inline">\\(x = 2\\)</span> and <code>$ python -m icl</code>.</p>
<div id="fig-a" class="quarto-float quarto-figure"><figure><img src="a.png"><figcaption>A</figcaption></figure></div>
<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>-0.5</td></tr></tbody></table>
{extra}
</body></html>"""


def page(tmp_path: Path, extra: str = "") -> Path:
    site = tmp_path / "_book"
    site.mkdir(exist_ok=True)
    (site / "a.png").write_bytes(b"png")
    (site / "index.html").write_text(PAGE.format(extra=extra), encoding="utf-8")
    return site


def test_clean_html_has_no_problems(tmp_path):
    assert quarto.check_html(page(tmp_path)) == []


@pytest.mark.parametrize("extra, expected", [
    ("<p>see <strong>?@fig-b</strong></p>", "an unresolved reference"),
    ("<p>spread by np.float64(0.25)</p>", "a Python repr"),
    ("<p>values array([1, 2])</p>", "a Python repr"),
    ("<p>were $n = $ 10</p>", "a '$' outside math"),
    ("<p>a change of -0.00 nats</p>", "a negative zero"),
    ("<table><tr><td>log(1 + e^{-t}) is decreasing...</td></tr></table>", "a truncated table cell"),
    ("<table><thead><tr><th></th><th>x</th></tr><tr><th>task</th><th></th></tr></thead></table>",
     "second header row"),
    ('<div id="fig-b" class="quarto-float"><figure><figcaption>B</figcaption></figure></div>', "has no image"),
    ('<div id="fig-b" class="quarto-float"><figure><img src="gone.png"></figure></div>', "missing image"),
    ('<div class="cell-output cell-output-error"><pre>Traceback</pre></div>', "a cell wrote an error"),
    ('<div class="cell-output cell-output-stderr"><pre>noise</pre></div>', "a cell wrote to stderr"),
])
def test_each_html_defect_is_reported(tmp_path, extra, expected):
    problems = quarto.check_html(page(tmp_path, extra))
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith("index.html:")


def test_no_pages_is_a_problem(tmp_path):
    assert "no HTML pages" in quarto.check_html(tmp_path)[0]


def test_log_problems_reads_warnings_and_errors_through_colour_codes():
    log = ("[ 1/2] index.qmd\n\x1b[33mWARN: report/a.html: Unable to resolve crossref @fig-x\x1b[39m\n"
           "[WARNING] Citeproc: citation nobody2020 not found\nERROR: boom\nOutput created: _book/index.html\n")
    assert quarto.log_problems(log) == [
        "quarto: WARN: report/a.html: Unable to resolve crossref @fig-x",
        "quarto: [WARNING] Citeproc: citation nobody2020 not found",
        "quarto: ERROR: boom",
    ]
    assert quarto.log_problems("Output created: _book/index.html\nWarnings are fine as a word\n") == []


def fake_quarto(tmp_path: Path, monkeypatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "quarto"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_render_streams_and_returns_quartos_output(tmp_path, monkeypatch, capfd):
    fake_quarto(tmp_path, monkeypatch, 'echo "rendering $@"; echo "WARN: x" >&2')
    log = quarto.render(tmp_path, ["report/a.qmd"], args=["--quiet"])
    assert log == "rendering render report/a.qmd --quiet\nWARN: x\n"
    assert "rendering render" in capfd.readouterr().err


def test_render_failure_carries_the_last_lines(tmp_path, monkeypatch):
    fake_quarto(tmp_path, monkeypatch, 'echo "cell 3 failed: KeyError"; exit 3')
    with pytest.raises(quarto.BookError, match=r"(?s)exit 3.*cell 3 failed: KeyError"):
        quarto.render(tmp_path, echo=False)


def test_render_without_quarto_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(quarto.BookError, match="quarto.org"):
        quarto.render(tmp_path)
