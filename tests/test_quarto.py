"""Tests for icl.quarto: book listing, .qmd parsing, execution, structure checks."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import nbformat
import pytest

from icl.quarto import (
    BookError,
    Cell,
    ChapterExecutionError,
    book_files,
    check_structure,
    execute_qmd,
    parse_qmd,
    quarto_executable,
    render,
    to_notebook,
)

FENCE = "```"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


QUARTO_YML = """
project:
  type: book
book:
  title: Synthetic book
  chapters:
    - index.qmd
    - part: "Results"
      chapters:
        - report/results.qmd
  appendices:
    - report/appendix.qmd
bibliography: references.bib
"""

INDEX_QMD = f"""
---
title: Introduction
---

# Introduction {{#sec-intro}}

Write to someone@example.org or <first.last@uni.edu>. As @smith2020 showed
[@jones2021, p. 3; -@smith2020], lines are straight (@fig-line, [@Fig-line]).
See @tbl-data, @sec-results and @eq-energy; @Sec-intro is this chapter.

{FENCE}python
@decorator_in_code_block
def f(): ...
{FENCE}

Inline code such as `@property` or `` a@`b` `` is not a citation.
<!-- a comment mentioning @commented_out -->
"""

RESULTS_QMD = f"""
# Results {{#sec-results}}

{FENCE}{{python}}
#| label: fig-line
#| fig-cap: "A straight line, as in @smith2020."
print("plot")
{FENCE}

::: {{.callout-note collapse="true"}}
## Reproduce this figure

{FENCE}bash
python -m icl figure line --out line.png
{FENCE}
:::

{FENCE}{{python}}
#| label: tbl-data
#| tbl-cap: Some data.
print("table")
{FENCE}

