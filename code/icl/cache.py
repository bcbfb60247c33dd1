"""A content-addressed store of experiment results, so that rendering the book never recomputes.

An entry is identified by the sha256 of the canonical JSON of everything that determines the result:
experiment name and version, model id and weights fingerprint, dtype, a hash of the prompts or data,
the parameters and the seed (:func:`key_of`). Change any of them and the key changes, so a stale
result is never loaded; bump an experiment's ``VERSION`` when its code changes what it computes.

On disk an entry is a folder ``<cache_dir>/<experiment>/<key[:16]>/`` with

* ``arrays.npz`` — numpy arrays (no pickles), and
* ``meta.json`` — the key, its inputs, small JSON results, checksums of both payloads, and provenance
  (time, git commit, library versions, device).

Writes go to a hidden temporary folder that is renamed into place, so a crash never leaves a
half-written entry under a real name. Every load re-derives the key from the stored inputs and checks
both checksums, so a truncated or edited entry raises :class:`~icl.errors.CacheCorruptError` instead of
being used.

Three modes (``ICL_CACHE``): ``use`` loads when possible and computes otherwise, ``refresh`` always
recomputes and replaces, ``readonly`` loads or raises :class:`~icl.errors.CacheMissError` — it never
loads a model, which is what the book's render and the tests use.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from icl.config import REPO_ROOT
from icl.errors import CacheCorruptError

FORMAT = 1
KEY_PREFIX_LEN = 16


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_of(key_inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key_inputs).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_digest(data: Any) -> str:
    """The checksum of an entry's JSON results (``data_sha256``)."""
    return _sha256(canonical_json(data).encode())


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=1) + "\n").encode()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, experiment: str, key: str) -> Path:
        return self.root / experiment / key[:KEY_PREFIX_LEN]

    # ----------------------------------------------------------------------------------- reading
    def read(self, path: Path) -> Entry:
        """Load and verify the entry in ``path``; raise CacheCorruptError if anything is off."""
        path = Path(path)

        def bad(reason: str) -> CacheCorruptError:
            return CacheCorruptError(
                f"cache entry {path} is corrupt ({reason}); it was not used. Delete it, or recompute "
                "with --force (ICL_CACHE=refresh)"
            )

        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise bad("meta.json is missing") from None
        except (OSError, ValueError) as exc:
            raise bad(f"meta.json is unreadable: {exc}") from None
        required = ("format", "experiment", "key", "key_inputs", "data", "arrays_sha256", "data_sha256")
        if not isinstance(meta, dict) or any(k not in meta for k in required):
            raise bad("meta.json lacks required fields")
        if meta["format"] != FORMAT:
            raise bad(f"format {meta['format']} is not {FORMAT}")
        key = key_of(meta["key_inputs"])
        if key != meta["key"] or path.name != key[:KEY_PREFIX_LEN]:
            raise bad("its key inputs no longer hash to its key")
        if meta["key_inputs"].get("experiment") != meta["experiment"] or path.parent.name != meta["experiment"]:
            raise bad("experiment name does not match its folder")
        if data_digest(meta["data"]) != meta["data_sha256"]:
            raise bad("its JSON results do not match their checksum")
        try:
            raw = (path / "arrays.npz").read_bytes()
        except FileNotFoundError:
            raise bad("arrays.npz is missing") from None
        if _sha256(raw) != meta["arrays_sha256"]:
            raise bad("arrays.npz does not match its checksum (truncated or modified)")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except Exception as exc:  # noqa: BLE001 - any decoding failure means corrupt
            raise bad(f"arrays.npz cannot be decoded: {exc}") from None
        return Entry(meta["experiment"], key, path, meta, arrays)

    def load(self, key_inputs: dict[str, Any]) -> Entry | None:
        """The verified entry for these key inputs, None if there is none (corrupt entries raise)."""
        path = self.path_for(key_inputs["experiment"], key_of(key_inputs))
        if not path.exists():
            return None
        return self.read(path)

    def entries(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for exp in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for entry in sorted(p for p in exp.iterdir() if p.is_dir() and not p.name.startswith(".")):
                yield entry

    def leftovers(self) -> list[Path]:
        """Temporary folders from interrupted writes (never read; safe to delete)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*/.*") if p.is_dir())

    # ----------------------------------------------------------------------------------- writing
    def store(self, key_inputs: dict[str, Any], arrays: dict[str, np.ndarray], data: dict[str, Any],
              provenance: dict[str, Any] | None = None) -> Entry:
        """Write an entry atomically (temporary folder, then rename) and return it, verified."""
        experiment = key_inputs["experiment"]
        key = key_of(key_inputs)
        final = self.path_for(experiment, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        raw = buf.getvalue()
        data = json.loads(canonical_json(data))  # fail early on NaN or non-JSON values
        meta = {
            "format": FORMAT,
            "experiment": experiment,
            "key": key,
            "key_inputs": key_inputs,
            "data": data,
            "data_sha256": data_digest(data),
            "arrays_sha256": _sha256(raw),
            "arrays": {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in arrays.items()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            **(provenance or {}),
        }
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = final.parent / f".{final.name}.tmp-{tag}"
        old = final.parent / f".{final.name}.old-{tag}"
        tmp.mkdir()
        try:
            for name, payload in (("arrays.npz", raw), ("meta.json", _meta_bytes(meta))):
                with open(tmp / name, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return self.read(final)

    def reseal(self, path: Path, edit: Callable[[dict[str, Any]], None]) -> Entry:
        """Change an entry's meta.json in place — ``edit`` modifies a copy of its meta; the key inputs and
        arrays must stay as they are — recompute its checksums and replace the file atomically. For
        migrating committed entries to a new layout without recomputing them."""
        entry = self.read(path)
        meta = json.loads(json.dumps(entry.meta))
        edit(meta)
        if meta["key_inputs"] != entry.key_inputs or meta["arrays_sha256"] != entry.meta["arrays_sha256"]:
            raise ValueError("reseal may not change an entry's key inputs or arrays")
        meta["data_sha256"] = data_digest(meta["data"])
        tmp = entry.path / f".meta.json.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(_meta_bytes(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry.path / "meta.json")
        return self.read(entry.path)
