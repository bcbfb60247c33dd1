"""The command line: one-line errors with exit status 2, before any model load, and nothing written;
list (and its parameters); run (where results go, what it prints); cache status/verify."""

import dataclasses
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
    (["run", "all", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["run", "report/99-nothing.qmd"], "report/99-nothing.qmd is not a page of the book"),
    (["run", "report/references.qmd"], "reads no cached results"),
    (["run", "report/05-ablation.qmd", "--seed", "3"], "--set and --seed apply to one experiment"),
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
    assert code == 2 and "is corrupt" in err and f"rm -r {entry.path}" in err and "--force" not in err
    assert cli.main(["cache", "verify"]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def _isolated(monkeypatch, tmp_path):
    """The main cache, the user cache and no ICL_CACHE_DIR, as for a user with default settings."""
    from icl import config

    monkeypatch.delenv("ICL_CACHE_DIR", raising=False)
    monkeypatch.delenv("ICL_CACHE", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CACHE_DIR", tmp_path / "main")
    monkeypatch.setattr(config, "USER_CACHE_DIR", tmp_path / "user")
    return tmp_path / "main", tmp_path / "user"


def _tiny_args(tiny_llama, *more):
    return ["run", "surprisal", "--model", str(tiny_llama.spec.location), "--dtype", "float32",
            "--set", "tasks=identity", "--set", "k=3", *more]


def test_custom_runs_go_to_the_user_cache(tmp_path, monkeypatch, capsys, tiny_llama):
    """The README's `run surprisal --force --seed 1 --set n_prompts=20` does not touch the main cache
    (committed for the default model), and the path it prints is one the user can open."""
    from icl import models

    main, user = _isolated(monkeypatch, tmp_path)
    monkeypatch.setattr(models, "load", lambda *a, **k: tiny_llama)
    monkeypatch.chdir(tmp_path)
    assert cli.main(_tiny_args(tiny_llama, "--force", "--seed", "1", "--set", "n_prompts=2")) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("surprisal: computed -> user/surprisal/") and not main.exists()
    assert len(list((user / "surprisal").iterdir())) == 1
    # readonly finds it there too, and a miss names the whole command, --set options included
    monkeypatch.setenv("ICL_CACHE", "readonly")
    assert cli.main(_tiny_args(tiny_llama, "--seed", "1", "--set", "n_prompts=2")) == 0
    assert cli.main(_tiny_args(tiny_llama, "--seed", "2", "--set", "n_prompts=2")) == 2
    err = capsys.readouterr().err
    assert f"--dtype float32 --seed 2 --set tasks=identity --set n_prompts=2 --set k=3" in err
    assert "custom parameters" in err and str(user) in err


def test_explicit_cache_dir_takes_every_result_and_paths_are_absolute_outside_cwd(
        tmp_path, monkeypatch, capsys, tiny_llama):
    from icl import models

    monkeypatch.setattr(models, "load", lambda *a, **k: tiny_llama)
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("ICL_CACHE", raising=False)
    monkeypatch.chdir(tmp_path.parent)
    other = tmp_path.parent / "cwd"
    other.mkdir(exist_ok=True)
    monkeypatch.chdir(other)
    assert cli.main(_tiny_args(tiny_llama, "--set", "n_prompts=2")) == 0
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'elsewhere' / 'surprisal'}/" in out


def test_cache_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = _run(["run", "surprisal"], tmp_path, ICL_CACHE_DIR=str(afile))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: the cache folder {afile} is a file, not a folder")
    assert afile.read_text() == ""


def test_unwritable_cache_is_refused_before_any_model_load(unwritable_folder, monkeypatch, capsys):
    from icl import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model first"))
    folder = unwritable_folder
    monkeypatch.setenv("ICL_CACHE_DIR", str(folder / "cache"))
    monkeypatch.delenv("ICL_CACHE", raising=False)
    assert cli.main(["run", "slt_free_energy", "--set", "n_datasets=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write results under") and "is not writable" in err
    assert list(folder.iterdir()) == []


def test_local_folder_with_empty_config_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """The 'not a checkpoint' error is not swallowed by the fallback for hub models."""
    from icl import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("tried to load the folder"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["run", "surprisal", "--model", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a Hugging Face model config" in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_list_into_a_closed_pipe_is_quiet(tmp_path):
    """`python -m icl list | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "icl", "list", "--params"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "ICL_CACHE_DIR": str(tmp_path)})
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away before most of the output is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and err == ""
    assert proc.returncode == 141


def test_parameters_are_listed_with_defaults_and_allowed_values(tmp_path):
    out = _run(["list", "--params", "surprisal"], tmp_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "parameters of surprisal (--set KEY=VALUE, --seed S):"
    assert any(line.split() == ["n_prompts", "default", "100"] for line in lines)
    assert "allowed: 2 .. 2000" in out.stdout and "affine:A,B" in out.stdout
    every = _run(["list", "--params"], tmp_path)
    assert all(f"parameters of {name} " in every.stdout for name in cli.experiments.names())
    helped = _run(["run", "patching", "--help"], tmp_path)
    assert helped.returncode == 0 and "parameters of patching" in helped.stdout
    assert "threshold" in helped.stdout and "allowed: 0.01 .. 1" in helped.stdout
    bad = _run(["list", "--params", "nope"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown experiment 'nope'")


@pytest.mark.parametrize("args,message", [
    (["run", "surprisal", "--set", "k=3", "--set", "k=4"], "--set k is given twice"),
    (["run", "surprisal", "--set", "=3"], "--set expects KEY=VALUE"),
    (["run", "all", "--seed", "3"], "apply to one experiment, not 'all'"),
    (["run", "surprisal", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    out = _run(args, tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "cache").exists()


def test_cache_status_labels_entries_by_what_they_are(tmp_path, monkeypatch, capsys, tiny_llama):
    """Valid entries for other parameters or models are not called stale; entries of older code are;
    with a model whose keys are unknown here, its entries count as missing."""
    from icl import experiments, models
    from icl.cache import Cache
    from icl.config import Config
    from icl.experiments import bayes_toy

    monkeypatch.setattr(models, "load", lambda *a, **k: tiny_llama)
    main, user = _isolated(monkeypatch, tmp_path)
    tiny = str(tiny_llama.spec.location)
    custom = experiments.make_params(experiments.get("surprisal"), {"tasks": "identity", "n_prompts": "2", "k": "3"})
    experiments.run("surprisal", Config.from_env(model=tiny, dtype="float32"), custom, loaded=tiny_llama)
    toy = dataclasses.replace(bayes_toy.Params(), steps=20, eval_every=10, n_eval=8, k=4)
    old, _ = experiments.run("bayes_toy", Config.from_env(), toy)
    # an entry written by an older version of the code: version 0
    stale_inputs = {**old.key_inputs, "version": 0}
    Cache(user).store(stale_inputs, old.arrays, old.data)
    assert cli.main(["cache", "status"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] + ("/stale" if "stale:" in line else ""): line for line in out.splitlines()
            if line.startswith(("surprisal", "bayes_toy"))}
    assert "ok, custom run: --set tasks=identity --set n_prompts=2 --set k=3 on local:" in rows["surprisal"]
    assert "ok, custom run: --set k=4 --set steps=20 --set eval_every=10" in rows["bayes_toy"]
    from icl.experiments import bayes_toy

    assert (f"stale: computed by version 0 of bayes_toy; the code is at version {bayes_toy.VERSION}"
            in rows["bayes_toy/stale"])
    n_all = len(experiments.names())  # every experiment is missing from this fresh cache
    assert f"(1 stale, 0 corrupt), {n_all} missing for smollm2-135m" in out
    monkeypatch.setenv("ICL_MODEL", "llama-3-8b")
    assert cli.main(["cache", "status"]) == 0
    out = capsys.readouterr().out
    assert "missing for llama-3-8b, keys not known yet: surprisal, bayes_fit" in out
    assert f"{n_all} missing for llama-3-8b" in out


def test_run_all_with_jobs_computes_nothing_that_is_cached(tmp_path):
    """With every entry committed, `run all --jobs 2` starts no worker and reports them all cached."""
    from icl import experiments
    from icl.config import REPO_ROOT

    out = _run(["run", "all", "--jobs", "2"], tmp_path, ICL_CACHE_DIR=str(REPO_ROOT / "cache"))
    assert out.returncode == 0, out.stderr
    assert f"0 computed, {len(experiments.names())} already cached" in out.stdout


def test_run_a_chapter_fills_what_it_reads_and_what_that_depends_on(tmp_path, monkeypatch, capsys):
    """`run report/05-ablation.qmd` names the chapter's experiments and their dependencies, dependencies
    first, from the repository root or from anywhere else, and the `book.load` calls are what it reads."""
    from icl import quarto
    from icl.config import REPO_ROOT

    assert quarto.chapter_experiments(REPO_ROOT / "report" / "06-induction-heads.qmd") == [
        "induction_heads", "ablation", "induction_ablation"]
    assert cli._chapter_experiments("report/06-induction-heads.qmd") == [
        "induction_heads", "patching", "ablation", "induction_ablation"]
    monkeypatch.chdir(REPO_ROOT / "report")
    assert cli._chapter_experiments("05-ablation.qmd") == ["patching", "ablation"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICL_CACHE_DIR", str(REPO_ROOT / "cache"))
    monkeypatch.setenv("ICL_CACHE", "readonly")
    assert cli.main(["run", "report/03-logit-lens.qmd"]) == 0
    assert capsys.readouterr().out.startswith("logit_lens: cached -> ")
