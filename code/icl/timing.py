"""Wall-clock timings of an experiment's stages, kept apart from its results.

A result (an experiment's ``data`` and arrays) must be a function of its inputs alone, so that the same
seed gives bit-identical entries and checksums on a CPU. How long a stage took is provenance: it goes
into the entry's ``meta.json`` under ``timing`` (beside ``elapsed_s``), never into ``data``.

An experiment times a stage with :func:`timed` (or reports a duration with :func:`record`);
:func:`icl.experiments.run` collects what was recorded during ``compute`` with :func:`collect` and
stores it. Called directly (in tests), ``compute`` records into nothing.

    with timing.timed("finetune_seconds"):
        ...
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_sink: ContextVar[dict[str, float] | None] = ContextVar("icl_timing", default=None)


def record(name: str, seconds: float) -> None:
    """Record ``seconds`` under ``name`` (added to what is already there) if anyone is collecting."""
    sink = _sink.get()
    if sink is not None:
        sink[name] = sink.get(name, 0.0) + float(seconds)


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Time the ``with`` block and :func:`record` it as ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record(name, time.perf_counter() - start)


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect everything recorded inside the ``with`` block into the dict it yields."""
    sink: dict[str, float] = {}
    token = _sink.set(sink)
    try:
        yield sink
    finally:
        _sink.reset(token)
