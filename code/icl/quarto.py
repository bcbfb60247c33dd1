"""A small, Quarto-free stand-in for the parts of Quarto the book relies on.

The research book is rendered by Quarto's Jupyter engine: every chapter is a
``.qmd`` file whose ```` ```{python} ```` chunks run in a Jupyter kernel, whose
inline `` `{python} expr` `` expressions are replaced by their values, and
whose cross-references (``@fig-x``) and citations (``[@key]``) are resolved
against the labels and ``references.bib`` of the whole book.

Quarto itself cannot be installed on our CI machines, so a broken chapter
would otherwise only be noticed when somebody renders the book by hand.  This
module reproduces what matters of Quarto for catching such breakage early:

* :func:`book_files` reads the book's ``_quarto.yml`` (``book.chapters`` and
  ``book.appendices``, including ``part`` entries) and lists its ``.qmd`` files;
* :func:`parse_qmd` splits a ``.qmd`` into front matter, markdown and
  executable Python cells (with their ``#| key: value`` options) and inline
  expressions, and :func:`to_notebook` turns the result into an nbformat v4
  notebook, as Quarto does before handing it to Jupyter;
* :func:`execute_qmd` executes that notebook with nbclient in a ``python3``
  kernel whose working directory is the project root (Quarto's
  ``execute-dir: project``), stops at the first failing cell, then evaluates
  the inline expressions in the same kernel;
* :func:`check_structure` checks the book's structure: listed files exist,
  every ``report/*.qmd`` is listed, cross-references resolve, labels are
  unique, citation keys exist in ``references.bib``, and every figure cell
  has a caption and a collapsed "Reproduce this figure" callout giving the
  ``python -m icl ...`` command that regenerates it;
* :func:`render` runs the real ``quarto render`` where Quarto is available
  (see :func:`quarto_executable`).

Only the standard library, PyYAML, nbformat and nbclient are used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

__all__ = [
    "BookError",
    "ChapterExecutionError",
    "Cell",
    "Qmd",
    "book_files",
    "parse_qmd",
    "to_notebook",
    "execute_qmd",
    "check_structure",
    "quarto_executable",
    "render",
]

CROSSREF_PREFIXES: tuple[str, ...] = ("fig", "tbl", "sec", "eq")
"""Label prefixes treated as cross-references rather than citations."""

REPRODUCE_TITLE = "Reproduce this figure"
REPRODUCE_COMMAND = "python -m icl "


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class BookError(Exception):
    """The book (its configuration, a chapter, or a Quarto run) is broken."""


class ChapterExecutionError(BookError):
    """A chapter's code cell (or inline expression) raised while executing.

    Attributes:
        path: the ``.qmd`` file that was executed.
        cell_index: 0-based index of the failing cell among the chapter's code
            cells, or ``None`` when an inline expression failed.
        ename: the exception's class name as reported by the kernel.
        evalue: the exception's message as reported by the kernel.
        source: the failing cell's source (or the inline expression).
        traceback: the kernel's traceback text, ANSI colours included.
    """

    def __init__(
        self,
        path: Path,
        cell_index: int | None,
        ename: str,
        evalue: str,
        source: str = "",
        traceback: str = "",
    ) -> None:
        self.path = Path(path)
        self.cell_index = cell_index
        self.ename = ename
        self.evalue = evalue
        self.source = source
        self.traceback = traceback
        super().__init__(self._message())

    def _message(self) -> str:
        if self.cell_index is None:
            where = f"inline expression `{{python}} {self.source}`"
            excerpt = ""
        else:
            where = f"code cell {self.cell_index}"
            excerpt = _source_excerpt(self.source)
        msg = f"{self.path}: {where} failed with {self.ename}: {self.evalue}"
        if excerpt:
            msg += "\n  cell begins:\n" + "\n".join(f"    {line}" for line in excerpt)
        return msg

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.path, self.cell_index, self.ename, self.evalue, self.source, self.traceback),
        )


def _source_excerpt(source: str, max_lines: int = 3) -> list[str]:
    """The label option (if any) and the first non-option lines of a cell."""
    lines = source.splitlines()
    out: list[str] = []
    body_start = 0
    for i, line in enumerate(lines):
        if _OPTION_LINE.match(line):
            if re.match(r"^\s*#\|\s*label\s*:", line):
                out.append(line.strip())
            body_start = i + 1
        else:
            break
    body = [line for line in lines[body_start:] if line.strip()]
    out.extend(body[:max_lines])
    if len(body) > max_lines:
        out.append("...")
    return out


# --------------------------------------------------------------------------
# _quarto.yml
# --------------------------------------------------------------------------


def _load_config(root: Path) -> dict[str, Any]:
    config_path = Path(root) / "_quarto.yml"
    if not config_path.is_file():
        raise BookError(f"{config_path}: _quarto.yml not found")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BookError(f"{config_path}: invalid YAML: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("book"), dict):
        raise BookError(f"{config_path}: no 'book' section")
    return config


def _entries(items: object, where: str) -> Iterator[str]:
    """Flatten a ``chapters``/``appendices`` list into file names, in order."""
    if items is None:
        return
    if not isinstance(items, list):
        raise BookError(f"_quarto.yml: book.{where} must be a list")
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            part = item.get("part")
            if isinstance(part, str) and part.strip().endswith((".qmd", ".md", ".ipynb")):
                yield part.strip()
            href = item.get("href", item.get("file"))
            if isinstance(href, str):
                yield href
            yield from _entries(item.get("chapters"), where)
        else:
            raise BookError(f"_quarto.yml: unexpected entry in book.{where}: {item!r}")


def _listed_entries(root: Path) -> list[str]:
    """Every file named in ``book.chapters`` and ``book.appendices``, in order."""
    book = _load_config(root)["book"]
    return list(_entries(book.get("chapters"), "chapters")) + list(
        _entries(book.get("appendices"), "appendices")
    )


def _abs(root: Path, entry: str) -> Path:
    return Path(os.path.abspath(Path(root) / entry))


def book_files(root: Path) -> list[Path]:
    """The ``.qmd`` files of the book at *root*, as listed in ``_quarto.yml``.

    Reads ``book.chapters`` then ``book.appendices``; entries are file names
    or ``{part: ..., chapters: [...]}`` dicts whose ``part`` is itself a file
    when it ends in ``.qmd``.  Paths are absolute and in book order.

    Raises:
        BookError: ``_quarto.yml`` is missing, unreadable or has no ``book`` key.
    """
    return [_abs(root, e) for e in _listed_entries(root) if e.endswith(".qmd")]


# --------------------------------------------------------------------------
# .qmd parsing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One notebook cell of a ``.qmd``.

    ``kind`` is ``"markdown"`` or ``"code"``.  For code cells ``source`` keeps
    the leading ``#| key: value`` option lines (as Quarto does) and
    ``options`` holds them parsed as YAML.
    """

    kind: str
    source: str
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Qmd:
    """A parsed ``.qmd``: front matter, cells in order, inline expressions."""

    path: Path
    front_matter: dict[str, object]
    cells: list[Cell]
    inline_expressions: list[str]


_FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_CHUNK_INFO = re.compile(r"^\{python(?=[\s,}])[^}]*\}$")
_OPTION_LINE = re.compile(r"^\s*#\|")
_INLINE_EXPR = re.compile(r"(?<!`)`\{python\}[ \t]*(?P<expr>[^`\n]*?\S)[ \t]*`(?!`)")


@dataclass
class _Block:
    """A run of lines: prose ("text"), a non-executed fence, or a python chunk."""

    kind: str  # "text" | "fence" | "chunk"
    start: int  # 1-based line number of the first line (the fence line for chunks)
    lines: list[str]  # chunk: body only; fence: including fence lines


def _closes(line: str, char: str, length: int) -> bool:
    stripped = line.strip()
    return len(stripped) >= length and set(stripped) == {char}


def _split_front_matter(lines: list[str], path: Path) -> tuple[dict[str, object], int]:
    """Parse leading YAML front matter; return it and the index of the next line."""
    if not lines or lines[0].rstrip() != "---":
        return {}, 0
    for end in range(1, len(lines)):
        if lines[end].rstrip() in ("---", "..."):
            try:
                data = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError as exc:
                raise BookError(f"{path}: invalid YAML front matter: {exc}") from exc
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise BookError(f"{path}: front matter is not a YAML mapping")
            return data, end + 1
    return {}, 0  # a lone '---' is a horizontal rule


