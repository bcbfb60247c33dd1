"""Run configuration: which model, on which device, in which dtype, and how to treat the cache.

One small frozen dataclass, :class:`Config`. Defaults come first, then environment variables, then
explicit overrides (the CLI's flags), so ``ICL_MODEL=llama-3-8b python -m icl run surprisal`` and
``python -m icl run surprisal --model llama-3-8b`` mean the same thing.

=================  ==========================================================  ======================
variable           meaning                                                     default
=================  ==========================================================  ======================
``ICL_MODEL``      registry name, Hugging Face id, or local folder             ``smollm2-135m``
``ICL_DEVICE``     ``cpu``, ``cuda``, ``cuda:1``, ... (empty: the model's own)  model's default
``ICL_DTYPE``      ``float32``, ``bfloat16``, ``float16`` (empty: model's)      model's default
``ICL_CACHE``      ``use`` (load or compute), ``refresh`` (recompute),         ``use``
                   ``readonly`` (load or fail; never loads a model)
``ICL_CACHE_DIR``  where results live (all of them, when set)                  ``<repo>/cache``
``ICL_MODELS_DIR`` where converted checkpoints live (outside git)              ``~/.cache/icl/models``
=================  ==========================================================  ======================

Results of custom runs — any parameter or seed other than an experiment's defaults — go to a user
cache, ``~/.cache/icl/results`` (:attr:`Config.custom_cache_dir`), unless ``ICL_CACHE_DIR`` is set:
``<repo>/cache`` holds what the book shows (the default parameters, for any model) and is committed for
the default model, so a tour of the command line never changes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from icl.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_MODES = ("use", "refresh", "readonly")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CACHE_DIR = REPO_ROOT / "cache"  # what the book shows; committed for the default model
USER_CACHE_DIR = Path.home() / ".cache" / "icl" / "results"  # custom runs, unless ICL_CACHE_DIR is set


@dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    cache_mode: str = "use"
    cache_dir: Path = DEFAULT_CACHE_DIR
    models_dir: Path = Path.home() / ".cache" / "icl" / "models"
    custom_cache_dir: Path | None = None  # results of non-default parameters; None: cache_dir

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache mode must be one of {', '.join(CACHE_MODES)}; got {self.cache_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not self.model:
            raise ConfigError("model name is empty")

    @classmethod
    def from_env(cls, **overrides: object) -> "Config":
        """Defaults, then ``ICL_*`` environment variables, then ``overrides`` whose value is not None."""
        env = os.environ
        values: dict[str, object] = {}
        if env.get("ICL_MODEL"):
            values["model"] = env["ICL_MODEL"]
        if env.get("ICL_DEVICE"):
            values["device"] = env["ICL_DEVICE"]
        if env.get("ICL_DTYPE"):
            values["dtype"] = env["ICL_DTYPE"]
        if env.get("ICL_CACHE"):
            values["cache_mode"] = env["ICL_CACHE"]
        if env.get("ICL_CACHE_DIR"):
            values["cache_dir"] = Path(env["ICL_CACHE_DIR"])
        else:
            values["cache_dir"], values["custom_cache_dir"] = DEFAULT_CACHE_DIR, USER_CACHE_DIR
        if env.get("ICL_MODELS_DIR"):
            values["models_dir"] = Path(env["ICL_MODELS_DIR"])
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(f"unknown config field {key!r}")
            if value is not None:
                values[key] = Path(value) if key in ("cache_dir", "models_dir", "custom_cache_dir") else value
                if key == "cache_dir" and "custom_cache_dir" not in overrides:
                    values.pop("custom_cache_dir", None)  # an explicit cache folder takes every result
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> "Config":
        return replace(self, **changes)

    def results_dir(self, custom: bool) -> Path:
        """Where results live: those of default parameters in ``cache_dir``, custom ones in
        ``custom_cache_dir`` if set."""
        return self.custom_cache_dir if custom and self.custom_cache_dir is not None else self.cache_dir
