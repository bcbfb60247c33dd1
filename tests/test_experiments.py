"""The experiment registry: every parameter has limits, bad values are refused with a message naming
the parameter and what is allowed, task names are canonical, and keys follow definitions."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from icl import experiments
from icl.cache import key_of
from icl.config import Config
from icl.errors import ConfigError

NAMES = experiments.names()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_a_limit_and_the_defaults_pass(name):
    module = experiments.get(name)
    lims = experiments.limits(module)
    for f in dataclasses.fields(module.Params):
        assert f.name in lims, f"{name}.{f.name} has no entry in LIMITS"
    assert set(lims) <= {f.name for f in dataclasses.fields(module.Params)}, "a limit names no parameter"
    assert experiments.make_params(module) == module.Params()
    assert all(allowed and allowed != "-" for _, _, allowed in experiments.describe_params(module))


@pytest.mark.parametrize("name", NAMES)
def test_numbers_outside_their_range_are_refused(name):
    """For every numeric parameter (or tuple of numbers), one value below and one above its range."""
    module = experiments.get(name)
    hints = typing.get_type_hints(module.Params)
    checked = 0
    for key, limit in experiments.limits(module).items():
        if limit.task or limit.choices or limit.text:
            continue
        of = limit.of or (int if "int" in str(hints[key]) else float)
        step = 1 if of is int else max(abs(limit.hi) * 1e-3, 1e-12)
        for bad in (limit.lo - step, limit.hi + step * (1 if of is int else 1000)):
            raw = str(int(bad) if of is int else bad)
            with pytest.raises(ConfigError, match=f"{name}: parameter {key}=.*allowed: "):
                experiments.make_params(module, {key: raw})
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("overrides,message", [
    ({"n_boot": "0"}, "n_boot=0 is out of range; allowed: 20 .. 10,000"),
    ({"n_boot": "-5"}, "n_boot=-5 is out of range"),
    ({"k": "3000"}, "k=3000 is out of range; allowed: 1 .. 99"),
    ({"n_prompts": "100000000"}, "n_prompts=100000000 is out of range"),
    ({"n_prompts": "1.5"}, "n_prompts='1.5' is not an integer"),
    ({"tasks": ""}, "tasks= is empty"),
    ({"tasks": " , "}, "tasks= is empty"),
    ({"tasks": "identity,identity"}, "repeats a value"),
    ({"tasks": "identity,affine:1,0,affine:+1,00"}, "names one task twice"),
    ({"tasks": "affine:3"}, "unknown task 'affine:3'"),
])
def test_surprisal_parameters_are_checked(overrides, message):
    with pytest.raises(ConfigError, match="surprisal: .*" + message.replace("(", r"\(").replace("+", r"\+")):
        experiments.make_params(experiments.get("surprisal"), overrides)


def test_seed_must_be_a_valid_generator_seed():
    with pytest.raises(ConfigError, match=r"seed=-1 is out of range; allowed: 0 .. 2,147,483,647"):
        experiments.make_params(experiments.get("surprisal"), seed=-1)
    assert experiments.make_params(experiments.get("surprisal"), seed=2**31 - 1).seed == 2**31 - 1


def test_floats_must_be_finite_and_choices_are_enforced():
    with pytest.raises(ConfigError, match="threshold=nan is not a finite number"):
        experiments.make_params(experiments.get("patching"), {"threshold": "nan"})
    with pytest.raises(ConfigError, match="optimizer=rmsprop is not allowed; allowed: one of adam, sgd"):
        experiments.make_params(experiments.get("c2w_pretrained"), {"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="lrs=0.001,inf is not a finite number"):
        experiments.make_params(experiments.get("contexts_to_weights"), {"lrs": "0.001,inf"})
    with pytest.raises(ConfigError, match="is not 'sgd:LR' or 'adam:LR'"):
        experiments.make_params(experiments.get("c2w_toy"), {"opts": "adam:-1"})
    with pytest.raises(ConfigError, match="bad model spec 'linear-100000'"):
        experiments.make_params(experiments.get("slt_llc"), {"models": "linear-100000"})


def test_cross_parameter_problems_are_config_errors():
    with pytest.raises(ConfigError, match="c2w_pretrained: need max\\(ks\\) \\+ n_query <= 99"):
        experiments.make_params(experiments.get("c2w_pretrained"), {"ks": "2,90", "n_query": "12"})
    with pytest.raises(ConfigError, match="ablation: procedure_task must be one of tasks"):
        experiments.make_params(experiments.get("ablation"), {"procedure_task": "identity"})


def test_tuple_of_integers_is_parsed_as_integers():
    """``--set checkpoints=100,200`` gives the same parameters (and key) as the same ints in code."""
    module = experiments.get("llc_phase_change")
    params = experiments.make_params(module, {"checkpoints": "100,200"})
    assert params.checkpoints == (100, 200)
    assert params == dataclasses.replace(module.Params(), checkpoints=(100, 200))


def test_affine_task_is_accepted_and_keyed_by_its_definition(tmp_path):
    module = experiments.get("surprisal")
    config = Config(cache_dir=tmp_path)
    a = experiments.make_params(module, {"tasks": "identity,affine:3,1"})
    b = experiments.make_params(module, {"tasks": "identity, affine:+3,01"})
    c = experiments.make_params(module, {"tasks": "identity,affine:3,2"})
    assert a.tasks == b.tasks == ("identity", "affine:3,1")
    key = lambda p: key_of(experiments.key_inputs(module, p, config))  # noqa: E731
    assert key(a) == key(b) != key(c)
    pretrained = experiments.make_params(experiments.get("c2w_pretrained"), {"task": "affine:2,-3"})
    assert pretrained.task == "affine:2,-3"


def test_content_that_cannot_be_built_is_a_config_error():
    """Parameters made in code skip make_params; building their prompts still fails as a ConfigError
    (the CLI and experiments.run both build them before any model is loaded)."""
    module = experiments.get("surprisal")
    params = dataclasses.replace(module.Params(), k=3000)
    with pytest.raises(ConfigError, match="surprisal: k must be in 1..99"):
        experiments.check_content(module, params)
    with pytest.raises(ConfigError, match="surprisal: k must be in 1..99"):
        experiments.key_inputs(module, params, Config())


def test_entry_status_tells_other_models_custom_runs_and_stale_entries_apart(tmp_path, tiny_llama):
    from icl.cache import Cache

    tiny = Config(model=str(tiny_llama.spec.location), dtype="float32", cache_dir=tmp_path)
    default_model = Config(cache_dir=tmp_path)
    entry, _ = experiments.run("surprisal", tiny, loaded=tiny_llama)  # default parameters, the tiny model
    assert experiments.entry_status(entry, tiny).state == "current"
    other = experiments.entry_status(entry, default_model)
    assert other.state == "other-model" and other.detail.startswith("local:") and other.valid
    module = experiments.get("surprisal")
    params = experiments.make_params(module, {"tasks": "identity", "n_prompts": "2", "k": "3"}, seed=1)
    custom, _ = experiments.run("surprisal", tiny, params, loaded=tiny_llama)
    status = experiments.entry_status(custom, default_model)
    assert status.state == "custom" and status.detail.startswith("--seed 1 --set tasks=identity")
    advice = experiments.misplaced_advice(custom, status)
    assert "user cache" in advice and f"rm -r {custom.path}" in advice
    stale = Cache(tmp_path).store({**custom.key_inputs, "content_sha256": "0" * 64}, custom.arrays, custom.data)
    status = experiments.entry_status(stale, tiny)
    assert status.state == "stale" and "prompts, data or dependencies have changed" in status.detail
    assert "never loaded" in experiments.misplaced_advice(stale, status)


def _small(name, tmp_path):
    """Small settings of a slow-to-start experiment, and the extra arguments its compute needs."""
    from icl.cache import Cache
    from icl.experiments import icl_regression

    if name == "contexts_to_weights":
        p = dataclasses.replace(icl_regression.Params(), steps=10, d_model=16, n_layers=1, n_heads=2, n_eval=20,
                                n_boot=20, lsa_steps=5, warmup=5)
        arrays, data = icl_regression.compute(p)
        upstream = Cache(tmp_path).store(experiments.key_inputs(icl_regression, p, Config()), arrays, data)
        return {"ks": "1", "lrs": "0.01", "steps": "2", "record": "2", "n_contexts": "2", "n_query": "2"}, \
            {"upstream": {"icl_regression": upstream}}
    return {
        "ablation": {"tasks": "plus-1", "procedure_task": "plus-1", "n_pairs": "3", "k": "3", "n_boot": "20",
                     "threshold": "0.01", "iterations": "1"},
        "patching": {"tasks": "plus-1,identity", "n_pairs": "3", "k": "3", "n_boot": "20"},
        "logit_lens": {"tasks": "identity,plus-1", "n_prompts": "2", "k": "3", "n_boot": "20"},
        "induction_heads": {"n_seqs": "3", "half": "10", "tasks": "identity", "n_prompts": "2", "k": "3",
                            "token_low": "0", "token_high": "256", "n_boot": "20"},
        "slt_free_energy": {"n_points": "5", "log10_n_max": "3", "fit_log10_n_min": "1.5",
                            "fit_large_log10_n_min": "2", "data_log10_n": "2", "n_datasets": "2", "n_boot": "20"},
    }[name], {}


@pytest.mark.parametrize("name", ["ablation", "patching", "logit_lens", "induction_heads", "contexts_to_weights",
                                  "slt_free_energy"])
def test_long_experiments_report_progress(name, tmp_path, tiny_llama, capsys):
    """With progress on (as `python -m icl run` sets it) every stage says what it is doing; off, nothing."""
    module = experiments.get(name)
    overrides, extra = _small(name, tmp_path)
    params = experiments.make_params(module, overrides)
    model = tiny_llama if module.USES_MODEL else None
    capsys.readouterr()
    module.compute(params, model, progress=True, **extra)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{name}: ")]
    assert len(lines) >= 2, lines
    module.compute(params, model, progress=False, **extra)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{name}: ")]


def test_forward_only_experiments_run_in_their_cpu_dtype_unless_one_is_asked_for(monkeypatch):
    """On the CPU with a float32 model, an experiment with CPU_DTYPE computes (and is keyed) in it; a
    dtype asked for, another device or a model whose default is not float32 keep the configuration."""
    surprisal, patching = experiments.get("surprisal"), experiments.get("patching")
    assert surprisal.CPU_DTYPE == "bfloat16" and not hasattr(patching, "CPU_DTYPE")
    base = Config()
    assert experiments.run_config(surprisal, base).dtype == "bfloat16"
    assert experiments.run_config(patching, base).dtype is None
    assert experiments.run_config(surprisal, base.with_(dtype="float32")).dtype == "float32"
    assert experiments.run_config(surprisal, base.with_(device="cuda")).dtype is None
    assert experiments.run_config(surprisal, base.with_(model="llama-3-8b")).dtype is None
    assert experiments.model_info(experiments.run_config(surprisal, base))["dtype"] == "bfloat16"
    key_bf16 = experiments.key_inputs(surprisal, experiments.make_params(surprisal), base)
    key_fp32 = experiments.key_inputs(surprisal, experiments.make_params(surprisal), base.with_(dtype="float32"))
    assert key_bf16["model"]["dtype"] == "bfloat16" and key_fp32["model"]["dtype"] == "float32"


def test_every_compute_runs_with_its_thread_count_and_restores_the_callers():
    import sys
    import types

    import torch

    for name in experiments.names():
        assert hasattr(experiments.get(name).compute, "__wrapped__"), f"{name}.compute lacks @with_threads"
    mod = types.ModuleType("fake_threads_experiment")
    mod.THREADS = 1
    seen = []

    def compute():
        seen.append(torch.get_num_threads())
        raise RuntimeError("boom")

    compute.__module__ = mod.__name__
    sys.modules[mod.__name__] = mod
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError):
            experiments.with_threads(compute)()
        assert seen == [1] and torch.get_num_threads() == 2  # restored even after an error
    finally:
        torch.set_num_threads(before)
        del sys.modules[mod.__name__]