def _scan(text: str, path: Path) -> tuple[dict[str, object], list[_Block]]:
    """Split *text* into front matter and prose / fence / python-chunk blocks."""
    lines = text.splitlines()
    front_matter, i = _split_front_matter(lines, path)
    blocks: list[_Block] = []

    def add_text(line: str, lineno: int) -> None:
        if blocks and blocks[-1].kind == "text":
            blocks[-1].lines.append(line)
        else:
            blocks.append(_Block("text", lineno, [line]))

    n = len(lines)
    while i < n:
        line = lines[i]
        m = _FENCE_OPEN.match(line)
        if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
            add_text(line, i + 1)
            i += 1
            continue
        char, length = m["fence"][0], len(m["fence"])
        is_chunk = char == "`" and _CHUNK_INFO.match(m["info"].strip()) is not None
        j = i + 1
        while j < n and not _closes(lines[j], char, length):
            j += 1
        if is_chunk:
            if j >= n:
                raise BookError(f"{path}:{i + 1}: unclosed ```{{python}} chunk")
            blocks.append(_Block("chunk", i + 1, lines[i + 1 : j]))
        else:  # an unclosed plain fence runs to the end of the document
            blocks.append(_Block("fence", i + 1, lines[i : j + 1]))
        i = j + 1
    return front_matter, blocks


def _chunk_options(body: list[str], path: Path, lineno: int) -> dict[str, object]:
    option_lines: list[str] = []
    for line in body:
        if not _OPTION_LINE.match(line):
            break
        option_lines.append(re.sub(r"^\s*#\|[ ]?", "", line))
    if not option_lines:
        return {}
    try:
        options = yaml.safe_load("\n".join(option_lines))
    except yaml.YAMLError as exc:
        raise BookError(f"{path}:{lineno}: invalid '#|' cell options: {exc}") from exc
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BookError(f"{path}:{lineno}: '#|' cell options are not a YAML mapping")
    return {str(k): v for k, v in options.items()}


