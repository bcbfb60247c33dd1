"""The command line: one-line errors with exit status 2 and nothing written; list; cache status/verify."""

import os
import subprocess
import sys

import pytest

from icl import cli


def _run(args, tmp_path, **env):
    full = {**os.environ, "ICL_CACHE_DIR": str(tmp_path / "cache"), **env}
    full.pop("ICL_CACHE", None)
    return subprocess.run([sys.executable, "-m", "icl", *args], capture_output=True, text=True,
                          env=full, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["run", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
    (["run", "surprisal", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["run", "surprisal", "--set", "tasks=identity,triple"], "unknown task 'triple'"),
    (["run", "surprisal", "--set", "colour=blue"], "has no parameter 'colour'"),
    (["run", "surprisal", "--set", "n_prompts=many"], "n_prompts='many' is not an integer; allowed: 2 .. 2000"),
    (["run", "surprisal", "--dtype", "float8"], "dtype must be one of"),
    (["run", "surprisal", "--set", "n_boot=0"], "n_boot=0 is out of range; allowed: 20 .. 10,000"),
    (["run", "surprisal", "--set", "n_boot=-3"], "n_boot=-3 is out of range"),
    (["run", "bayes_fit", "--set", "n_boot=0"], "bayes_fit: parameter n_boot=0 is out of range"),
    (["run", "surprisal", "--seed", "-1"], "seed=-1 is out of range"),
    (["run", "surprisal", "--set", "k=3000"], "k=3000 is out of range; allowed: 1 .. 99"),
    (["run", "surprisal", "--set", "tasks="], "tasks= is empty"),
    (["run", "surprisal", "--set", "n_prompts=100000000"], "n_prompts=100000000 is out of range"),
    (["run", "surprisal", "--set", "tasks=affine-3x+1"], "unknown task 'affine-3x+1': use a task of the suite"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, capsys, monkeypatch):
    """Refused before any model is loaded or anything is computed or written."""
    from icl import models

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded for a bad request")

    monkeypatch.setattr(models, "load", forbidden)
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ICL_CACHE", raising=False)
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "cache").exists()


def test_gpu_requested_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = _run(["run", "surprisal", "--device", "cuda"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith("error: device 'cuda'") and out.stderr.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_list_and_help(tmp_path):
    out = _run(["list"], tmp_path)
    assert out.returncode == 0
    for word in ("surprisal", "smollm2-135m", "llama-3-8b", "double-plus-3"):
        assert word in out.stdout


def test_corrupt_entry_is_refused_and_reported(tmp_path, monkeypatch, capsys, tiny_llama):
    """A corrupt entry makes `run` fail with exit 2 (not silently recompute or use it) and
    `cache verify` exit 1."""
    from icl import experiments
    from icl.config import Config

    cfg = Config(model=str(tiny_llama.spec.location), cache_dir=tmp_path / "cache", dtype="float32")
    params = experiments.make_params(experiments.get("surprisal"),
                                     {"tasks": "identity", "n_prompts": "2", "k": "3"})
    entry, _ = experiments.run("surprisal", cfg, params, loaded=tiny_llama)
    (entry.path / "arrays.npz").write_bytes(b"truncated")
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ICL_CACHE", raising=False)
    code = cli.main(["run", "surprisal", "--model", str(tiny_llama.spec.location), "--dtype", "float32",
                     "--set", "tasks=identity", "--set", "n_prompts=2", "--set", "k=3"])
    err = capsys.readouterr().err
    assert code == 2 and "is corrupt" in err and "--force" in err
    assert cli.main(["cache", "verify"]) == 1
    assert "CORRUPT" in capsys.readouterr().out
