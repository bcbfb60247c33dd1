"""Render the book with Quarto, and check what Quarto itself does not.

Quarto executes the chapters (its Jupyter engine, one kernel per chapter), resolves cross-references
and citations, and warns when one is missing. What it cannot know is what *this* book promises its
readers, so three kinds of check live here:

* :func:`check_sources` reads the ``.qmd`` files listed in ``_quarto.yml``: every figure cell has a
  caption, is referred to in the text (``@fig-x``), and is followed, before the next figure, by a
  collapsed "Reproduce this figure" callout holding the ``python -m icl ...`` command that regenerates
  it; and no inline `` `{python} ...` `` sits inside ``$...$`` (Quarto escapes inline values as
  markdown, which breaks TeX; :func:`icl.book.math` emits the whole span instead).
* :func:`log_problems` reads Quarto's output: any ``WARNING`` or ``ERROR`` line is a defect (an
  unresolved reference, a missing citation, a failed cell all show up there).
* :func:`check_html` reads the rendered pages as a reader sees them: no unresolved reference
  (``?@fig-x``), no Python repr in the prose (``np.float64(``, ``array(``, ``dtype=``), no ``$`` left
  outside math, no ``-0.00``, no truncated table, every figure with its image on disk, no cell that
  printed an error or to stderr.

:func:`render` runs ``quarto render`` and streams its output to the terminal while keeping a copy, so a
warning is always seen and can also be checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import yaml

REPRODUCE_TITLE = "Reproduce this figure"


class BookError(Exception):
    """The book (its configuration, a chapter, or a Quarto run) is broken."""


# --------------------------------------------------------------------------
# Running Quarto
# --------------------------------------------------------------------------


def quarto_executable() -> str | None:
    """The ``quarto`` on PATH, or ``None``."""
    return shutil.which("quarto")


def render(root: Path, targets: Sequence[str] = (), *, env: Mapping[str, str | None] | None = None,
           args: Sequence[str] = (), timeout: float = 3600, echo: bool = True) -> str:
    """``quarto render [targets] [args]`` in ``root``; returns everything Quarto printed.

    Quarto runs with this process's Python (``QUARTO_PYTHON``, its folder first on ``PATH``); ``env``
    adds to (or, with ``None`` values, removes from) that environment.
    The output goes to this process's stderr line by line as it arrives (``echo``), so nothing Quarto
    says is hidden. Raises :class:`BookError` with the last lines of the output when Quarto is missing,
    exits non-zero, or runs past ``timeout`` seconds.
    """
    exe = quarto_executable()
    if exe is None:
        raise BookError("quarto is not on PATH: install it from https://quarto.org/docs/get-started/")
    # the kernels and the pre-render script run in this Python (its venv first on PATH), unless env says otherwise
    here = {"QUARTO_PYTHON": sys.executable,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_env = {k: v for k, v in {**os.environ, **here, **(env or {})}.items() if v is not None}  # None: unset
    lines: list[str] = []
    proc = subprocess.Popen([exe, "render", *targets, *args], cwd=root, env=run_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise BookError(f"quarto render ran past {timeout:.0f} s") from exc
    except BaseException:
        proc.kill()
        raise
    log = "".join(lines)
    if code != 0:
        tail = "".join(lines[-40:])
        raise BookError(f"quarto render failed (exit {code}); its last lines:\n{tail}")
    return log


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_problems(log: str) -> list[str]:
    """Quarto's (and pandoc's, and the kernels') WARNING and ERROR lines."""
    out = []
    for line in _ANSI.sub("", log).splitlines():
        if re.search(r"\b(WARN(ING)?|ERROR)\b", line):
            out.append(f"quarto: {line.strip()}")
    return out


# --------------------------------------------------------------------------
# The book's files
# --------------------------------------------------------------------------


