"""Benchmark: every experiment computed from nothing, with worker processes, against the committed entries.

Run from the repository root, with the venv set up:

    python benchmarks/cold_compute.py [--jobs 2] [--out DIR]

It computes every experiment into an empty cache folder (``--out``, a temporary folder by default) with
:func:`icl.schedule.run_many` (``--jobs`` processes, one torch thread each, in ``DEPENDS`` order) and
prints:

* per experiment: its wall time in this run (model loading included, while sharing the machine with the
  other job), the ``elapsed_s`` of the entry committed under ``cache/`` (the baseline: the same
  experiment at the version committed before, computed one at a time), their ratio, and whether the
  result is identical to the committed entry (same key and same data and arrays) or new (a new key:
  the experiment's version changed);
* the total wall time against the sum of the baselines, and their ratio;
* per chapter, the cold time to reproduce that chapter alone (its experiments and their dependencies),
  projected by scheduling this run's per-experiment times on ``--jobs`` workers the way
  :func:`icl.schedule.run_many` does (the ready experiment heading the longest chain first).

With ``--reference REV`` it also checks that the statistics did not move: for every experiment it reads
the entry committed at git revision ``REV`` (for example the last float32 run before an experiment
moved to bf16, or before a faster kernel) and counts the new point estimates that fall inside the old
95% intervals: every array triple ``X.mean``/``X.lo``/``X.hi`` and every ``[mean, low, high]`` triple (or value ``X`` with
``X_ci``) in the entry's data, with the largest excursion outside an interval in units of that interval's width.
``--compare DIR`` does only that check, for the entries already in ``DIR`` (no computing).

The targets of the project are at most 20 minutes for everything and 6 minutes for any one chapter on
two cores. Timings depend on the machine and its load; this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from icl import experiments, quarto, schedule  # noqa: E402
from icl.cache import Cache  # noqa: E402
from icl.config import Config  # noqa: E402


def _equal(x: np.ndarray, y: np.ndarray) -> bool:
    """Bit-for-bit equal values, NaN where the other has NaN (undefined entries are stored as NaN)."""
    return np.array_equal(x, y, equal_nan=bool(np.issubdtype(x.dtype, np.floating)))


def same_result(name: str, key: str, out: Path) -> str:
    old = Cache(ROOT / "cache")
    if not old.path_for(name, key).exists():
        return "new key"
    a, b = old.read(old.path_for(name, key)), Cache(out).read(Cache(out).path_for(name, key))
    same_arrays = a.arrays.keys() == b.arrays.keys() and all(
        a.arrays[k].dtype == b.arrays[k].dtype and _equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    return "identical" if same_arrays and a.meta["data_sha256"] == b.meta["data_sha256"] else "DIFFERS"


def reference_cache(rev: str) -> Path:
    """The ``cache/`` folder as committed at git revision ``rev``, extracted into a temporary folder."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "cache"], check=True, capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="icl-ref-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(folder, filter="data")
    return folder / "cache"


def _triples_in(data: object, path: str = "") -> dict[str, tuple[float, float, float]]:
    """``[mean, low, high]`` lists anywhere in an entry's data, by their JSON path."""
    out: dict[str, tuple[float, float, float]] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            ci = data.get(f"{k}_ci")  # {"c": value, "c_ci": [low, high]}
            if isinstance(v, (int, float)) and isinstance(ci, list) and len(ci) == 2 and ci[0] <= v <= ci[1] < float("inf") \
                    and ci[0] < ci[1]:
                out[f"{path}/{k}"] = (float(v), float(ci[0]), float(ci[1]))
            out.update(_triples_in(v, f"{path}/{k}"))
    elif isinstance(data, list):
        if len(data) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data) \
                and data[1] <= data[0] <= data[2] and data[1] < data[2]:
            out[path] = (float(data[0]), float(data[1]), float(data[2]))
        else:
            for i, v in enumerate(data):
                out.update(_triples_in(v, f"{path}/{i}"))
    return out


def compare(name: str, new: Path, ref: Path) -> str:
    """How many of the new entry's point estimates lie inside the reference entry's 95% intervals."""
    def only(root: Path):
        folder = root / name
        keys = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.exists() else []
        return Cache(root).read(max(keys, key=lambda p: p.stat().st_mtime)) if keys else None  # the newest

    a, b = only(ref), only(new)
    if a is None or b is None:
        return "no entry to compare"
    inside = total = 0
    worst = 0.0
    for k in a.arrays:
        if not k.endswith(".mean"):
            continue
        stem = k[: -len(".mean")]
        if not all(f"{stem}.{s}" in a.arrays and f"{stem}.{s}" in b.arrays for s in ("lo", "hi", "mean")):
            continue
        lo, hi, m = a.arrays[f"{stem}.lo"], a.arrays[f"{stem}.hi"], b.arrays[f"{stem}.mean"]
        if lo.shape != m.shape:
            continue
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(m) & (hi > lo)
        width = np.where(ok, hi - lo, 1.0)
        out = np.where(ok, np.maximum(lo - m, m - hi) / width, 0.0)
        inside += int((ok & (out <= 0)).sum())
        total += int(ok.sum())
        worst = max(worst, float(out.max(initial=0.0)))
    ta, tb = _triples_in(a.data), _triples_in(b.data)
    for path in ta.keys() & tb.keys():
        _, lo, hi = ta[path]
        m = tb[path][0]
        out = max(lo - m, m - hi) / (hi - lo)
        inside += out <= 0
        total += 1
        worst = max(worst, out)
    if not total:
        return "no intervals in common"
    return f"{inside}/{total} new estimates inside the reference intervals ({100 * inside / total:.1f}%), " \
           f"largest excursion {worst:.2f} interval widths"


