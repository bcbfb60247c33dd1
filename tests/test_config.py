from pathlib import Path

import pytest

from icl.config import Config
from icl.errors import ConfigError


def test_defaults(clean_env):
    cfg = Config.from_env()
    assert cfg.model == "smollm2-135m"
    assert cfg.cache_mode == "use"
    assert cfg.device is None and cfg.dtype is None


def test_environment_then_flags(clean_env):
    clean_env.setenv("ICL_MODEL", "llama-3-8b")
    clean_env.setenv("ICL_DEVICE", "cuda")
    clean_env.setenv("ICL_DTYPE", "bfloat16")
    clean_env.setenv("ICL_CACHE", "readonly")
    clean_env.setenv("ICL_CACHE_DIR", "/tmp/somewhere")
    cfg = Config.from_env()
    assert (cfg.model, cfg.device, cfg.dtype, cfg.cache_mode) == ("llama-3-8b", "cuda", "bfloat16", "readonly")
    assert cfg.cache_dir == Path("/tmp/somewhere")
    flagged = Config.from_env(model="smollm2-135m", device=None, dtype="float32")
    assert (flagged.model, flagged.device, flagged.dtype) == ("smollm2-135m", "cuda", "float32")


@pytest.mark.parametrize("field,value", [("cache_mode", "sometimes"), ("dtype", "float8"), ("model", "")])
def test_bad_values(clean_env, field, value):
    with pytest.raises(ConfigError):
        Config.from_env(**{field: value})


def test_frozen():
    with pytest.raises(Exception):
        Config().model = "x"  # type: ignore[misc]


def test_custom_runs_have_their_own_folder_unless_a_cache_dir_is_set(clean_env, tmp_path):
    from icl import config

    cfg = Config.from_env()
    assert cfg.results_dir(custom=False) == config.DEFAULT_CACHE_DIR == config.REPO_ROOT / "cache"
    assert cfg.results_dir(custom=True) == config.USER_CACHE_DIR != config.DEFAULT_CACHE_DIR
    clean_env.setenv("ICL_CACHE_DIR", str(tmp_path))
    cfg = Config.from_env()
    assert cfg.results_dir(custom=False) == cfg.results_dir(custom=True) == tmp_path
    assert Config(cache_dir=tmp_path).results_dir(custom=True) == tmp_path  # made in code: one folder


@pytest.mark.slow
def test_the_suite_ignores_the_users_icl_settings(tmp_path):
    """With ICL_DEVICE=cuda and ICL_CACHE_DIR elsewhere in the user's environment, tests that read the
    configuration neither fail falsely nor skip silently (conftest removes ICL_* for the session)."""
    import os
    import subprocess
    import sys

    from icl.config import REPO_ROOT

    env = {**os.environ, "ICL_DEVICE": "cuda", "ICL_DTYPE": "float16", "ICL_CACHE": "readonly",
           "ICL_CACHE_DIR": str(tmp_path / "elsewhere")}
    tests = ["tests/test_cli.py::test_corrupt_entry_is_refused_and_reported",
             "tests/test_experiments_llc_phase_change.py::test_cached_result_uses_the_phase_change_checkpoints",
             "tests/test_config.py::test_defaults"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "3 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]