def _strip_blank_edges(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def parse_qmd(path: Path) -> Qmd:
    """Parse a ``.qmd`` file into front matter, cells and inline expressions.

    Executable chunks open with a backtick fence whose info string is
    ``{python}`` or ``{python <attrs>}`` and close with a line of at least as
    many backticks (three or more).  Every other fenced block (```` ```bash ````,
    ```` ```{bash} ````, ```` ```{.python} ````, ```` ```{{python}} ````, tildes)
    is markdown and may contain chunk-looking text.  Inline expressions are
    `` `{python} expr` `` spans in prose outside fenced blocks; they are listed
    once per occurrence, in document order.

    Raises:
        BookError: invalid front matter or cell options, or an unclosed chunk.
    """
    path = Path(path)
    front_matter, blocks = _scan(path.read_text(encoding="utf-8"), path)
    cells: list[Cell] = []
    inline: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        lines = _strip_blank_edges(pending)
        if lines:
            cells.append(Cell("markdown", "\n".join(lines), {}))
        pending.clear()

    for block in blocks:
        if block.kind == "chunk":
            flush()
            options = _chunk_options(block.lines, path, block.start)
            cells.append(Cell("code", "\n".join(block.lines), options))
        else:
            pending.extend(block.lines)
            if block.kind == "text":
                inline.extend(m["expr"] for m in _INLINE_EXPR.finditer("\n".join(block.lines)))
    flush()
    return Qmd(path=path, front_matter=front_matter, cells=cells, inline_expressions=inline)


def to_notebook(qmd: Qmd) -> nbformat.NotebookNode:
    """An nbformat v4 notebook (python3 kernelspec) holding *qmd*'s cells in order."""
    nb_cells = [
        nbformat.v4.new_code_cell(cell.source)
        if cell.kind == "code"
        else nbformat.v4.new_markdown_cell(cell.source)
        for cell in qmd.cells
    ]
    return nbformat.v4.new_notebook(
        cells=nb_cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )


# --------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------

_INLINE_SENTINEL = "\x1e__icl_inline_value__\x1e"


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


def _write_atomically(nb: nbformat.NotebookNode, target: Path) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            nbformat.write(nb, handle)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def execute_qmd(
    path: Path,
    root: Path,
    timeout: int = 900,
    env: Mapping[str, str] | None = None,
    save_to: Path | None = None,
) -> dict[str, str]:
    """Execute the Python cells of a ``.qmd`` like Quarto's Jupyter engine.

    The cells run in order in a fresh ``python3`` kernel whose working
    directory is *root* (``execute-dir: project``) and whose environment is
    this process's environment updated with *env*.  Cells with the option
    ``eval: false`` are skipped; cells with ``error: true`` may raise.
    *timeout* is the per-cell limit in seconds.  After all cells, each
    distinct inline expression is evaluated in the same kernel, in order.

    Returns:
        ``{expression: str(value)}`` for the inline expressions.

    Raises:
        ChapterExecutionError: at the first failing cell (``cell_index`` is its
            index among code cells) or failing inline expression
            (``cell_index`` is ``None``); the kernel is shut down and nothing is
            written to *save_to*.

    If *save_to* is given, the executed notebook is written there atomically
    (parent directories are created) once everything succeeded.
    """
    path = Path(path)
    root = Path(root)
    qmd = parse_qmd(path)
    nb = to_notebook(qmd)
    code_cells = [c for c in qmd.cells if c.kind == "code"]

    kernel_env = dict(os.environ)
    if env:
        kernel_env.update({str(k): str(v) for k, v in env.items()})

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(root)}},
        # Quiet the kernel's own start-up log (e.g. its TCP-transport notice); cell errors still surface.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    client.reset_execution_trackers()
    results: dict[str, str] = {}

    def run(
        cell: nbformat.NotebookNode,
        index: int,
        code_index: int | None,
        source: str,
        **kwargs: Any,
    ) -> None:
        try:
            client.execute_cell(cell, index, **kwargs)
        except CellExecutionError as exc:
            raise ChapterExecutionError(
                path, code_index, exc.ename, exc.evalue, source, exc.traceback
            ) from None
        except CellTimeoutError as exc:
            raise ChapterExecutionError(
                path, code_index, "CellTimeoutError", str(exc) or f"timed out after {timeout} s",
                source,
            ) from None
        except DeadKernelError as exc:
            raise ChapterExecutionError(
                path, code_index, "DeadKernelError", str(exc) or "kernel died", source
            ) from None

    with client.setup_kernel(cwd=str(root), env=kernel_env):
        assert client.kc is not None
        info = client.wait_for_reply(client.kc.kernel_info())
        if info is not None and "language_info" in info["content"]:
            nb.metadata["language_info"] = info["content"]["language_info"]

        code_index = -1
        for index, nb_cell in enumerate(list(nb.cells)):
            if nb_cell.cell_type != "code":
                continue
            code_index += 1
            options = code_cells[code_index].options
            if options.get("eval") is False:
                continue
            if options.get("error") is True:
                nb_cell.metadata.setdefault("tags", []).append("raises-exception")
            run(
                nb_cell,
                index,
                code_index,
                nb_cell.source,
                execution_count=client.code_cells_executed + 1,
            )

        for expr in dict.fromkeys(qmd.inline_expressions):
            probe = nbformat.v4.new_code_cell(
                f"print({_INLINE_SENTINEL!r} + __import__('json').dumps("
                f"str(eval(compile({expr!r}, '<inline>', 'eval')))), end='')"
            )
            nb.cells.append(probe)
            try:
                run(probe, len(nb.cells) - 1, None, expr, store_history=False)
            finally:
                nb.cells.pop()
            out = _stdout(probe)
            if _INLINE_SENTINEL not in out:
                raise ChapterExecutionError(path, None, "BookError", "no value came back", expr)
            results[expr] = json.loads(out.rsplit(_INLINE_SENTINEL, 1)[1])

    if save_to is not None:
        _write_atomically(nb, Path(save_to))
    return results


