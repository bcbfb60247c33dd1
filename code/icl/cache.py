"""A content-addressed store of experiment results, so that rendering the book never recomputes.

An entry is identified by the sha256 of the canonical JSON of everything that determines the result:
experiment name and version, model id and weights fingerprint, dtype, a hash of the prompts or data,
the parameters and the seed (:func:`key_of`). Change any of them and the key changes, so a stale
result is never loaded; bump an experiment's ``VERSION`` when its code changes what it computes.

On disk an entry is a folder ``<cache_dir>/<experiment>/<key[:16]>/`` with

* ``arrays.npz`` — numpy arrays (no pickles), and
* ``meta.json`` — the key, its inputs, small JSON results, provenance (time, git commit, library
  versions, device, timings) and checksums: of the arrays, of the JSON results, and of the whole of
  meta.json itself (``meta_sha256``), so an edited provenance field is caught like an edited result.

Writes go to a hidden temporary folder ``.<key16>.tmp-<pid>-<tag>`` that is renamed into place, so a
crash never leaves a half-written entry under a real name. Replacing an existing entry takes two
renames — the old entry to ``.<key16>.old-<pid>-<tag>``, then the new one into place — and a kill
between them leaves the good old entry only under its hidden name: whoever next looks for the entry
verifies that copy and renames it back (:meth:`Cache.recover`). When two processes write the same key
at once, each rename either succeeds or finds the other's complete entry there, which it keeps (same
key, same result). Temporary and superseded folders left by processes that are no longer running and
that are older than the current one are removed by :meth:`Cache.clean` (on every write, and by
``python -m icl cache status``).

Every load re-derives the key from the stored inputs and checks every checksum, so a truncated or
edited entry raises :class:`~icl.errors.CacheCorruptError` instead of being used; the message says how
to restore it (``git checkout`` for a committed entry, otherwise delete it and recompute).

Three modes (``ICL_CACHE``): ``use`` loads when possible and computes otherwise, ``refresh`` always
recomputes and replaces, ``readonly`` loads or raises :class:`~icl.errors.CacheMissError` — it never
loads a model, which is what the book's render and the tests use.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from icl.config import REPO_ROOT
from icl.errors import CacheCorruptError, CacheDirError

FORMAT = 2
KEY_PREFIX_LEN = 16
PROCESS_START = time.time()  # leftovers older than this process, of a process that is gone, are stale
_LEFTOVER = re.compile(r"^\.(?P<name>[^.]+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]+)$")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_of(key_inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key_inputs).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_digest(data: Any) -> str:
    """The checksum of an entry's JSON results (``data_sha256``)."""
    return _sha256(canonical_json(data).encode())


def meta_digest(meta: dict[str, Any]) -> str:
    """The checksum of a whole meta.json (``meta_sha256``): everything in it but that field."""
    return _sha256(canonical_json({k: v for k, v in meta.items() if k != "meta_sha256"}).encode())


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """Set ``format``, ``data_sha256`` and ``meta_sha256`` of ``meta`` (in place) and return it."""
    meta["format"] = FORMAT
    meta["data_sha256"] = data_digest(meta["data"])
    meta.pop("meta_sha256", None)
    meta["meta_sha256"] = meta_digest(meta)
    return meta


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=1) + "\n").encode()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def restore_advice(path: Path) -> str:
    """How to get a good copy of the entry in ``path``: from git if it is committed, else recompute."""
    path = Path(path).absolute()
    folder = path if path.is_dir() else path.parent
    try:
        top = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        tracked = top and subprocess.run(
            ["git", "-C", top, "ls-files", "--error-unmatch", "--", str(path)],
            capture_output=True, text=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        tracked = False
    if tracked:
        rel = path.relative_to(Path(top).resolve()) if path.is_relative_to(Path(top).resolve()) else path
        where = "" if Path.cwd().resolve() == Path(top).resolve() else f"-C {top} "
        return f"It is committed: restore it with `git {where}checkout -- {rel}`"
    return f"Delete it (rm -r {path}) and run the same command again to recompute it"


class Vanished(FileNotFoundError):
    """An entry folder disappeared while being read: another process replaced it."""


def _read_entry_files(path: Path, attempts: int = 5) -> tuple[str | None, bytes | None]:
    """meta.json's text and arrays.npz's bytes (None where missing) of one and the same entry folder.

    Both files are opened relative to one handle on the folder, so a concurrent writer that renames the
    folder away (replacing the entry) cannot mix two entries; if it deletes the old folder before both
    files are read, the folder now under ``path`` (the new entry) is read instead."""
    if os.open not in os.supports_dir_fd:  # pragma: no cover - not on Linux or macOS
        text = (path / "meta.json").read_text() if (path / "meta.json").exists() else None
        return text, ((path / "arrays.npz").read_bytes() if (path / "arrays.npz").exists() else None)
    for _ in range(attempts):
        try:
            folder = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise Vanished(f"{path} disappeared while being read") from None
        try:
            got: list[bytes | None] = []
            for name in ("meta.json", "arrays.npz"):
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=folder)
                except FileNotFoundError:
                    got.append(None)
                    continue
                with os.fdopen(fd, "rb") as f:
                    got.append(f.read())
            inode = os.fstat(folder).st_ino
        finally:
            os.close(folder)
        try:
            replaced = os.stat(path).st_ino != inode
        except FileNotFoundError:
            replaced = True
        if None not in got or not replaced:
            break
    return (got[0].decode() if got[0] is not None else None), got[1]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours, or we cannot tell: leave its folders alone
        return True
    return True


