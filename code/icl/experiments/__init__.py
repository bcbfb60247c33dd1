"""Experiments: named computations whose results the book loads from the cache.

Each experiment is a module in this package with

* ``NAME``, ``VERSION`` (bump it when the code changes what is computed), ``DESCRIPTION``, ``CHAPTER``;
* ``USES_MODEL`` — whether it needs a pretrained model (trained-here and symbolic ones do not);
* ``Params`` — a frozen dataclass of every setting that affects the result, ``seed`` included;
* ``content_digest(params) -> str`` — a hash of the prompts or data, computed without any model;
* ``compute(params, model, progress) -> (arrays, data)`` — numpy arrays and small JSON results, a
  function of the inputs alone (wall-clock times of stages go to :mod:`icl.timing`, which :func:`run`
  stores in the entry's provenance);
* optionally ``DEPENDS`` — names of experiments whose (default-parameter) results this one analyses;
  their keys enter this one's key, and ``compute`` receives them as ``upstream={name: Entry}``;
* ``LIMITS`` — what each parameter allows (:class:`Limit`): a range for every number (for a tuple of
  numbers written as strings, of each element), choices for a string, or task names. Every numeric
  parameter has one, so an absurd size or a negative count is refused before anything runs; ``seed``
  is always ``0 .. 2**31 - 1``. ``Params.validate`` adds the checks that involve several parameters.

:func:`run` turns a name, a :class:`~icl.config.Config` and parameters into a cache entry: it builds the
key inputs, loads the entry if it is there (``use``/``readonly``), and otherwise loads the model once,
computes and stores. Nothing is written before the request has been validated.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
import typing
from types import ModuleType
from typing import Any

from icl import models, tasks, timing
from icl.cache import Cache, Entry, key_of
from icl.config import Config
from icl.errors import CacheMissError, ConfigError, ICLError, ModelUnavailableError, UnknownExperimentError

REGISTRY: dict[str, str] = {
    "surprisal": "icl.experiments.surprisal",
    "bayes_fit": "icl.experiments.bayes_fit",
    "icl_score": "icl.experiments.icl_score",
    "bayes_toy": "icl.experiments.bayes_toy",
    "logit_lens": "icl.experiments.logit_lens",
    "patching": "icl.experiments.patching",
    "ablation": "icl.experiments.ablation",
    "induction_heads": "icl.experiments.induction_heads",
    "phase_change": "icl.experiments.phase_change",
    "icl_regression": "icl.experiments.icl_regression",
    "contexts_to_weights": "icl.experiments.contexts_to_weights",
    "c2w_toy": "icl.experiments.c2w_toy",
    "c2w_pretrained": "icl.experiments.c2w_pretrained",
    "slt_free_energy": "icl.experiments.slt_free_energy",
    "slt_llc": "icl.experiments.slt_llc",
    "llc_phase_change": "icl.experiments.llc_phase_change",
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise UnknownExperimentError(
            f"unknown experiment {name!r}: known experiments are {', '.join(REGISTRY)} (or 'all')"
        )
    return importlib.import_module(REGISTRY[name])


@dataclasses.dataclass(frozen=True)
class Limit:
    """What one parameter allows. ``lo``/``hi``: an inclusive range of a number, or of each element of a
    tuple of numbers written as strings (``of`` is then ``int`` or ``float``); ``choices``: the allowed
    strings; ``task``: each value is a task (:func:`icl.tasks.get_task`); ``text``: a described string
    format that ``Params.validate`` checks; ``empty``: a string may be empty (a tuple never may)."""

    lo: float | None = None
    hi: float | None = None
    of: type | None = None
    choices: tuple[str, ...] = ()
    task: bool = False
    text: str = ""
    empty: bool = False

    def describe(self) -> str:
        if self.task:
            return tasks.TASK_HELP
        if self.text:
            return self.text + (" (or empty)" if self.empty else "")
        if self.choices:
            return "one of " + ", ".join(self.choices) + (" (or empty)" if self.empty else "")
        kind = {int: "integer", float: "number"}.get(self.of, "")  # type: ignore[arg-type]
        return f"{kind + ' ' if kind else ''}{_fmt(self.lo)} .. {_fmt(self.hi)}"


def between(lo: float, hi: float) -> Limit:
    return Limit(lo, hi)


def each_int(lo: int, hi: int) -> Limit:
    return Limit(lo, hi, of=int)


def each_float(lo: float, hi: float) -> Limit:
    return Limit(lo, hi, of=float)


def one_of(*choices: str, empty: bool = False) -> Limit:
    return Limit(choices=choices, empty=empty)


def text(description: str, empty: bool = False) -> Limit:
    return Limit(text=description, empty=empty)


TASKS = Limit(task=True)
SEED = Limit(0, 2**31 - 1)


def _fmt(v: float | None) -> str:
    if v is None:
        return "any"
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}" if isinstance(v, float) else str(v)


def limits(module: ModuleType) -> dict[str, Limit]:
    """Every parameter's :class:`Limit` (``seed`` included)."""
    return {"seed": SEED, **getattr(module, "LIMITS", {})}