$$
E = mc^2
$$ {{#eq-energy}}
"""

APPENDIX_QMD = """
# Appendix {#sec-appendix}

Nothing to see here, see @sec-intro.
"""

REFERENCES_BIB = """
@article{smith2020,
  title = {Lines},
  year = {2020},
}

@Book{ jones2021 ,
  title = {More lines},
}
"""


@pytest.fixture
def book(tmp_path: Path) -> Path:
    write(tmp_path / "_quarto.yml", QUARTO_YML)
    write(tmp_path / "index.qmd", INDEX_QMD)
    write(tmp_path / "report" / "results.qmd", RESULTS_QMD)
    write(tmp_path / "report" / "appendix.qmd", APPENDIX_QMD)
    write(tmp_path / "references.bib", REFERENCES_BIB)
    return tmp_path


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


# ---------------------------------------------------------------- book_files


def test_book_files_lists_chapters_parts_and_appendices(book: Path) -> None:
    write(
        book / "_quarto.yml",
        """
        book:
          chapters:
            - index.qmd
            - part: report/part1.qmd
              chapters: [report/results.qmd]
            - part: "A titled part"
              chapters:
                - report/other.qmd
            - references.md
          appendices:
            - report/appendix.qmd
        """,
    )
    assert book_files(book) == [
        book / "index.qmd",
        book / "report" / "part1.qmd",
        book / "report" / "results.qmd",
        book / "report" / "other.qmd",
        book / "report" / "appendix.qmd",
    ]
    assert all(p.is_absolute() for p in book_files(book))


def test_book_files_errors(tmp_path: Path) -> None:
    with pytest.raises(BookError, match="_quarto.yml"):
        book_files(tmp_path)
    write(tmp_path / "_quarto.yml", "project:\n  type: website\n")
    with pytest.raises(BookError, match="book"):
        book_files(tmp_path)
    assert check_structure(tmp_path) and "book" in check_structure(tmp_path)[0]


# ----------------------------------------------------------- check_structure


def test_correct_book_has_no_problems(book: Path) -> None:
    assert check_structure(book) == []


def test_missing_listed_file(book: Path) -> None:
    listed = "    - report/appendix.qmd"
    replace_in(book / "_quarto.yml", listed, listed + "\n    - report/missing.qmd")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "report/missing.qmd" in problems[0] and "not exist" in problems[0]


def test_unlisted_report_qmd(book: Path) -> None:
    write(book / "report" / "extra.qmd", "# Extra\n")
    write(book / "report" / "_partial.qmd", "Included elsewhere.\n")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "report/extra.qmd" in problems[0] and "not listed" in problems[0]


def test_dangling_cross_reference(book: Path) -> None:
    replace_in(book / "report" / "appendix.qmd", "see @sec-intro", "see @fig-nope and [@Tbl-gone]")
    problems = check_structure(book)
    assert len(problems) == 2, problems
    assert any("report/appendix.qmd" in p and "fig-nope" in p for p in problems)
    assert any("tbl-gone" in p for p in problems)


def test_duplicate_label(book: Path) -> None:
    replace_in(book / "report" / "appendix.qmd", "{#sec-appendix}", "{#sec-results}")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "sec-results" in problems[0] and "2 times" in problems[0]
    assert "report/appendix.qmd" in problems[0] and "report/results.qmd" in problems[0]


def test_duplicate_cell_label(book: Path) -> None:
    results = book / "report" / "results.qmd"
    replace_in(results, "#| label: tbl-data", "#| label: fig-line\n#| fig-cap: x")
    replace_in(book / "index.qmd", "See @tbl-data,", "See")
    problems = check_structure(book)
    assert any("fig-line" in p and "2 times" in p for p in problems), problems


def test_unknown_citation(book: Path) -> None:
    replace_in(book / "report" / "appendix.qmd", "Nothing", "Nothing [see @doe1999, ch. 2]")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "doe1999" in problems[0] and "report/appendix.qmd" in problems[0]
    assert "references.bib" in problems[0]


def test_unknown_citation_in_caption(book: Path) -> None:
    replace_in(book / "report" / "results.qmd", "as in @smith2020", "as in [@nobody2000]")
    problems = check_structure(book)
    assert len(problems) == 1 and "nobody2000" in problems[0], problems


def test_emails_code_and_comments_are_not_citations(tmp_path: Path) -> None:
    write(tmp_path / "_quarto.yml", "book:\n  chapters: [index.qmd]\n")
    write(
        tmp_path / "index.qmd",
        f"""
        # Title

        Mail a@b.org, x.y-z@mail.example.com or <me@host.net>.

        {FENCE}{{python}}
        @functools.cache
        def g(): ...
        {FENCE}

        ~~~
        @tilde_block
        ~~~

        {FENCE}{{.python}}
        @dotted_python_block
        {FENCE}

        Some `@inline_code` and ``@double `ticks` ``.
        """,
    )
    # no references.bib at all: any citation would be reported
    assert check_structure(tmp_path) == []
    replace_in(tmp_path / "index.qmd", "# Title", "# Title\n\nAs @realcite said.")
    problems = check_structure(tmp_path)
    assert len(problems) == 1 and "realcite" in problems[0], problems


def test_figure_without_fig_cap(book: Path) -> None:
    results = book / "report" / "results.qmd"
    replace_in(results, '#| fig-cap: "A straight line, as in @smith2020."\n', "")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "fig-line" in problems[0] and "fig-cap" in problems[0]
    assert "report/results.qmd" in problems[0]


def test_figure_without_reproduce_callout(book: Path) -> None:
    second = f"""
{FENCE}{{python}}
#| label: fig-second
#| fig-cap: Second figure.
print("second")
{FENCE}

::: {{.callout-tip collapse="true"}}
## Something else
python -m icl figure second
:::
"""
    replace_in(book / "report" / "results.qmd", "$$\n", second + "\n$$\n")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "fig-second" in problems[0] and "Reproduce this figure" in problems[0]


def test_callout_must_follow_its_own_figure(book: Path) -> None:
    # a figure placed *before* fig-line: fig-line's callout does not count for it
    first = f"""
{FENCE}{{python}}
#| label: fig-first
#| fig-cap: First figure.
print("first")
{FENCE}
"""
    fig_line = "\n" + FENCE + "{python}\n#| label: fig-line"
    replace_in(book / "report" / "results.qmd", fig_line, first + fig_line)
    problems = check_structure(book)
    assert len(problems) == 1 and "fig-first" in problems[0], problems


def test_callout_title_attribute_and_other_types(book: Path) -> None:
    replace_in(
        book / "report" / "results.qmd",
        '::: {.callout-note collapse="true"}\n## Reproduce this figure\n',
        '::: {.callout-warning title="Reproduce this figure" collapse="true"}\n',
    )
    assert check_structure(book) == []


def test_callout_without_collapse(book: Path) -> None:
    results = book / "report" / "results.qmd"
    replace_in(results, '{.callout-note collapse="true"}', "{.callout-note}")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "collapse" in problems[0] and "fig-line" in problems[0]


def test_callout_without_command(book: Path) -> None:
    results = book / "report" / "results.qmd"
    replace_in(results, "python -m icl figure line --out line.png", "make figure")
    problems = check_structure(book)
    assert len(problems) == 1, problems
    assert "python -m icl" in problems[0]


# ------------------------------------------------------------------ parse_qmd

PARSE_QMD = f"""
---
title: "Parsing"
execute:
  echo: false
---

Intro with `{{python}} n_items` items and `{{python}} f"{{x:.2f}}"`.

{FENCE}{{python}}
#| label: fig-demo
#| fig-cap: >
#|   A long
#|   caption.
#| echo: false
x = 1
{FENCE}

{FENCE}{{python echo=false}}
y = 2
{FENCE}

{FENCE}bash
{FENCE}{{python}}
{FENCE}

{FENCE}{{bash}}
echo `{{python}} not_inline`
{FENCE}

{FENCE}{{.python}}
z = 3
{FENCE}

{FENCE}{FENCE[0]}markdown
{FENCE}{{python}}
shown = "not executed"
{FENCE}
{FENCE}{FENCE[0]}

{FENCE}{{{{python}}}}
escaped = True
{FENCE}

Outro `{{python}} y`.
"""


def test_parse_qmd(tmp_path: Path) -> None:
    path = write(tmp_path / "doc.qmd", PARSE_QMD)
    qmd = parse_qmd(path)
    assert qmd.path == path
    assert qmd.front_matter == {"title": "Parsing", "execute": {"echo": False}}
    code = [c for c in qmd.cells if c.kind == "code"]
    assert [c.source.splitlines()[-1] for c in code] == ["x = 1", "y = 2"]
    assert code[0].options == {
        "label": "fig-demo",
        "fig-cap": "A long caption.\n",
        "echo": False,
    }
    assert code[0].source.startswith("#| label: fig-demo\n")
    assert code[1] == Cell("code", "y = 2", {})
    assert qmd.inline_expressions == ["n_items", 'f"{x:.2f}"', "y"]
    markdown = "\n".join(c.source for c in qmd.cells if c.kind == "markdown")
    fragments = ("echo `{python} not_inline`", "z = 3", 'shown = "not executed"', "escaped = True")
    for fragment in fragments:
        assert fragment in markdown
    assert [c.kind for c in qmd.cells] == ["markdown", "code", "code", "markdown"]

    nb = to_notebook(qmd)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    assert [c.cell_type for c in nb.cells] == [c.kind for c in qmd.cells]
    assert nb.cells[1].source == code[0].source


def test_parse_qmd_rejects_unclosed_chunk(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.qmd", f"Text\n\n{FENCE}{{python}}\nx = 1\n")
    with pytest.raises(BookError, match="unclosed"):
        parse_qmd(path)


# ---------------------------------------------------------------- execute_qmd


def test_execute_qmd_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICL_QUARTO_TEST_VAR", raising=False)
    (tmp_path / "data.txt").write_text("hello-from-root\n")
    chapter = write(
        tmp_path / "report" / "chapter.qmd",
        f"""
        ---
        title: Run me
        ---

        {FENCE}{{python}}
        #| label: setup
        import os
        from pathlib import Path
        DATA = Path("data.txt").read_text().strip()
        CWD = os.getcwd()
        VAR = os.environ.get("ICL_QUARTO_TEST_VAR", "<unset>")
        print(DATA)
        {FENCE}

        {FENCE}{{python}}
        #| eval: false
        raise RuntimeError("eval: false cells must not run")
        {FENCE}

        {FENCE}{{python}}
        #| error: true
        1 / 0
        {FENCE}

        Data is `{{python}} DATA`, five is `{{python}} 2+3`, the variable is
        `{{python}} VAR`, the directory `{{python}} CWD` and again `{{python}} 2+3`.
        """,
    )
    save_to = tmp_path / "out" / "nested" / "chapter.ipynb"
    values = execute_qmd(
        chapter, tmp_path, timeout=120, env={"ICL_QUARTO_TEST_VAR": "from-env"}, save_to=save_to
    )
    assert values["DATA"] == "hello-from-root"
    assert values["2+3"] == "5"
    assert values["VAR"] == "from-env"
    assert os.path.realpath(values["CWD"]) == os.path.realpath(tmp_path)
    assert set(values) == {"DATA", "2+3", "VAR", "CWD"}

    nb = nbformat.read(save_to, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 3  # the inline-expression probes are not saved
    assert "hello-from-root" in "".join(o.get("text", "") for o in code[0].outputs)
    assert code[1].outputs == []
    assert any(o.get("ename") == "ZeroDivisionError" for o in code[2].outputs)
    assert [p.name for p in save_to.parent.iterdir()] == ["chapter.ipynb"]


def test_execute_qmd_failing_cell(tmp_path: Path) -> None:
    chapter = write(
        tmp_path / "report" / "broken.qmd",
        f"""
        {FENCE}{{python}}
        a = 1
        {FENCE}

        Some prose `{{python}} a`.

        {FENCE}bash
        exit 1
        {FENCE}

        {FENCE}{{python}}
        b = 2
        {FENCE}

        {FENCE}{{python}}
        #| label: boom
        value = a + b
        raise ValueError(f"boom {{value}}")
        {FENCE}

        {FENCE}{{python}}
        open("marker.txt", "w").write("should not run")
        {FENCE}
        """,
    )
    save_to = tmp_path / "out" / "broken.ipynb"
    with pytest.raises(ChapterExecutionError) as info:
        execute_qmd(chapter, tmp_path, timeout=120, save_to=save_to)
    err = info.value
    assert isinstance(err, BookError)
    assert err.path == chapter
    assert err.cell_index == 2
    assert err.ename == "ValueError"
    assert "boom 3" in err.evalue
    message = str(err)
    assert "broken.qmd" in message and "cell 2" in message
    assert "raise ValueError" in message and "ValueError: boom 3" in message
    assert not save_to.exists() and not save_to.parent.exists()
    assert not (tmp_path / "marker.txt").exists()


def test_execute_qmd_failing_inline_expression(tmp_path: Path) -> None:
    chapter = write(
        tmp_path / "inline.qmd",
        f"""
        {FENCE}{{python}}
        x = 1
        {FENCE}

        Fine `{{python}} x`, broken `{{python}} undefined_name + 1`.
        """,
    )
    save_to = tmp_path / "inline.ipynb"
    with pytest.raises(ChapterExecutionError) as info:
        execute_qmd(chapter, tmp_path, timeout=120, save_to=save_to)
    assert info.value.cell_index is None
    assert info.value.ename == "NameError"
    assert "undefined_name" in str(info.value)
    assert not save_to.exists()


# --------------------------------------------------------------------- render


def test_render_without_quarto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert quarto_executable() is None
    with pytest.raises(BookError, match="not installed"):
        render(tmp_path)


def test_render_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    script = '#!/bin/sh\necho "rendering $1 in $(pwd)"\necho "ERROR: boom" >&2\nexit 3\n'
    fake = write(bindir / "quarto", script)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bindir))
    assert quarto_executable() == str(fake)
    book = tmp_path / "book"
    book.mkdir()
    with pytest.raises(BookError) as info:
        render(book)
    assert "exit 3" in str(info.value) and "ERROR: boom" in str(info.value)
    assert f"rendering render in {book}" in str(info.value)
