"""Experiments: named computations whose results the book loads from the cache.

Each experiment is a module in this package with

* ``NAME``, ``VERSION`` (bump it when the code changes what is computed), ``DESCRIPTION``, ``CHAPTER``;
* ``USES_MODEL`` — whether it needs a pretrained model (trained-here and symbolic ones do not);
* ``Params`` — a frozen dataclass of every setting that affects the result, ``seed`` included;
* ``content_digest(params) -> str`` — a hash of the prompts or data, computed without any model;
* ``compute(params, model, progress) -> (arrays, data)`` — numpy arrays and small JSON results;
* optionally ``DEPENDS`` — names of experiments whose (default-parameter) results this one analyses;
  their keys enter this one's key, and ``compute`` receives them as ``upstream={name: Entry}``.

:func:`run` turns a name, a :class:`~icl.config.Config` and parameters into a cache entry: it builds the
key inputs, loads the entry if it is there (``use``/``readonly``), and otherwise loads the model once,
computes and stores. Nothing is written before the request has been validated.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import typing
from types import ModuleType
from typing import Any

from icl import models
from icl.cache import Cache, Entry, key_of
from icl.config import Config
from icl.errors import CacheMissError, ConfigError, ModelUnavailableError, UnknownExperimentError

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


def make_params(module: ModuleType, overrides: dict[str, str] | None = None, seed: int | None = None) -> Any:
    """Default parameters with string overrides (``n_prompts=10``, ``tasks=identity,double``) applied."""
    params = module.Params()
    hints = typing.get_type_hints(module.Params)
    changes: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(params))
            raise ConfigError(f"experiment {module.NAME} has no parameter {key!r}; it has {known}")
        hint = str(hints[key])
        try:
            if "tuple" in hint:
                changes[key] = tuple(s.strip() for s in raw.split(",") if s.strip())
            elif hint in ("int", "<class 'int'>"):
                changes[key] = int(raw)
            elif hint in ("float", "<class 'float'>"):
                changes[key] = float(raw)
            else:
                changes[key] = raw
        except ValueError:
            raise ConfigError(f"parameter {key}={raw!r} is not a valid {hint}") from None
    if seed is not None:
        changes["seed"] = seed
    params = dataclasses.replace(params, **changes)
    if hasattr(params, "validate"):
        params.validate()
    return params


def key_inputs(module: ModuleType, params: Any, config: Config,
               loaded: models.LoadedModel | None = None) -> dict[str, Any]:
    """Everything that determines the result; its canonical-JSON hash is the cache key."""
    inputs: dict[str, Any] = {
        "experiment": module.NAME,
        "version": module.VERSION,
        "params": dataclasses.asdict(params),
        "seed": params.seed,
        "content_sha256": module.content_digest(params),
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
    start = time.time()
    if upstream:
        arrays, data = module.compute(params, loaded, progress=progress, upstream=upstream)
    else:
        arrays, data = module.compute(params, loaded, progress=progress)
    elapsed = time.time() - start
    import torch

    provenance = {
        "elapsed_s": round(elapsed, 2),
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
