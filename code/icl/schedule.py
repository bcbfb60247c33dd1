"""Compute many experiments at once: worker processes that follow the ``DEPENDS`` graph.

On a small machine the fastest way through the whole book is not more threads per experiment but more
experiments at a time: most experiments here are chains of small operations (toy training steps, SGLD
steps, forwards of a 135M model on short prompts) whose per-operation overhead does not shrink with
threads, and two torch threads fighting a second job for two cores are slower than one. So
:func:`run_many` runs up to ``jobs`` experiments in parallel, each in its own process with one torch
thread, and starts an experiment only once every experiment it ``DEPENDS`` on has its cache entry
(it then loads them from the cache like any other reader). Entries that are already cached are not
touched. Among the experiments that are ready, the one heading the longest chain of expected work
(itself and what waits for it) goes first, so the slowest chain starts early.

The processes are started with ``spawn`` (a fresh interpreter: no torch state or threads inherited
across a fork), and each loads the model itself when its experiment needs one. Progress is one overall
bar, in experiments, and one line per finished experiment with its wall time.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from icl import experiments
from icl.config import Config
from icl.errors import ConfigError


@dataclass(frozen=True)
class Done:
    name: str
    path: str
    seconds: float
    computed: bool


def _init_worker(registry: dict[str, str] | None) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if registry:
        experiments.REGISTRY.update(registry)


def _params(name: str, overrides: dict[str, str] | None, seed: int | None) -> Any:
    return experiments.make_params(experiments.get(name), overrides or {}, seed=seed)


def _run_one(name: str, config: Config, overrides: dict[str, str], seed: int | None) -> Done:
    start = time.time()
    params = _params(name, overrides, seed)
    entry, _ = experiments.run(name, config, params, progress=False)
    return Done(name, str(entry.path), time.time() - start, True)


def closure(names: list[str]) -> list[str]:
    """``names`` and everything they depend on, dependencies first (registry order otherwise)."""
    out: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ConfigError(f"experiments depend on each other in a cycle: {' -> '.join(path + (name,))}")
        for dep in getattr(experiments.get(name), "DEPENDS", ()):
            visit(dep, path + (name,))
        if name not in out:
            out.append(name)

    for name in names:
        visit(name, ())
    return out


def critical_path(names: list[str], expected_s: dict[str, float]) -> dict[str, float]:
    """For each experiment, its expected time plus the longest chain of experiments (among ``names``)
    that wait for it: starting the largest first keeps a long dependent chain from finishing last."""
    dependents: dict[str, list[str]] = {n: [] for n in names}
    for n in names:
        for d in getattr(experiments.get(n), "DEPENDS", ()):
            if d in dependents:
                dependents[d].append(n)
    rank: dict[str, float] = {}

    def visit(n: str) -> float:
        if n not in rank:
            rank[n] = expected_s.get(n, 0.0) + max((visit(m) for m in dependents[n]), default=0.0)
        return rank[n]

    for n in names:
        visit(n)
    return rank


def run_many(names: list[str], config: Config, jobs: int = 1, overrides: dict[str, dict[str, str]] | None = None,
             seed: int | None = None, expected_s: dict[str, float] | None = None,
             on_done: Callable[[Done], None] | None = None, registry: dict[str, str] | None = None) -> list[Done]:
    """Make sure every experiment in ``names`` (and what it depends on) has its cache entry.

    ``overrides`` maps an experiment to its ``--set`` parameters (dependencies always use defaults, as
    :func:`icl.experiments.run` does); ``expected_s`` (seconds, e.g. from the committed entries) orders
    the ready experiments longest first. With ``config.cache_mode == "refresh"`` the experiments named
    are recomputed and their dependencies only filled in if missing. Returns one :class:`Done` per
    experiment, in the order they finished.
    """
    overrides = overrides or {}
    expected_s = expected_s or {}
    order = closure(names)
    refresh = config.cache_mode == "refresh"
    use = config.with_(cache_mode="use")
    todo = [n for n in order if (refresh and n in names)
            or not experiments.is_cached(n, use, _params(n, overrides.get(n), seed if n in names else None))]
    done: list[Done] = [Done(n, "", 0.0, False) for n in order if n not in todo]
    finished = {d.name for d in done}
    if not todo:
        return done
    pending = list(todo)
    priority = critical_path(todo, expected_s)
    context = mp.get_context("spawn")
    bar = tqdm(total=len(todo), desc=f"experiments ({jobs} at a time)", unit="exp")
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, initializer=_init_worker,
                                initargs=(registry,)) as pool:
        running: dict[cf.Future[Done], str] = {}
        while pending or running:
            ready = [n for n in pending
                     if all(d in finished for d in getattr(experiments.get(n), "DEPENDS", ()))]
            ready.sort(key=lambda n: -priority[n])
            for name in ready[: max(1, jobs) - len(running)]:
                pending.remove(name)
                cfg = config if (refresh and name in names) else use
                running[pool.submit(_run_one, name, cfg, overrides.get(name, {}),
                                    seed if name in names else None)] = name
                bar.set_postfix_str(", ".join(sorted(running.values())))
            if not running:
                raise ConfigError(f"cannot start {', '.join(pending)}: a dependency failed or is missing")
            finished_now, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished_now:
                name = running.pop(future)
                result = future.result()  # re-raises the worker's exception here
                finished.add(name)
                done.append(result)
                bar.update(1)
                bar.write(f"{name}: computed in {result.seconds:.0f} s -> {result.path}")
                if on_done:
                    on_done(result)
            bar.set_postfix_str(", ".join(sorted(running.values())))
    bar.close()
    return done


def committed_seconds(config: Config) -> dict[str, float]:
    """Each experiment's ``elapsed_s`` as recorded by its newest entry in ``config.cache_dir`` (for ordering;
    an entry of an earlier version is as good an estimate); experiments with no entry are absent."""
    import json

    out: dict[str, float] = {}
    for name in experiments.names():
        metas = sorted((config.cache_dir / name).glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
        try:
            seconds = json.loads(metas[-1].read_text()).get("elapsed_s") if metas else None
        except (OSError, ValueError):
            seconds = None
        if isinstance(seconds, (int, float)):
            out[name] = float(seconds)
    return out
