"""Fine-tuning a pretrained language model on a context, and putting its weights back.

Chapter 8 asks whether a prompt's effect is a small weight update (Q1 of the contexts-to-weights
note): does the model that reads ``k`` examples and then a query predict what the same model predicts
for the query *alone* after a few gradient steps on those ``k`` examples? For a pretrained language
model the examples are lines of text such as ``"(28, 29)\\n"``; "training on the context" means
optimizer steps on the language-model loss of each line fed as its own sequence, and the no-context
prediction is then read from the query ``"(x, "`` alone.

Three pieces, each small:

* :func:`restoring` snapshots every parameter of a module and puts it back (bit for bit, with the
  ``requires_grad`` flags, gradients and train/eval mode) when the block ends, even on an error. A
  model loaded once and shared by several experiments is never left fine-tuned.
* :func:`lm_loss` is the mean next-token cross-entropy over chosen target tokens of right-padded
  sequences (the whole line, or the answer only).
* :func:`score_answers` reads, for sequences whose last example is the query, the log-probability of
  the whole answer (teacher-forced: digits and ``")"``), whether greedy decoding writes it, and the full
  distribution over the answer's first token, which is what a KL between two predictions compares.

The model is called as a Hugging Face causal LM (``model(input_ids=...).logits``); the bridge of
:mod:`icl.models` wraps one (its ``original_model``), whose logits are the bridge's own. Right padding
never changes the scores of real tokens (attention is causal and real tokens come first).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@contextmanager
def restoring(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Snapshot ``model``'s parameters; restore them (and flags, grads, mode) when the block exits.

    Yields the snapshot (name -> detached copy), which :func:`restore` accepts to reset the weights
    between runs inside the block. Tied parameters appear once in ``named_parameters`` and are restored
    once.
    """
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    training = model.training
    try:
        yield snapshot
    finally:
        restore(model, snapshot)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(training)


def restore(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Copy ``snapshot``'s values back into ``model``'s parameters and drop their gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(snapshot[name])
            p.grad = None


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token lists into a [batch, max_len] tensor."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


def lm_loss(model: Any, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens marked in ``targets`` ([batch, len] bool; token ``t`` is
    predicted from tokens ``< t``, so ``targets[:, 0]`` must be False), each predicted from its prefix."""
    if targets[:, 0].any():
        raise ValueError("the first token of a sequence has no prefix to be predicted from")
    logits = model(input_ids=ids).logits[:, :-1].float()  # [batch, len - 1, vocab]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    w = targets[:, 1:].to(ce.dtype)
    return (ce * w).sum() / w.sum()


@dataclass(frozen=True)
class AnswerScores:
    logp: torch.Tensor  # [n] log-probability of the whole answer (nats, float64)
    exact: torch.Tensor  # [n] bool: every answer token is the argmax at its position
    first: torch.Tensor  # [n, vocab] log-probabilities of the answer's first token (float64)


@torch.no_grad()
def score_answers(model: Any, seqs: list[list[int]], answers: list[tuple[int, ...]], pad_id: int,
                  batch_size: int = 16) -> AnswerScores:
    """Score answer token positions ``answers[i]`` of each sequence ``seqs[i]`` (token ids)."""
    logp, exact, first = [], [], []
    for s in range(0, len(seqs), batch_size):
        chunk, ans = seqs[s : s + batch_size], answers[s : s + batch_size]
        logits = model(input_ids=pad(chunk, pad_id)).logits.double()
        lsm = torch.log_softmax(logits, -1)
        for row, (ids, a) in enumerate(zip(chunk, ans)):
            pos = torch.tensor(a) - 1  # answer token t is predicted at position t - 1
            tok = torch.tensor([ids[t] for t in a])
            logp.append(lsm[row, pos, tok].sum())
            exact.append(bool((logits[row, pos].argmax(-1) == tok).all()))
            first.append(lsm[row, pos[0]])
    return AnswerScores(torch.stack(logp), torch.tensor(exact), torch.stack(first))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, from log-probabilities (nats)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)