@dataclass(frozen=True)
class Entry:
    experiment: str
    key: str
    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def data(self) -> dict[str, Any]:
        return self.meta["data"]

    @property
    def key_inputs(self) -> dict[str, Any]:
        return self.meta["key_inputs"]

    @property
    def timing(self) -> dict[str, float]:
        """Seconds per stage, as the experiment recorded them (provenance, not results)."""
        return self.meta.get("timing", {})


@dataclass(frozen=True)
class Leftover:
    """A hidden folder in an experiment's folder: ``kind`` is ``tmp`` (a write in progress or
    abandoned), ``old`` (a replaced entry) or ``unknown``; ``stale`` when its process is gone and it is
    older than this process, so that removing it cannot disturb anyone."""

    path: Path
    kind: str
    pid: int | None
    stale: bool

    def describe(self) -> str:
        if self.kind == "unknown":
            return f"unknown hidden folder (not written by icl; never read): {self.path}"
        what = "temporary folder of an interrupted write" if self.kind == "tmp" else "replaced entry"
        state = (f"process {self.pid} is gone: removed by the next write or `python -m icl cache status`"
                 if self.stale else f"process {self.pid} may still be using it")
        return f"{what} ({state}): {self.path}"


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CacheDirError(f"the cache folder {self.root} is a file, not a folder; point ICL_CACHE_DIR "
                                "at a folder (it is created if missing)")

    def path_for(self, experiment: str, key: str) -> Path:
        return self.root / experiment / key[:KEY_PREFIX_LEN]

    # ----------------------------------------------------------------------------------- reading
    def read(self, path: Path, *, name: str | None = None, formats: tuple[int, ...] = (FORMAT,)) -> Entry:
        """Load and verify the entry in ``path``; raise CacheCorruptError if anything is off. ``name``: the
        folder name the entry belongs under (default: ``path``'s own); ``formats``: those accepted."""
        path = Path(path)
        name = name or path.name

        def bad(reason: str) -> CacheCorruptError:
            return CacheCorruptError(f"cache entry {path} is corrupt ({reason}); it was not used. "
                                     + restore_advice(path))

        try:
            text, raw = _read_entry_files(path)
        except Vanished:
            raise
        except OSError as exc:
            raise bad(f"its files are unreadable: {exc}") from None
        if text is None:
            raise bad("meta.json is missing")
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise bad(f"meta.json is unreadable: {exc}") from None
        if not isinstance(meta, dict) or "format" not in meta:
            raise bad("meta.json lacks required fields")
        if meta["format"] not in formats:
            older = isinstance(meta["format"], int) and meta["format"] < FORMAT
            raise bad(f"it is in format {meta['format']}"
                      + (f", written by an older version of icl; this one reads format {FORMAT}" if older else ""))
        required = ("experiment", "key", "key_inputs", "data", "arrays_sha256", "data_sha256")
        if any(k not in meta for k in required + (("meta_sha256",) if meta["format"] >= 2 else ())):
            raise bad("meta.json lacks required fields")
        if meta["format"] >= 2 and meta_digest(meta) != meta["meta_sha256"]:
            raise bad("meta.json does not match its checksum (edited or truncated)")
        try:
            key = key_of(meta["key_inputs"])
        except (TypeError, ValueError) as exc:
            raise bad(f"its key inputs cannot be hashed: {exc}") from None
        if key != meta["key"] or name != key[:KEY_PREFIX_LEN]:
            raise bad("its key inputs no longer hash to its key")
        if not isinstance(meta["key_inputs"], dict) or meta["key_inputs"].get("experiment") != meta["experiment"] \
                or path.parent.name != meta["experiment"]:
            raise bad("experiment name does not match its folder")
        try:
            if data_digest(meta["data"]) != meta["data_sha256"]:
                raise bad("its JSON results do not match their checksum")
        except ValueError as exc:
            raise bad(f"its JSON results are not valid: {exc}") from None
        if raw is None:
            raise bad("arrays.npz is missing")
        if _sha256(raw) != meta["arrays_sha256"]:
            raise bad("arrays.npz does not match its checksum (truncated or modified)")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                arrays = {n: npz[n] for n in npz.files}
        except Exception as exc:  # noqa: BLE001 - any decoding failure means corrupt
            raise bad(f"arrays.npz cannot be decoded: {exc}") from None
        return Entry(meta["experiment"], key, path, meta, arrays)

    def load(self, key_inputs: dict[str, Any]) -> Entry | None:
        """The verified entry for these key inputs, None if there is none (corrupt entries raise). While
        another process is replacing the entry (between its two renames) this waits for it."""
        path = self.path_for(key_inputs["experiment"], key_of(key_inputs))
        for _ in range(200):
            if path.exists() or self.recover(path) or path.exists():
                try:
                    return self.read(path)
                except Vanished:
                    pass  # replaced under our feet: look again
            elif not any(left.path.name.startswith(f".{path.name}.") and left.pid is not None and _alive(left.pid)
                         for left in self.leftover_info(path.parent.name)):
                return None  # no write of this entry in progress
            time.sleep(0.01)
        return None

    def recover(self, path: Path) -> bool:
        """If the entry ``path`` is missing but a replaced copy of it (``.<name>.old-*``, left by a
        write killed between its two renames) verifies, rename that copy back. True if it did."""
        if path.exists() or not path.parent.is_dir():
            return False
        olds = [p for p in path.parent.glob(f".{path.name}.old-*") if p.is_dir()]
        for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                self.read(old, name=path.name)
                os.rename(old, path)
                return True
            except (CacheCorruptError, OSError):
                if path.exists():  # someone else put an entry there meanwhile
                    return False
        return False

    def entries(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for exp in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for left in self.leftover_info(exp.name):
                m = _LEFTOVER.match(left.path.name)
                if m and m["kind"] == "old":
                    self.recover(exp / m["name"])
            for entry in sorted(p for p in exp.iterdir() if p.is_dir() and not p.name.startswith(".")):
                yield entry

    def leftover_info(self, experiment: str | None = None) -> list[Leftover]:
        """Hidden folders in the experiment folders (or one of them): never read as entries."""
        if not self.root.is_dir():
            return []
        pattern = f"{experiment}/.*" if experiment else "*/.*"
        out = []
        for path in sorted(p for p in self.root.glob(pattern) if p.is_dir()):
            m = _LEFTOVER.match(path.name)
            if m is None:
                out.append(Leftover(path, "unknown", None, False))
                continue
            pid = int(m["pid"])
            try:
                old_enough = path.stat().st_mtime < PROCESS_START
            except OSError:
                continue  # removed meanwhile
            out.append(Leftover(path, m["kind"], pid, old_enough and not _alive(pid)))
        return out

    def leftovers(self) -> list[Path]:
        """Hidden folders from interrupted or replaced writes (and any other hidden folder)."""
        return [left.path for left in self.leftover_info()]

    def clean(self, experiment: str | None = None) -> list[Path]:
        """Recover entries whose only copy is a replaced one, then remove stale leftovers. Returns what
        was removed."""
        removed = []
        for left in self.leftover_info(experiment):
            m = _LEFTOVER.match(left.path.name)
            if m and m["kind"] == "old" and self.recover(left.path.parent / m["name"]):
                continue
            if left.stale and left.path.exists():
                shutil.rmtree(left.path, ignore_errors=True)
                removed.append(left.path)
        return removed

    # ----------------------------------------------------------------------------------- writing
    def check_writable(self, experiment: str | None = None) -> None:
        """Raise CacheDirError unless an entry of ``experiment`` could be written: the folder exists and
        is writable, or can be created. Run before any compute, so nothing is computed in vain."""
        target = self.root / experiment if experiment else self.root
        probe = target
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise CacheDirError(f"cannot write results under {target}: {probe} is a file, not a folder; "
                                "point ICL_CACHE_DIR at a folder you can write")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise CacheDirError(f"cannot write results under {target}: {probe} is not writable; point "
                                "ICL_CACHE_DIR at a folder you can write, or make this one writable")

    def store(self, key_inputs: dict[str, Any], arrays: dict[str, np.ndarray], data: dict[str, Any],
              provenance: dict[str, Any] | None = None) -> Entry:
        """Write an entry atomically (temporary folder, then rename) and return it, verified."""
        experiment = key_inputs["experiment"]
        key = key_of(key_inputs)
        final = self.path_for(experiment, key)
        self.check_writable(experiment)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.clean(experiment)
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        raw = buf.getvalue()
        data = json.loads(canonical_json(data))  # fail early on NaN or non-JSON values
        meta = seal({
            "format": FORMAT,
            "experiment": experiment,
            "key": key,
            "key_inputs": key_inputs,
            "data": data,
            "data_sha256": "",
            "arrays_sha256": _sha256(raw),
            "arrays": {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in arrays.items()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            **json.loads(canonical_json(provenance or {})),
        })
        tmp = final.parent / f".{final.name}.tmp-{_tag()}"
        tmp.mkdir()
        olds: list[Path] = []
        try:
            self._write(tmp, {"arrays.npz": raw, "meta.json": _meta_bytes(meta)})
            self._install(tmp, final, olds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for old in olds:
                shutil.rmtree(old, ignore_errors=True)
        entry = self.load(key_inputs)  # ours, or that of a concurrent writer of the same key
        if entry is None:
            raise CacheCorruptError(f"the entry {final} disappeared right after it was written")
        return entry

    @staticmethod
    def _write(folder: Path, files: dict[str, bytes]) -> None:
        for name, payload in files.items():
            with open(folder / name, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _install(tmp: Path, final: Path, olds: list[Path], attempts: int = 10) -> None:
        """Rename ``tmp`` to ``final``; an entry already there is first renamed to a hidden ``.old-*``
        name (recoverable, see :meth:`recover`) and appended to ``olds``. If other writers keep putting
        their entry for the same key in place, theirs is kept."""
        for _ in range(attempts):
            try:
                os.rename(tmp, final)  # atomic; fails while final is a non-empty folder
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = final.parent / f".{final.name}.old-{_tag()}"
            try:
                os.rename(final, old)
            except FileNotFoundError:
                continue  # another writer moved it: try again
            olds.append(old)

    def reseal(self, path: Path, edit: Callable[[dict[str, Any]], None], *,
               formats: tuple[int, ...] = (FORMAT,)) -> Entry:
        """Change an entry's meta.json in place — ``edit`` modifies a copy of its meta; the key inputs and
        arrays must stay as they are — recompute its checksums in the current format and replace the
        file atomically. For migrating committed entries to a new layout without recomputing them;
        ``formats`` are those accepted on reading."""
        entry = self.read(path, formats=formats)
        meta = json.loads(json.dumps(entry.meta))
        edit(meta)
        if meta["key_inputs"] != entry.key_inputs or meta["arrays_sha256"] != entry.meta["arrays_sha256"]:
            raise ValueError("reseal may not change an entry's key inputs or arrays")
        seal(meta)
        tmp = entry.path / f".meta.json.tmp-{_tag()}"
        self._write(entry.path, {tmp.name: _meta_bytes(meta)})
        os.replace(tmp, entry.path / "meta.json")
        return self.read(entry.path)


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
