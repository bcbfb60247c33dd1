"""Shared fixtures. The default model is converted once per machine (under ICL_MODELS_DIR or
~/.cache/icl/models) and loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from icl.config import REPO_ROOT, Config


def pytest_collection_modifyitems(config, items):
    import torch

    unmarked = [item.nodeid for item in items if "smol" in getattr(item, "fixturenames", ()) and
                "slow" not in item.keywords]
    if unmarked:  # the real model takes a conversion and seconds per test: `-m "not slow"` must skip it
        raise pytest.UsageError("tests that load the real model (fixture smol) must be marked slow: "
                                + ", ".join(unmarked))

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _no_user_icl_settings():
    """The suite runs the same whatever ICL_* variables the user has set (ICL_DEVICE=cuda, an
    ICL_CACHE_DIR elsewhere, ...): they are removed for the whole session, subprocesses included.
    ICL_MODELS_DIR stays, so the converted default model is reused from where it is."""
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var.startswith("ICL_") and var != "ICL_MODELS_DIR":
                mp.delenv(var)
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def smol():
    """The embedded default model, fp32 on CPU."""
    from icl import models

    return models.load(Config.from_env(model="smollm2-135m", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random Llama-3-shaped checkpoint folder (GQA 8:2, rope base 5e5, untied), built locally."""
    from icl.models import write_random_llama3

    return write_random_llama3(tmp_path_factory.mktemp("tiny-llama3"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from icl import models

    return models.load(Config(model=str(tiny_llama_dir), device="cpu", dtype="float32"))


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("ICL_") and var != "ICL_MODELS_DIR":
            monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _timing_keys(obj, path=""):
    """Keys anywhere in a JSON result that look like wall-clock timings (which belong in provenance)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else str(k)
            if "seconds" in str(k) or str(k).endswith("_s") or str(k) in ("elapsed", "duration"):
                found.append(here)
            found += _timing_keys(v, here)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _timing_keys(v, f"{path}[{i}]")
    return found


@pytest.fixture(scope="session")
def timing_keys():
    return _timing_keys


@pytest.fixture
def unwritable_folder(tmp_path, monkeypatch):
    """An empty folder nobody may write to (mode 555). As root, who writes anyway, ``os.access`` is made
    to report what it would for anyone else. Restored to 755 afterwards so pytest can clean up."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(folder) else real(p, m, **k))
    yield folder
    folder.chmod(0o755)
