"""The in-context learning score on long natural text.

Olsson et al. (2022) summarise in-context learning in one number: the loss of a token late in a
context minus the loss of a token early in it (token 500 minus token 50). A model that uses its
context predicts later tokens better, so the score is negative, and the more negative the more it
gains from context. Their small models reach about -0.4 nats once induction heads have formed.

We measure it on long documents that ship with the package (:mod:`icl.data`: topics of the Python
reference documentation, PSF licence). Each document is tokenised and cut into non-overlapping windows
of ``window`` tokens; every window is scored in one forward pass, giving the loss at every position.
A single position is noisy, so besides the per-position curve we report the score with the losses
averaged over ``±halfwidth`` positions around the early and the late index, with a bootstrap interval
over windows.
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
from icl.experiments import between
from icl.scoring import token_logprobs
from icl.stats import bootstrap_mean_ci

NAME = "icl_score"
VERSION = 1
CHAPTER = "report/01-surprisal.qmd"
USES_MODEL = True
DESCRIPTION = "ICL score (loss at token 500 minus token 50) on long text shipped with the package"
THREADS = 1  # see icl.experiments.threads_of
BATCH_SIZE = 4


@dataclass(frozen=True)
class Params:
    window: int = 512
    max_windows_per_doc: int = 16
    n_windows: int = 128
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


def windows(tokenizer, params: Params) -> list[list[int]]:
    out = []
    for _, text in documents():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for w in range(min(len(ids) // params.window, params.max_windows_per_doc)):
            out.append(ids[w * params.window : (w + 1) * params.window])
    if len(out) < params.n_windows:
        # The count depends on the model's tokenizer, so this is checked once the model is loaded.
        raise ConfigError(f"{NAME}: the shipped text gives only {len(out)} windows of {params.window} tokens "
                          f"(at most {params.max_windows_per_doc} per document) with this model's tokenizer; "
                          f"use --set n_windows={len(out)} or less")
    return out[: params.n_windows]


def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    torch.manual_seed(params.seed)
    wins = windows(model.tokenizer, params)
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
    s_mean, s_lo, s_hi = bootstrap_mean_ci(score, n_boot=params.n_boot, seed=params.seed)
    p_mean, p_lo, p_hi = bootstrap_mean_ci(single, n_boot=params.n_boot, seed=params.seed)
    mean, lo, hi = bootstrap_mean_ci(losses, n_boot=params.n_boot, seed=params.seed)
    arrays = {
        "loss.mean": mean.astype(np.float32), "loss.lo": lo.astype(np.float32), "loss.hi": hi.astype(np.float32),
        "token_index": np.arange(2, params.window + 1, dtype=np.int32),
        "early_loss": early.astype(np.float32), "late_loss": late.astype(np.float32),
    }
    data = {
        "model": model.spec.name,
        "n_windows": len(wins),
        "window": params.window,
        "source": "Python 3.11.7 reference documentation topics (pydoc_data), PSF licence",
        "score": [float(s_mean[0]), float(s_lo[0]), float(s_hi[0])],
        "score_single_token": [float(p_mean[0]), float(p_lo[0]), float(p_hi[0])],
        "early_loss": float(early.mean()),
        "late_loss": float(late.mean()),
        "mean_loss": float(losses.mean()),
    }
    return arrays, data