# --------------------------------------------------------------------------
# Structure checks
# --------------------------------------------------------------------------

_KEY = r"\w+(?:[:.#$%&\-+?<>~/]\w+)*"
# '@key' preceded by line start, whitespace, '[', '(', ';' or '*'; '-@key' suppresses the author.
_AT_REF = re.compile(rf"(?<![^\s\[(;*])-?@(?P<key>{_KEY})", re.MULTILINE)
_ATTR_BLOCK = re.compile(r"\{([^{}\n]*)\}")
_ATTR_ID = re.compile(rf"(?:^|\s)#(?P<id>{_KEY})(?=\s|$)")
# a code span may wrap lines but not cross a blank line (paragraph break)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BIB_ENTRY = re.compile(r"^\s*@(?P<type>\w+)\s*[{(]\s*(?P<key>[^,\s{}()]+)\s*,", re.MULTILINE)
_DIV_OPEN = re.compile(r"^\s*:{3,}\s*(?P<attrs>\{.*\}|[^\s:{}].*)$")
_DIV_CLOSE = re.compile(r"^\s*:{3,}\s*$")
_CALLOUT_CLASS = re.compile(r"(?:^|\s)\.callout-[\w-]+(?=\s|$)")
_TITLE_ATTR = re.compile(r"""title\s*=\s*(?:"([^"]*)"|'([^']*)'|(\S+))""")
_COLLAPSE_TRUE = re.compile(r"""(?:^|\s)collapse\s*=\s*(?:"true"|'true'|true)(?=\s|$)""", re.I)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<text>.*)$")
_COMMAND = re.compile(r"(?:^\s*(?:\$\s+)?|`)python -m icl \S", re.MULTILINE)
_CAPTION_OPTIONS = ("fig-cap", "tbl-cap", "fig-subcap", "tbl-subcap")


def _blank(match: re.Match[str]) -> str:
    """Replace a match by spaces, keeping its newlines (and so line numbers)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _prose(text: str) -> str:
    return _CODE_SPAN.sub(_blank, _HTML_COMMENT.sub(_blank, text))


def _crossref_prefix(key: str) -> str | None:
    prefix, sep, _ = key.partition("-")
    if sep and prefix.lower() in CROSSREF_PREFIXES:
        return prefix.lower()
    return None


def _normalise_ref(key: str) -> str:
    prefix, _, rest = key.partition("-")
    return f"{prefix.lower()}-{rest}"


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclass
class _Callout:
    item: int  # position in the file's item sequence
    line: int
    attrs: str
    body: list[str]

    def titles(self) -> list[str]:
        """The ``title=`` attribute and the first heading line of the body."""
        found: list[str] = []
        m = _TITLE_ATTR.search(self.attrs)
        if m:
            found.append(next(g for g in m.groups() if g is not None))
        for line in self.body:
            h = _HEADING.match(line)
            if h:
                found.append(h["text"])
                break
        return found

    def is_reproduce(self) -> bool:
        return any(REPRODUCE_TITLE.lower() in t.lower() for t in self.titles())


@dataclass
class _FileScan:
    rel: str
    labels: list[tuple[str, int]] = field(default_factory=list)
    refs: list[tuple[str, int]] = field(default_factory=list)  # (normalised label, line)
    cites: list[tuple[str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _scan_prose(text: str, first_line: int, scan: _FileScan, ids: bool = True) -> None:
    prose = _prose(text)
    for m in _AT_REF.finditer(prose):
        key, line = m["key"], first_line + prose.count("\n", 0, m.start())
        if _crossref_prefix(key):
            scan.refs.append((_normalise_ref(key), line))
        else:
            scan.cites.append((key, line))
    if not ids:
        return
    for block in _ATTR_BLOCK.finditer(prose):
        for m in _ATTR_ID.finditer(block.group(1)):
            if _crossref_prefix(m["id"]) and m["id"].partition("-")[0].islower():
                line = first_line + prose.count("\n", 0, block.start())
                scan.labels.append((m["id"], line))


class _Item(NamedTuple):
    """One line of prose or of a plain fenced block, or a whole python chunk."""

    kind: str  # "line" | "chunk"
    text: str
    line: int
    fenced: bool


def _find_callouts(items: list[_Item]) -> list[_Callout]:
    """Callout divs (``::: {.callout-* ...}`` ... ``:::``) among one file's items."""
    callouts: list[_Callout] = []
    for i, item in enumerate(items):
        if item.kind != "line" or item.fenced:
            continue
        m = _DIV_OPEN.match(item.text)
        if m is None or not _CALLOUT_CLASS.search(m["attrs"].strip("{} ")):
            continue
        body: list[str] = []
        depth = 1
        for inner in items[i + 1 :]:
            if inner.kind == "line" and not inner.fenced:
                if _DIV_CLOSE.match(inner.text):
                    depth -= 1
                    if depth == 0:
                        break
                elif _DIV_OPEN.match(inner.text):
                    depth += 1
            body.append(inner.text)
        callouts.append(_Callout(i, item.line, m["attrs"].strip().strip("{}").strip(), body))
    return callouts