def _parse(module: ModuleType, key: str, raw: str, hint: str, limit: Limit | None) -> Any:
    raw = raw.strip()
    if "tuple" in hint:
        parts = tasks.split_names(raw) if limit is not None and limit.task else \
            tuple(s.strip() for s in raw.split(",") if s.strip())
        if "int" in hint:
            return tuple(int(s) for s in parts)
        return parts
    if hint in ("int", "<class 'int'>"):
        return int(raw)
    if hint in ("float", "<class 'float'>"):
        return float(raw)
    return raw


def _number(value: Any, of: type) -> float:
    if isinstance(value, str):
        value = of(value.strip())  # ValueError for "abc"; int("1.5") too
    if isinstance(value, bool) or not isinstance(value, int if of is int else (int, float)):
        raise ValueError(f"{value!r} is not a number of type {of.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not finite")
    return value


def check_limits(module: ModuleType, params: Any) -> Any:
    """Check every parameter against its :class:`Limit`; return ``params`` with task names canonical.
    Raises :class:`~icl.errors.ConfigError` naming the parameter, its value and what is allowed."""
    hints = typing.get_type_hints(module.Params)
    lims = limits(module)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value, hint, limit = getattr(params, f.name), str(hints[f.name]), lims.get(f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value

        def bad(what: str) -> ConfigError:
            return ConfigError(f"{module.NAME}: parameter {f.name}={shown!s} {what}; allowed: "
                               f"{limit.describe() if limit else 'see python -m icl list --params'}")

        numeric = hint in ("int", "float", "<class 'int'>", "<class 'float'>")
        if limit is None:
            if numeric or "tuple" in hint:
                raise AssertionError(f"{module.NAME}.{f.name} has no entry in LIMITS")
            continue
        if isinstance(value, tuple):
            if not value:
                raise bad("is empty")
            if len(set(value)) != len(value):
                raise bad("repeats a value")
        values = value if isinstance(value, tuple) else (value,)
        if limit.task:
            try:
                names = tuple(tasks.canonical_name(v) for v in values)
            except ICLError as exc:
                raise ConfigError(f"{module.NAME}: parameter {f.name}: {exc}") from None
            if len(set(names)) != len(names):
                raise bad("names one task twice")
            changes[f.name] = names if isinstance(value, tuple) else names[0]
            continue
        if limit.choices:
            if value not in limit.choices and not (limit.empty and value == ""):
                raise bad("is not allowed")
            continue
        if limit.text:
            if any(not v for v in values) and not limit.empty:
                raise bad("is empty")
            continue  # the format is Params.validate's to check
        if isinstance(value, str) and not value and not limit.empty:
            raise bad("is empty")
        of = limit.of or (int if "int" in hint else float)
        for v in values:
            try:
                x = _number(v, of)
            except ValueError:
                raise bad(f"is not {'an integer' if of is int else 'a finite number'}") from None
            if (limit.lo is not None and x < limit.lo) or (limit.hi is not None and x > limit.hi):
                raise bad("is out of range")
    return dataclasses.replace(params, **changes) if changes else params


def make_params(module: ModuleType, overrides: dict[str, str] | None = None, seed: int | None = None) -> Any:
    """Default parameters with string overrides (``n_prompts=10``, ``tasks=identity,affine:3,1``) applied,
    checked against the experiment's :data:`LIMITS <Limit>` and its own ``validate``. Every problem is a
    :class:`~icl.errors.ConfigError` naming the experiment, the parameter and what is allowed."""
    params = module.Params()
    hints = typing.get_type_hints(module.Params)
    lims = limits(module)
    changes: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(params))
            raise ConfigError(f"experiment {module.NAME} has no parameter {key!r}; it has {known}")
        hint = str(hints[key])
        try:
            changes[key] = _parse(module, key, raw, hint, lims.get(key))
        except ValueError:
            what = lims[key].describe() if key in lims else hint
            kind = "integers" if "tuple[int" in hint else "an integer" if "int" in hint else "a number"
            raise ConfigError(f"{module.NAME}: parameter {key}={raw!r} is not {kind}; allowed: {what}") from None
    if seed is not None:
        changes["seed"] = seed
    params = check_limits(module, dataclasses.replace(params, **changes))
    if hasattr(params, "validate"):
        try:
            params.validate()
        except ValueError as exc:
            raise ConfigError(f"{module.NAME}: {exc}") from None
    return params