def project(names: list[str], seconds: dict[str, float], jobs: int) -> float:
    """Wall time of computing ``names`` and their dependencies on ``jobs`` workers (list scheduling)."""
    todo = schedule.closure(names)
    priority = schedule.critical_path(todo, seconds)
    finish: dict[str, float] = {}
    workers = [0.0] * jobs
    pending = list(todo)
    while pending:
        ready = [n for n in pending if all(d in finish for d in getattr(experiments.get(n), "DEPENDS", ()))]
        ready.sort(key=lambda n: -priority[n])
        name = ready[0]
        pending.remove(name)
        w = min(range(jobs), key=lambda i: workers[i])
        start = max([workers[w]] + [finish[d] for d in getattr(experiments.get(name), "DEPENDS", ())])
        finish[name] = workers[w] = start + seconds[name]
    return max(finish.values()) if finish else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", help="empty folder for the new entries (default: a temporary folder, kept)")
    ap.add_argument("--reference", metavar="REV", help="git revision whose committed entries the statistics are "
                                                       "checked against")
    ap.add_argument("--compare", metavar="DIR", help="only compare the entries in DIR with --reference")
    ap.add_argument("--only", nargs="*", help="with --compare: these experiments (default: all)")
    ap.add_argument("--save", metavar="JSON", help="also write the results to this file (Appendix B reads "
                                                   "benchmarks/results/cold_compute.json)")
    args = ap.parse_args()
    if args.compare:
        if not args.reference:
            sys.exit("error: --compare needs --reference REV")
        ref = reference_cache(args.reference)
        for name in args.only or experiments.names():
            print(f"{name:<22}{compare(name, Path(args.compare), ref)}")
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="icl-cold-"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty")
    config = Config.from_env().with_(cache_dir=out, cache_mode="use")
    names = experiments.names()
    recorded = schedule.committed_seconds(Config.from_env().with_(cache_dir=ROOT / "cache"))
    baseline = {n: recorded.get(n) for n in names}
    start = time.perf_counter()
    done = schedule.run_many(names, config, jobs=args.jobs, expected_s={n: s or 0.0 for n, s in baseline.items()})
    total = time.perf_counter() - start
    took = {d.name: d.seconds for d in done}
    results = {}
    print(f"\ncold compute of {len(names)} experiments with --jobs {args.jobs}, into {out}")
    print(f"{'experiment':<22}{'now (s)':>9}{'committed (s)':>15}{'ratio':>8}  result")
    for name in names:
        entry, _ = experiments.run(name, config.with_(cache_mode="readonly"))
        base = baseline[name]
        ratio = f"{took[name] / base:.2f}" if base else "-"
        results[name] = same_result(name, entry.key, out)
        print(f"{name:<22}{took[name]:>9.0f}{(base or float('nan')):>15.0f}{ratio:>8}  {results[name]}")
    base_sum = sum(s for s in baseline.values() if s)
    print(f"{'total wall':<22}{total:>9.0f}{base_sum:>15.0f}{total / base_sum:>8.2f}  "
          f"(committed: the sum of elapsed_s, one at a time)")
    print(f"\nper chapter, projected from this run's times on {args.jobs} workers:")
    chapters = {}
    for chapter in quarto.book_files(ROOT):
        needs = sorted(quarto.chapter_experiments(chapter))
        if needs:
            t = project(needs, took, args.jobs)
            chapters[chapter.relative_to(ROOT).as_posix()] = {"seconds": round(t, 1),
                                                                "experiments": schedule.closure(needs)}
            print(f"  {chapter.relative_to(ROOT).as_posix():<36}{t:>7.0f} s  ({', '.join(schedule.closure(needs))})")
    checks = {}
    if args.reference:
        ref = reference_cache(args.reference)
        print(f"\nstatistics against the entries committed at {args.reference}:")
        for name in names:
            checks[name] = compare(name, out, ref)
            print(f"  {name:<22}{checks[name]}")
    if args.save:
        import json
        import os
        import platform

        record = {
            "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "total_s": round(total, 1),
            "committed_sum_s": round(base_sum, 1),
            "experiments": {n: {"seconds": round(took[n], 1), "committed_s": baseline[n], "result": results[n]}
                            for n in names},
            "chapters": chapters, "reference": args.reference, "statistics": checks,
        }
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\ntargets: all <= 1200 s ({'met' if total <= 1200 else 'NOT met'}); "
          f"one chapter <= 360 s")


if __name__ == "__main__":
    main()