def _check_figures(blocks: list[_Block], scan: _FileScan) -> None:
    items: list[_Item] = []
    figures: list[tuple[int, str, int, dict[str, object]]] = []  # (item, label, line, options)
    for block in blocks:
        if block.kind == "chunk":
            options = _chunk_options(block.lines, Path(scan.rel), block.start)
            label = options.get("label")
            if isinstance(label, str) and label.startswith("fig-"):
                figures.append((len(items), label, block.start, options))
            items.append(_Item("chunk", "\n".join(block.lines), block.start, False))
        else:
            fenced = block.kind == "fence"
            for offset, line in enumerate(block.lines):
                items.append(_Item("line", line, block.start + offset, fenced))
    if not figures:
        return
    callouts = _find_callouts(items)
    for n, (item, label, line, options) in enumerate(figures):
        where = f"{scan.rel}:{line}: figure cell '{label}'"
        cap = options.get("fig-cap")
        if cap is None or (isinstance(cap, str) and not cap.strip()):
            scan.problems.append(f"{where} has no 'fig-cap' option")
        end = figures[n + 1][0] if n + 1 < len(figures) else len(items)
        reproduce = [
            c for c in callouts
            if item < c.item < end and c.is_reproduce()
        ]
        if not reproduce:
            scan.problems.append(
                f"{where} is not followed by a '{REPRODUCE_TITLE}' callout "
                f"(::: {{.callout-note collapse=\"true\"}}) before the next figure"
            )
            continue
        callout = reproduce[0]
        if not _COLLAPSE_TRUE.search(callout.attrs):
            scan.problems.append(
                f"{scan.rel}:{callout.line}: '{REPRODUCE_TITLE}' callout for '{label}' "
                f"lacks collapse=\"true\""
            )
        if not _COMMAND.search("\n".join(callout.body)):
            scan.problems.append(
                f"{scan.rel}:{callout.line}: '{REPRODUCE_TITLE}' callout for '{label}' "
                f"has no '{REPRODUCE_COMMAND}...' command"
            )


def _scan_file(path: Path, rel: str) -> _FileScan:
    scan = _FileScan(rel)
    try:
        _, blocks = _scan(path.read_text(encoding="utf-8"), Path(rel))
        for block in blocks:
            if block.kind == "text":
                _scan_prose("\n".join(block.lines), block.start, scan)
            elif block.kind == "chunk":
                options = _chunk_options(block.lines, Path(rel), block.start)
                label = options.get("label")
                if isinstance(label, str) and label:
                    scan.labels.append((label, block.start))
                for key in _CAPTION_OPTIONS:
                    for caption in _strings(options.get(key)):
                        _scan_prose(caption.replace("\n", " "), block.start, scan, ids=False)
        _check_figures(blocks, scan)
    except (BookError, OSError, UnicodeDecodeError) as exc:
        scan.problems.append(f"{rel}: cannot be parsed: {exc}")
    return scan