def check_content(module: ModuleType, params: Any) -> str:
    """The content digest of ``params`` (prompts, data), or a ConfigError if they cannot be built —
    the last check that needs no model."""
    try:
        return module.content_digest(params)
    except ValueError as exc:
        raise ConfigError(f"{module.NAME}: {exc}") from None


def is_default(module: ModuleType, params: Any) -> bool:
    """Whether ``params`` are the experiment's defaults (seed included): the runs the book shows."""
    return params == module.Params()


def describe_params(module: ModuleType) -> list[tuple[str, str, str]]:
    """(name, default, allowed) for every parameter, for ``python -m icl list --params``."""
    lims = limits(module)
    out = []
    for f in dataclasses.fields(module.Params):
        default = getattr(module.Params(), f.name)
        shown = (",".join(map(str, default)) if isinstance(default, tuple)
                 else repr(default) if default == "" else str(default))
        out.append((f.name, shown, lims[f.name].describe() if f.name in lims else "-"))
    return out


def key_inputs(module: ModuleType, params: Any, config: Config,
               loaded: models.LoadedModel | None = None) -> dict[str, Any]:
    """Everything that determines the result; its canonical-JSON hash is the cache key."""
    inputs: dict[str, Any] = {
        "experiment": module.NAME,
        "version": module.VERSION,
        "params": dataclasses.asdict(params),
        "seed": params.seed,
        "content_sha256": check_content(module, params),
        "model": None,
    }
    depends = getattr(module, "DEPENDS", ())
    if depends:
        # A derived experiment (a fit to another experiment's result) is keyed by its inputs' keys.
        inputs["depends"] = {
            dep: key_of(key_inputs(get(dep), make_params(get(dep)), config, loaded)) for dep in depends
        }
    if module.USES_MODEL:
        spec = loaded.spec if loaded else models.resolve(config.model)
        model_id = spec.name if spec.source != "local" else f"local:{spec.location.rstrip('/').split('/')[-1]}"
        inputs["model"] = {
            "id": model_id,
            "fingerprint": loaded.fingerprint if loaded else models.fingerprint(spec),
            "dtype": loaded.dtype if loaded else (config.dtype or spec.default_dtype),
        }
    return inputs


def run(name: str, config: Config, params: Any = None, progress: bool = False,
        loaded: models.LoadedModel | None = None) -> tuple[Entry, models.LoadedModel | None]:
    """Return the cache entry for ``name`` (computing it if the mode allows) and the model, if loaded."""
    module = get(name)
    params = params if params is not None else make_params(module)
    cache = Cache(config.cache_dir)
    try:
        inputs = key_inputs(module, params, config, loaded)
    except ModelUnavailableError:
        if config.cache_mode == "readonly" or not module.USES_MODEL:
            raise
        loaded = models.load(config)  # a hub model not yet downloaded: its revision is known after loading
        inputs = key_inputs(module, params, config, loaded)
    if config.cache_mode != "refresh":
        entry = cache.load(inputs)
        if entry is not None:
            return entry, loaded
        if config.cache_mode == "readonly":
            model = inputs["model"]["id"] if inputs["model"] else "no model"
            raise CacheMissError(
                f"no cached result for experiment {name!r} ({model}, seed {params.seed}) in {config.cache_dir}; "
                f"compute it with: python -m icl run {name}"
                + (f" --model {config.model}" if module.USES_MODEL and config.model != "smollm2-135m" else "")
            )
    upstream = {}
    for dep in getattr(module, "DEPENDS", ()):
        upstream[dep], loaded = run(dep, config.with_(cache_mode="use") if config.cache_mode == "refresh"
                                    else config, progress=progress, loaded=loaded)
    if module.USES_MODEL and loaded is None:
        loaded = models.load(config)
    start = time.perf_counter()
    with timing.collect() as times:
        if upstream:
            arrays, data = module.compute(params, loaded, progress=progress, upstream=upstream)
        else:
            arrays, data = module.compute(params, loaded, progress=progress)
    elapsed = time.perf_counter() - start
    import torch

    provenance = {
        "elapsed_s": round(elapsed, 2),
        "timing": {k: round(v, 3) for k, v in sorted(times.items())},  # stages; never in ``data``
        "device": loaded.device if loaded else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    return cache.store(inputs, arrays, data, provenance), loaded


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("icl", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
