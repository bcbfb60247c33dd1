"""The in-context learning score on long natural text.

Olsson et al. (2022) summarise in-context learning in one number: the loss of a token late in a
context minus the loss of a token early in it (token 500 minus token 50). A model that uses its
context predicts later tokens better, so the score is negative, and the more negative the more it
gains from context. Their small models reach about -0.4 nats once induction heads have formed.

We measure it on long documents that ship with the package (:mod:`icl.data`: topics of the Python
reference documentation, PSF licence). Each document is tokenised and cut into non-overlapping windows
of ``window`` tokens; every window is scored in one forward pass, giving the loss at every position.
A single position is noisy, so besides the per-position curve we report the score with the losses
averaged over ``±halfwidth`` positions around the early and the late index. Up to
``max_windows_per_doc`` windows come from one document, and they share its style and vocabulary, so
the bootstrap intervals resample documents (:func:`icl.stats.cluster_bootstrap_mean_ci`), not windows.
A tokenizer that starts text with a BOS token (Llama-3) gets it at the start of every window.

Only forward passes: a float32 model on the CPU runs here in bfloat16 (``CPU_DTYPE``), about twice as
fast; ``benchmarks/cold_compute.py --reference`` checks the statistics against a float32 run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from icl.errors import ConfigError
from icl.experiments import between, with_threads
from icl.scoring import token_logprobs
from icl.stats import bootstrap_mean_ci, cluster_bootstrap_mean_ci

NAME = "icl_score"
VERSION = 2
CHAPTER = "report/01-surprisal.qmd"
USES_MODEL = True
DESCRIPTION = "ICL score (loss at token 500 minus token 50) on long text shipped with the package"
THREADS = 1  # see icl.experiments.threads_of
CPU_DTYPE = "bfloat16"  # on the CPU a float32 model runs in bf16 here (forward only); see run_config
BATCH_SIZE = 4


@dataclass(frozen=True)
class Params:
    window: int = 512
    max_windows_per_doc: int = 16
    # 120: what the shipped text gives both tokenizers (SmolLM2 ~128+, Llama-3 121 at 16 per document)
    n_windows: int = 120
    early: int = 50
    late: int = 500
    halfwidth: int = 5
    seed: int = 0
    n_boot: int = 2000

    def validate(self) -> None:
        if not 0 <= self.early - self.halfwidth < self.early < self.late < self.late + self.halfwidth < self.window:
            raise ValueError("need 0 <= early - halfwidth < early < late and late + halfwidth < window")


LIMITS = {"window": between(16, 2048), "max_windows_per_doc": between(1, 256), "n_windows": between(2, 2048),
          "early": between(1, 2047), "late": between(2, 2047), "halfwidth": between(0, 256),
          "n_boot": between(20, 10_000)}


def documents() -> list[tuple[str, str]]:
    """(name, text) pairs of the shipped reference text."""
    raw = resources.files("icl").joinpath("data/python_reference.txt").read_text(encoding="utf-8")
    docs, name, lines = [], None, []
    for line in raw.splitlines():
        if line.startswith("==== ") and line.endswith(" ===="):
            if name is not None:
                docs.append((name, "\n".join(lines)))
            name, lines = line[5:-5], []
        else:
            lines.append(line)
    if name is not None:
        docs.append((name, "\n".join(lines)))
    return docs


def content_digest(params: Params) -> str:
    h = hashlib.sha256()
    for name, text in documents():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def bos_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Llama-3: ``<|begin_of_text|>``; SmolLM2:
    none). Every window starts with them, as the model saw text in training."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain):] == plain else []


def windows(tokenizer, params: Params, with_documents: bool = False):
    """Windows of ``params.window`` tokens (BOS included, if the tokenizer adds one), at most
    ``max_windows_per_doc`` consecutive ones per document; with ``with_documents`` also each window's
    document index (the bootstrap resamples documents, not windows)."""
    out, docs = [], []
    bos = bos_ids(tokenizer)
    body = params.window - len(bos)
    for d, (_, text) in enumerate(documents()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for w in range(min(len(ids) // body, params.max_windows_per_doc)):
            out.append(bos + ids[w * body : (w + 1) * body])
            docs.append(d)
    if len(out) < params.n_windows:
        # The count depends on the model's tokenizer, so this is checked once the model is loaded.
        raise ConfigError(f"{NAME}: the shipped text gives only {len(out)} windows of {params.window} tokens "
                          f"(at most {params.max_windows_per_doc} per document) with this model's tokenizer; "
                          f"use --set n_windows={len(out)} or less")
    if with_documents:
        return out[: params.n_windows], np.array(docs[: params.n_windows])
    return out[: params.n_windows]


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    torch.manual_seed(params.seed)
    wins, docs = windows(model.tokenizer, params, with_documents=True)
    losses = np.zeros((len(wins), params.window - 1), dtype=np.float64)  # loss of token t+1 given <= t
    pad = model.tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(wins), BATCH_SIZE), desc="windows", disable=not progress, leave=False):
        batch = wins[start : start + BATCH_SIZE]
        logp, _ = token_logprobs(model.bridge, batch, pad, model.device)
        losses[start : start + len(batch)] = -logp[:, 1:].double().numpy()
    # Column j of `losses` is the loss of the (j + 2)-th token of the window, so the 1-based token
    # index t used by Olsson et al. ("token 500") is column t - 2.
    def around(t: int) -> np.ndarray:
        return losses[:, t - 2 - params.halfwidth : t - 1 + params.halfwidth].mean(axis=1)

    early, late = around(params.early), around(params.late)
    score = (late - early)[:, None]
    single = (losses[:, params.late - 2] - losses[:, params.early - 2])[:, None]
    # windows of one document are correlated: intervals resample documents (windows, if only one)
    unit = "documents" if len(np.unique(docs)) >= 2 else "windows"

    def interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if unit == "documents":
            return cluster_bootstrap_mean_ci(values, docs, n_boot=params.n_boot, seed=params.seed)
        return bootstrap_mean_ci(values, n_boot=params.n_boot, seed=params.seed)

    s_mean, s_lo, s_hi = interval(score)
    p_mean, p_lo, p_hi = interval(single)
    mean, lo, hi = interval(losses)
    arrays = {
        "loss.mean": mean.astype(np.float32), "loss.lo": lo.astype(np.float32), "loss.hi": hi.astype(np.float32),
        "token_index": np.arange(2, params.window + 1, dtype=np.int32),
        "early_loss": early.astype(np.float32), "late_loss": late.astype(np.float32),
    }
    data = {
        "model": model.spec.name,
        "n_windows": len(wins),
        "n_documents": int(len(np.unique(docs))),  # >= 2: intervals resample documents; else windows
        "window": params.window,
        "source": "Python 3.11.7 reference documentation topics (pydoc_data), PSF licence",
        "score": [float(s_mean[0]), float(s_lo[0]), float(s_hi[0])],
        "score_single_token": [float(p_mean[0]), float(p_lo[0]), float(p_hi[0])],
        "early_loss": float(early.mean()),
        "late_loss": float(late.mean()),
        "mean_loss": float(losses.mean()),
    }
    return arrays, data
