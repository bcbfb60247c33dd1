"""Quarto's freezer, made to notice when a chapter's cached results change.

With ``execute: freeze: auto`` Quarto re-executes a chapter only when its ``.qmd`` source changes: the
outputs of the last execution are kept under ``_freeze/<chapter>/execute-results/`` and reused. The
chapters of this book compute nothing, but they read results from ``cache/``, so a chapter must also be
re-executed when an entry it read is recomputed, when an experiment's code changes its cache key, or
when the book is pointed at another model (``ICL_MODEL``). Quarto cannot know that; this module tells it.

* While Quarto executes a chapter, :meth:`icl.book.Book.load` calls :func:`record` for every entry the
  chapter reads: the experiment, its parameters, the entry's key and the SHA-256 of its ``meta.json``
  (which holds the checksums of its arrays and results). They are written beside Quarto's own freeze
  results, in ``_freeze/_icl/<chapter>.json``.
* Before every render, Quarto runs ``code/pre_render.py`` (``project: pre-render`` in ``_quarto.yml``),
  which calls :func:`thaw`: for each frozen chapter it derives the key each recorded experiment has
  *now* (current code, model and parameters) and compares key and digest with the record. A chapter with
  any difference, or with no record, loses its freeze results, so Quarto executes it again; the others
  are reused as they are.

Nothing is recorded outside a Quarto render (the variables ``QUARTO_PROJECT_ROOT``,
``QUARTO_DOCUMENT_PATH`` and ``QUARTO_DOCUMENT_FILE`` that Quarto sets tell where the chapter is).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

def _freeze_dir(root: Path, document: Path) -> Path:
    """Quarto's freezer folder of one document (``report/04-patching.qmd`` -> ``_freeze/report/04-patching``)."""
    rel = document.resolve().relative_to(root.resolve())
    return root / "_freeze" / rel.with_suffix("")


def record_path(root: Path, document: Path) -> Path:
    """Where the entries a document read are kept: ``_freeze/_icl/report/04-patching.json``.

    Not inside the document's own freezer folder, which Quarto copies back into the source tree when it
    reuses a frozen chapter and expects to hold only folders; no document can map to ``_icl``.
    """
    rel = document.resolve().relative_to(root.resolve())
    return root / "_freeze" / "_icl" / rel.with_suffix(".json")


def _current_document() -> tuple[Path, Path] | None:
    root, folder, name = (os.environ.get(v) for v in
                          ("QUARTO_PROJECT_ROOT", "QUARTO_DOCUMENT_PATH", "QUARTO_DOCUMENT_FILE"))
    if not (root and folder and name):
        return None
    document = Path(folder, name) if Path(folder).is_absolute() else Path(root, folder, name)
    try:
        document.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    return Path(root), document


def digest(meta_json: Path) -> str:
    return hashlib.sha256(meta_json.read_bytes()).hexdigest()


def start() -> None:
    """Forget what the current chapter read before (called when a chapter's setup cell runs)."""
    where = _current_document()
    if where is not None:
        record_path(*where).unlink(missing_ok=True)


def record(name: str, overrides: dict[str, str], key: str, meta_json: Path) -> None:
    """Note that the chapter being executed read entry ``key`` of experiment ``name``."""
    where = _current_document()
    if where is None:
        return
    path = record_path(*where)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(path.read_text()) if path.is_file() else []
    item = {"experiment": name, "params": overrides, "key": key, "meta_sha256": digest(meta_json),
            "meta": str(meta_json)}
    if item not in entries:
        entries.append(item)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, path)


def why_stale(root: Path, document: Path) -> str | None:
    """Why the frozen results of ``document`` no longer match the cache, or ``None`` if they do."""
    from icl import experiments
    from icl.cache import key_of
    from icl.config import Config
    from icl.errors import ICLError

    folder = _freeze_dir(root, document)
    if not (folder / "execute-results").is_dir():
        return None  # not frozen: Quarto executes it anyway
    path = record_path(root, document)
    if not path.is_file():
        if "book.load(" not in document.read_text(encoding="utf-8"):
            return None  # executed code that reads no cache entry: nothing to compare
        return "no record of the cache entries it read"
    try:
        entries: list[dict[str, Any]] = json.loads(path.read_text())
    except (OSError, ValueError):
        return "its record of cache entries is unreadable"
    config = Config.from_env()
    for item in entries:
        name = item["experiment"]
        try:
            module = experiments.get(name)
            params = experiments.make_params(module, item["params"])
            key = key_of(experiments.key_inputs(module, params, config))
        except ICLError as exc:
            return f"{name}: {exc}"
        if key != item["key"]:
            return f"{name} now has another cache key (code, model or parameters changed)"
        meta = experiments.cache_for(module, params, config).path_for(name, key) / "meta.json"
        if not meta.is_file():
            return f"{name}: its cache entry is gone"
        if digest(meta) != item["meta_sha256"]:
            return f"{name}: its cache entry changed (recomputed or rewritten)"
    return None


def thaw(root: Path, documents: list[Path]) -> list[tuple[Path, str]]:
    """Remove the frozen results of every document whose cache entries changed; returns (doc, why)."""
    thawed = []
    for document in documents:
        why = why_stale(root, document)
        if why is not None:
            shutil.rmtree(_freeze_dir(root, document) / "execute-results", ignore_errors=True)
            thawed.append((document, why))
    return thawed


def main() -> int:
    """Quarto's pre-render step (see the module docstring)."""
    from icl import quarto

    root = Path(os.environ.get("QUARTO_PROJECT_ROOT") or Path.cwd())
    for document, why in thaw(root, quarto.book_files(root)):
        print(f"icl: {document.relative_to(root)} will be executed again: {why}", file=sys.stderr)
    return 0
