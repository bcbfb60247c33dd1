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
key inputs, loads the entry if it is there (``use``/``readonly``), and otherwise checks that it can be
written, loads the model once, computes and stores. Nothing is written before the request has been
validated. Entries of default parameters live in the main cache (the book's), those of custom
parameters in the user cache (:meth:`icl.config.Config.results_dir`). :func:`entry_status` says what an
entry is for the current code: the book's, another model's, a custom run, or stale.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shlex
import sys
import time
import typing
from types import ModuleType
from typing import Any, Callable

from icl import models, tasks, timing
from icl.cache import Cache, Entry, key_of
from icl.config import DEFAULT_MODEL, USER_CACHE_DIR, Config
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
    "induction_ablation": "icl.experiments.induction_ablation",
    "task_vectors": "icl.experiments.task_vectors",
    "function_vectors": "icl.experiments.function_vectors",
    "phase_change": "icl.experiments.phase_change",
    "phase_seeds": "icl.experiments.phase_seeds",
    "icl_regression": "icl.experiments.icl_regression",
    "contexts_to_weights": "icl.experiments.contexts_to_weights",
    "c2w_toy": "icl.experiments.c2w_toy",
    "c2w_pretrained": "icl.experiments.c2w_pretrained",
    "regression_agreement": "icl.experiments.regression_agreement",
    "task_diversity": "icl.experiments.task_diversity",
    "slt_free_energy": "icl.experiments.slt_free_energy",
    "slt_llc": "icl.experiments.slt_llc",
    "llc_phase_change": "icl.experiments.llc_phase_change",
    "llc_operating_point": "icl.experiments.llc_operating_point",
    "slt_phase_toy": "icl.experiments.slt_phase_toy",
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


def reporter(name: str, progress: bool) -> Callable[[str], None]:
    """``say(message)``: one ``name: message`` line on stderr per stage of a long compute when
    ``progress`` is on (``python -m icl run`` turns it on), nothing otherwise."""
    if not progress:
        return lambda message: None

    def say(message: str) -> None:
        print(f"{name}: {message}", file=sys.stderr, flush=True)

    return say


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


def run_config(module: ModuleType, config: Config) -> Config:
    """The configuration ``module`` computes under: ``config``, except that an experiment with a
    ``CPU_DTYPE`` (a forward-only experiment whose statistics are known to hold in that dtype, checked
    by ``benchmarks/cold_compute.py --reference``) runs in it when no dtype was asked for and the model's
    default is float32 on the CPU. ``ICL_DTYPE``/``--dtype`` always win."""
    cpu_dtype = getattr(module, "CPU_DTYPE", None)
    if cpu_dtype is None or config.dtype is not None or not uses_model(module):
        return config
    try:
        spec = models.resolve(config.model)
        if spec.default_dtype != "float32" or models.resolve_device(spec, config.device) != "cpu":
            return config
    except ICLError:
        return config
    return config.with_(dtype=cpu_dtype)


def _dtype_for(module: ModuleType, config: Config) -> str | None:
    """The dtype ``module`` loads its model in (None when it uses no model or the model is unknown)."""
    if not uses_model(module):
        return None
    try:
        return run_config(module, config).dtype or models.resolve(config.model).default_dtype
    except ICLError:
        return None


def model_info(config: Config, loaded: models.LoadedModel | None = None) -> dict[str, str]:
    """The model part of a key: id, weights fingerprint and dtype (ModelUnavailableError for a hub model
    that is not in the local Hugging Face cache, whose revision is unknown)."""
    spec = loaded.spec if loaded else models.resolve(config.model)
    model_id = spec.name if spec.source != "local" else f"local:{spec.location.rstrip('/').split('/')[-1]}"
    return {
        "id": model_id,
        "fingerprint": loaded.fingerprint if loaded else models.fingerprint(spec),
        "dtype": loaded.dtype if loaded else (config.dtype or spec.default_dtype),
    }


def key_inputs(module: ModuleType, params: Any, config: Config,
               loaded: models.LoadedModel | None = None, model: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything that determines the result; its canonical-JSON hash is the cache key. ``model``: the
    model part to use instead of the configured model's (:func:`model_info`)."""
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
            dep: key_of(key_inputs(get(dep), make_params(get(dep)), config, loaded, model)) for dep in depends
        }
    if module.USES_MODEL:
        inputs["model"] = dict(model) if model is not None else model_info(run_config(module, config), loaded)
    return inputs


@dataclasses.dataclass(frozen=True)
class EntryStatus:
    """What a cache entry is, for the current code and configuration: ``current`` (what the book shows
    for the configured model), ``other-model`` (default parameters, another model or dtype), ``custom``
    (other parameters or seed) or ``stale`` (no longer produced by this code: it is never loaded)."""

    state: str
    detail: str

    @property
    def valid(self) -> bool:
        return self.state != "stale"

    def describe(self) -> str:
        return {"current": "ok", "other-model": "ok, other model:", "custom": "ok, custom run:",
                "stale": "stale:"}[self.state] + (f" {self.detail}" if self.detail else "")


def models_near(entry: Entry) -> list[dict[str, str]]:
    """The model parts stored in the key inputs of the entries beside ``entry`` (same cache folder)."""
    found: list[dict[str, str]] = []
    for meta in sorted(entry.path.parent.parent.glob("*/*/meta.json")):
        try:
            model = json.loads(meta.read_text()).get("key_inputs", {}).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(model, dict) and model not in found:
            found.append(model)
    return found


def entry_status(entry: Entry, config: Config, candidates: list[dict[str, str]] | None = None) -> EntryStatus:
    """Classify a (verified) entry by re-deriving its key from its own parameters and model with the
    current code. ``candidates``: model parts to try for an experiment that stores none but whose
    dependencies used a model (e.g. bayes_fit); default: those of the entries beside it. The
    configured model is always tried."""
    if candidates is None:
        known = entry.experiment in REGISTRY
        candidates = models_near(entry) if known and uses_model(get(entry.experiment)) else []
    try:
        module = get(entry.experiment)
    except UnknownExperimentError:
        return EntryStatus("stale", f"this version has no experiment {entry.experiment!r}")
    ki = entry.key_inputs
    if ki.get("version") != module.VERSION:
        return EntryStatus("stale", f"computed by version {ki.get('version')} of {module.NAME}; the code is at "
                                    f"version {module.VERSION}")
    try:
        stored = {k: tuple(v) if isinstance(v, list) else v for k, v in ki.get("params", {}).items()}
        params = module.Params(**stored)
    except TypeError:
        return EntryStatus("stale", "its parameters are not those of the current code")
    try:
        current_model = model_info(run_config(module, config))
    except ICLError:
        current_model = None
    if ki.get("model") is not None:
        tries = [ki["model"]]
    else:
        # A derived experiment (no model of its own) is first keyed as configured (model None: each
        # dependency in the dtype it computes in), then as if computed from another model.
        tries = [None] + ([current_model] if uses_model(module) else [])
        tries += [c for c in candidates if c not in tries] if uses_model(module) else []
    for model in tries:
        if module.USES_MODEL and model is None:
            continue
        try:
            if key_of(key_inputs(module, params, config, model=model)) != entry.key:
                continue
        except (ICLError, ValueError, TypeError):
            return EntryStatus("stale", "its parameters are no longer allowed")
        if not is_default(module, params):
            flags = command_for(module.NAME, params, Config(model=DEFAULT_MODEL)).split(f"run {module.NAME}", 1)[1]
            on = f" on {model['id']}" if model is not None else ""
            return EntryStatus("custom", f"{flags.strip()}{on}")
        if model is None or (module.USES_MODEL and model == current_model):
            return EntryStatus("current", "")
        return EntryStatus("other-model", f"{model['id']} ({model['dtype']})")
    return EntryStatus("stale", "its prompts, data or dependencies have changed since it was computed")


def misplaced_advice(entry: Entry, status: EntryStatus) -> str:
    """What to do about an entry that does not belong in the main cache (custom or stale)."""
    rel = entry.path
    if status.state == "custom":
        return (f"{rel} is a custom run ({status.detail}), not a result the book shows. Custom runs belong in "
                f"the user cache ({USER_CACHE_DIR}), where `python -m icl run` puts them unless ICL_CACHE_DIR "
                f"is set; move it there or delete it (rm -r {rel})")
    if status.state == "stale":
        return (f"{rel} is stale ({status.detail}) and is never loaded; delete it (rm -r {rel}) and recompute "
                f"with: python -m icl run {entry.experiment}")
    return f"{rel}: {status.describe()}"


def uses_model(module: ModuleType) -> bool:
    """Whether the experiment's result depends on a pretrained model (its own, or a dependency's)."""
    return bool(module.USES_MODEL or any(uses_model(get(dep)) for dep in getattr(module, "DEPENDS", ())))


def cache_for(module: ModuleType, params: Any, config: Config) -> Cache:
    """The cache an entry lives in: the main one for default parameters, the user cache for custom ones
    (see :meth:`icl.config.Config.results_dir`)."""
    return Cache(config.results_dir(custom=not is_default(module, params)))


def command_for(name: str, params: Any, config: Config) -> str:
    """The command that computes this entry: ``python -m icl run NAME [--model M] [--seed S] [--set k=v]``."""
    module = get(name)
    defaults = module.Params()
    parts = ["python", "-m", "icl", "run", name]
    if uses_model(module):
        if config.model != DEFAULT_MODEL:
            parts += ["--model", config.model]
        for flag, value in (("--device", config.device), ("--dtype", config.dtype)):
            if value:
                parts += [flag, value]
    if params.seed != defaults.seed:
        parts += ["--seed", str(params.seed)]
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.name != "seed" and value != getattr(defaults, f.name):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += ["--set", f"{f.name}={shown}"]
    return " ".join(shlex.quote(p) for p in parts)


def is_cached(name: str, config: Config, params: Any = None) -> bool:
    """Whether a valid entry is there (False where the key cannot be known without loading a model).
    A corrupt entry raises, as it would in :func:`run`."""
    module = get(name)
    params = params if params is not None else make_params(module)
    try:
        inputs = key_inputs(module, params, config)
    except ModelUnavailableError:
        return False
    return cache_for(module, params, config).load(inputs) is not None


def check_writable(name: str, config: Config, params: Any = None) -> None:
    """Raise CacheDirError unless everything a run of ``name`` may write can be written: its own
    entry and the default-parameter entries of its dependencies."""
    module = get(name)
    params = params if params is not None else make_params(module)
    cache_for(module, params, config).check_writable(name)
    for dep in getattr(module, "DEPENDS", ()):
        check_writable(dep, config)


def run(name: str, config: Config, params: Any = None, progress: bool = False,
        loaded: models.LoadedModel | None = None) -> tuple[Entry, models.LoadedModel | None]:
    """Return the cache entry for ``name`` (computing it if the mode allows) and the model, if loaded."""
    module = get(name)
    params = params if params is not None else make_params(module)
    cache = cache_for(module, params, config)
    wanted = _dtype_for(module, config)
    if loaded is not None and wanted is not None and loaded.dtype != wanted:
        loaded = None  # the model in hand is in another dtype than this experiment computes in
    try:
        inputs = key_inputs(module, params, config, loaded)
    except ModelUnavailableError:
        if config.cache_mode == "readonly" or not module.USES_MODEL or models.resolve(config.model).source != "hub":
            raise
        check_writable(name, config, params)
        loaded = models.load(run_config(module, config))  # a hub model not yet downloaded: its revision is known after loading
        inputs = key_inputs(module, params, config, loaded)
    if config.cache_mode != "refresh":
        entry = cache.load(inputs)
        if entry is not None:
            return entry, loaded
        if config.cache_mode == "readonly":
            model = inputs["model"]["id"] if inputs["model"] else "no model"
            custom = "" if is_default(module, params) else ", custom parameters"
            raise CacheMissError(
                f"no cached result for experiment {name!r} ({model}, seed {params.seed}{custom}) in "
                f"{cache.root}; compute it with: {command_for(name, params, config)}"
            )
    check_writable(name, config, params)  # before any model load or compute
    upstream = {}
    for dep in getattr(module, "DEPENDS", ()):
        upstream[dep], loaded = run(dep, config.with_(cache_mode="use") if config.cache_mode == "refresh"
                                    else config, progress=progress, loaded=loaded)
    if module.USES_MODEL and (loaded is None or (wanted is not None and loaded.dtype != wanted)):
        loaded = models.load(run_config(module, config))
    import torch

    threads = threads_of(module)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # each experiment computes with its own, recorded, thread count
    start = time.perf_counter()
    try:
        with timing.collect() as times:
            if upstream:
                arrays, data = module.compute(params, loaded, progress=progress, upstream=upstream)
            else:
                arrays, data = module.compute(params, loaded, progress=progress)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    elapsed = time.perf_counter() - start
    provenance = {
        "elapsed_s": round(elapsed, 2),
        "timing": {k: round(v, 3) for k, v in sorted(times.items())},  # stages; never in ``data``
        "device": loaded.device if loaded else "cpu",
        "torch_threads": used,
        "versions": _versions(),
    }
    return cache.store(inputs, arrays, data, provenance), loaded


def with_threads(compute: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an experiment's ``compute`` so that it runs with the module's thread count
    (:func:`threads_of`) however it is called, and the caller's count is restored afterwards.

    :func:`run` already does this around every compute; the decorator keeps a direct call (a test, a
    notebook) from computing with another count or leaving the process at one thread."""
    import functools

    @functools.wraps(compute)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads_of(sys.modules[compute.__module__]))
        try:
            return compute(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def threads_of(module: ModuleType) -> int:
    """The torch thread count an experiment computes with: its ``THREADS`` (default 1).

    One thread is the default because the experiments here are chains of small operations whose cost
    is overhead, and because two threads competing with any other job for two cores are several times
    slower than one; a fixed count also keeps training bit-for-bit reproducible."""
    return int(getattr(module, "THREADS", getattr(module, "TORCH_THREADS", 1)))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("icl", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