def _bib_keys(bib: Path) -> set[str]:
    text = bib.read_text(encoding="utf-8")
    return {
        m["key"]
        for m in _BIB_ENTRY.finditer(text)
        if m["type"].lower() not in ("comment", "string", "preamble")
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def check_structure(root: Path) -> list[str]:
    """Problems with the book's structure, as human-readable strings.

    Checks that (1) every file listed in ``_quarto.yml`` exists; (2) every
    ``.qmd`` under ``report/`` is listed (``_``-prefixed include files are
    exempt); (3) every ``@fig-``/``@tbl-``/``@sec-``/``@eq-`` cross-reference
    (also capitalised, e.g. ``@Fig-x``) resolves to a label defined in the
    listed files (``#| label:`` options or ``{#fig-x}``-style attributes);
    (4) no label is defined twice; (5) every other ``@key`` citation in prose
    or captions is in ``references.bib``; (6) figure cells (``label: fig-...``)
    have ``fig-cap``; (7) each figure cell is followed, before the next one,
    by a ``collapse="true"`` callout titled "Reproduce this figure" holding a
    ``python -m icl ...`` command.  Fenced blocks, inline code, HTML comments
    and e-mail addresses are not scanned for references.  An empty list means
    the book is fine.
    """
    root = Path(os.path.abspath(root))
    try:
        entries = _listed_entries(root)
    except BookError as exc:
        return [f"_quarto.yml: {exc}"]

    problems: list[str] = []
    listed: list[Path] = []
    for entry in entries:
        path = _abs(root, entry)
        if not path.is_file():
            problems.append(f"_quarto.yml lists '{entry}', which does not exist")
        elif path not in listed:
            listed.append(path)

    report = root / "report"
    if report.is_dir():
        for qmd in sorted(report.rglob("*.qmd")):
            parts = qmd.relative_to(report).parts
            if any(p.startswith(("_", ".")) for p in parts):
                continue
            if _abs(root, str(qmd)) not in listed:
                problems.append(f"{_relative(qmd, root)} is not listed in _quarto.yml")

    scans = [
        _scan_file(path, _relative(path, root))
        for path in listed
        if path.suffix in (".qmd", ".md")
    ]

    defined: dict[str, list[str]] = {}
    for scan in scans:
        for label, line in scan.labels:
            defined.setdefault(label, []).append(f"{scan.rel}:{line}")
    for label, places in defined.items():
        if len(places) > 1:
            problems.append(f"label '{label}' is defined {len(places)} times: {', '.join(places)}")

    bib = root / "references.bib"
    bib_keys = _bib_keys(bib) if bib.is_file() else set()
    for scan in scans:
        problems.extend(scan.problems)
        for ref, line in scan.refs:
            if ref not in defined:
                problems.append(
                    f"{scan.rel}:{line}: cross-reference '@{ref}' has no matching label"
                )
        for key, line in scan.cites:
            if key not in bib_keys:
                missing = "" if bib.is_file() else " (references.bib does not exist)"
                problems.append(
                    f"{scan.rel}:{line}: citation '@{key}' is not in references.bib{missing}"
                )
    return problems


# --------------------------------------------------------------------------
# Real Quarto, where available
# --------------------------------------------------------------------------


def quarto_executable() -> str | None:
    """The path of the ``quarto`` executable, or ``None`` when not installed."""
    return shutil.which("quarto")


def render(root: Path, timeout: int = 1800) -> None:
    """Run ``quarto render`` in *root*.

    Raises:
        BookError: Quarto is not installed, timed out, or exited non-zero (the
            message carries the tail of its output).
    """
    exe = quarto_executable()
    if exe is None:
        raise BookError("quarto is not installed (not found on PATH)")
    try:
        proc = subprocess.run(
            [exe, "render"],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode(
            "utf-8", "replace"
        )
        raise BookError(f"quarto render timed out after {timeout} s:\n{out[-4000:]}") from exc
    if proc.returncode != 0:
        raise BookError(
            f"quarto render failed (exit {proc.returncode}):\n{(proc.stdout or '')[-4000:]}"
        )