def book_files(root: Path) -> list[Path]:
    """The ``.qmd`` files of ``book.chapters`` and ``book.appendices`` in ``_quarto.yml``, part pages
    included, in order."""
    try:
        config = yaml.safe_load((root / "_quarto.yml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BookError(f"cannot read {root / '_quarto.yml'}: {exc}") from exc
    book = config.get("book") or {}

    def walk(items: object) -> Iterator[str]:
        for item in items or []:
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict):
                if isinstance(item.get("href"), str):
                    yield item["href"]
                if isinstance(item.get("part"), str) and item["part"].endswith(".qmd"):
                    yield item["part"]  # a part page (its title and text open the part)
                yield from walk(item.get("chapters"))

    return [root / rel for rel in [*walk(book.get("chapters")), *walk(book.get("appendices"))]
            if rel.endswith(".qmd")]


_LOAD = re.compile(r"""\bbook\.load\(\s*["'](\w+)["']""")


def chapter_experiments(path: Path) -> list[str]:
    """The experiments whose results a page reads (its ``book.load("name")`` calls), in order of first
    use; their dependencies are not included (see :func:`icl.schedule.closure`)."""
    return list(dict.fromkeys(_LOAD.findall(path.read_text(encoding="utf-8"))))


# --------------------------------------------------------------------------
# Source checks
# --------------------------------------------------------------------------


@dataclass
class _Chunk:
    line: int
    options: dict
    end: int  # index of the closing fence line


@dataclass
class _Source:
    rel: str
    lines: list[str]
    chunks: list[_Chunk] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, text) outside fences


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(\{?[^`]*)$")
_INLINE_CODE = re.compile(r"(`+).+?\1")
_MATH_SPAN = re.compile(r"(?<![\\$])\$(?!\$)(?=\S)(.+?)(?<=\S)(?<!\\)\$(?!\$)")


def _read_source(path: Path, root: Path) -> _Source:
    lines = path.read_text(encoding="utf-8").splitlines()
    src = _Source(path.relative_to(root).as_posix(), lines)
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            src.prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, info = m.group(2), m.group(3).strip()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if info.startswith("{python"):
            opts = "\n".join(line[3:] for line in lines[i + 1:j] if line.startswith("#| "))
            try:
                options = yaml.safe_load(opts) or {}
            except yaml.YAMLError as exc:
                raise BookError(f"{src.rel}:{i + 1}: bad '#|' options: {exc}") from exc
            src.chunks.append(_Chunk(i + 1, options if isinstance(options, dict) else {}, j))
        i = j + 1
    return src


def _reproduce_callout(src: _Source, start: int, stop: int) -> tuple[int, str, list[str]] | None:
    """The first callout titled "Reproduce this figure" between 0-based lines start and stop."""
    for i in range(start, min(stop, len(src.lines))):
        line = src.lines[i]
        if not re.match(r"^:{3,}\s*\{[^}]*\.callout-", line):
            continue
        body: list[str] = []
        depth = 1
        for inner in src.lines[i + 1:]:
            if re.match(r"^:{3,}\s*$", inner):
                depth -= 1
                if depth == 0:
                    break
            elif re.match(r"^:{3,}\s*\S", inner):
                depth += 1
            body.append(inner)
        title = re.search(r'title="([^"]*)"', line)
        heading = next((b for b in body if b.startswith("#")), "")
        if REPRODUCE_TITLE.lower() in ((title.group(1) if title else "") + heading).lower():
            return i + 1, line, body
    return None


def check_sources(root: Path) -> list[str]:
    """What Quarto does not check in the ``.qmd`` sources (see the module docstring); ``[]`` if fine."""
    problems: list[str] = []
    sources = []
    for path in book_files(root):
        if not path.is_file():
            problems.append(f"_quarto.yml lists {path.relative_to(root)}, which does not exist")
            continue
        sources.append(_read_source(path, root))
    referenced = set()
    for src in sources:
        for _, text in src.prose:
            referenced.update(re.findall(r"@(fig-[\w-]*\w)", text))
        for chunk in src.chunks:
            cap = chunk.options.get("fig-cap") or chunk.options.get("tbl-cap") or ""
            referenced.update(re.findall(r"@(fig-[\w-]*\w)", str(cap)))
    for src in sources:
        for n, text in src.prose:
            for math in _MATH_SPAN.finditer(_INLINE_CODE.sub(lambda m: m.group(0) if "{python}" in m.group(0)
                                                             else "x", text)):
                if "`{python}" in math.group(1):
                    problems.append(f"{src.rel}:{n}: an inline {{python}} value inside $...$ "
                                    "(Quarto escapes it and breaks the TeX); use icl.book.math()")
        figures = [c for c in src.chunks if str(c.options.get("label", "")).startswith("fig-")]
        for k, chunk in enumerate(figures):
            label = chunk.options["label"]
            where = f"{src.rel}:{chunk.line}: figure '{label}'"
            if not str(chunk.options.get("fig-cap", "")).strip():
                problems.append(f"{where} has no fig-cap")
            if label not in referenced:
                problems.append(f"{where} is never referred to as @{label} in the text")
            stop = figures[k + 1].line - 1 if k + 1 < len(figures) else len(src.lines)
            found = _reproduce_callout(src, chunk.end + 1, stop)
            if found is None:
                problems.append(f"{where} has no '{REPRODUCE_TITLE}' callout before the next figure")
                continue
            line, opening, body = found
            if not re.search(r'collapse\s*=\s*"?true', opening):
                problems.append(f"{src.rel}:{line}: the '{REPRODUCE_TITLE}' callout of '{label}' "
                                'is not collapse="true"')
            if not any("python -m icl " in b for b in body):
                problems.append(f"{src.rel}:{line}: the '{REPRODUCE_TITLE}' callout of '{label}' "
                                "gives no 'python -m icl ...' command")
    return problems


# --------------------------------------------------------------------------
# Checks of the rendered HTML
# --------------------------------------------------------------------------

_REPRS = re.compile(r"\bnp\.\w+\(|\barray\(|\bdtype=|\btensor\(|<[\w.]+ object at 0x")
_HIDDEN_TAGS = {"script", "style", "code", "pre", "head", "svg", "math"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Page(HTMLParser):
    """Collects a page's reader-visible prose (outside code and math), its figures and cell outputs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, str | None]] = []  # (tag, hides text, figure id)
        self.text: list[str] = []
        self.figures: dict[str, list[str]] = {}
        self.bad_outputs: list[str] = []
        self.table_cells: list[str] = []
        self.index_rows = 0
        self._cell: list[str] | None = None
        self._thead_rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        hides = tag in _HIDDEN_TAGS or "math" in classes or (self.stack and self.stack[-1][1])
        fig = self.stack[-1][2] if self.stack else None
        if a.get("id", "").startswith("fig-") and ("quarto-float" in classes or "quarto-figure" in classes
                                                  or tag == "figure" or "cell" in classes):
            fig = a["id"]
            self.figures.setdefault(fig, [])
        if tag == "img" and fig:
            self.figures[fig].append(a.get("src", ""))
        for cls in ("cell-output-error", "cell-output-stderr"):
            if cls in classes:
                self.bad_outputs.append(cls)
        if tag == "td":
            self._cell = []
        if tag == "thead":
            self._thead_rows = 0
        if tag == "tr" and any(t == "thead" for t, _, _ in self.stack):
            self._thead_rows += 1
            self.index_rows += self._thead_rows == 2
        if tag not in _VOID:
            self.stack.append((tag, bool(hides), fig))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.table_cells.append("".join(self._cell).strip())
            self._cell = None
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1][1]:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def check_html(book_dir: Path) -> list[str]:
    """Defects a reader would see in the rendered pages under ``book_dir``; ``[]`` if none."""
    pages = sorted(p for p in book_dir.rglob("*.html") if "site_libs" not in p.parts)
    if not pages:
        return [f"no HTML pages under {book_dir}"]
    problems: list[str] = []
    for page in pages:
        rel = page.relative_to(book_dir).as_posix()
        parser = _Page()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\s+", " ", " ".join(parser.text))

        def around(m: re.Match[str]) -> str:
            return text[max(0, m.start() - 40):m.end() + 40].strip()

        for pattern, what in ((r"\?@[\w-]+", "an unresolved reference"), (_REPRS, "a Python repr"),
                              (r"\$", "a '$' outside math"), (r"(?<![\w.])-0\.0+(?![\d])", "a negative zero")):
            found = list(re.finditer(pattern, text))
            if found:
                times = f" ({len(found)} times)" if len(found) > 1 else ""
                problems.append(f"{rel}: {what}{times}: ...{around(found[0])}...")
        for cell in parser.table_cells:
            if cell.endswith(("...", "…")):
                problems.append(f"{rel}: a truncated table cell: {cell[-60:]!r}")
        if parser.index_rows:
            problems.append(f"{rel}: {parser.index_rows} table(s) with a second header row "
                            "(a pandas index name); use icl.book.table()")
        for fig, srcs in parser.figures.items():
            if not srcs:
                problems.append(f"{rel}: figure '{fig}' has no image")
            for src in srcs:
                if not src.startswith(("data:", "http")) and not (page.parent / src).is_file():
                    problems.append(f"{rel}: figure '{fig}' points at a missing image {src}")
        for cls in parser.bad_outputs:
            problems.append(f"{rel}: a cell wrote {'an error' if 'error' in cls else 'to stderr'} ({cls})")
    return problems
