"""Fine-tuning a declared subset of a pretrained language model on a context, and putting it back.

Chapter 8 asks whether a prompt's effect is a small weight update (Q1 of the contexts-to-weights
note): does the model that reads ``k`` examples and then a query predict what the same model predicts
for the query *alone* after a few gradient steps on those ``k`` examples? For a pretrained language
model the examples are lines of text such as ``"(28, 29)\\n"``; "training on the context" means
optimizer steps on the language-model loss of each line fed as its own sequence, and the no-context
prediction is then read from the query ``"(x, "`` alone.

Only a declared subset is trained: the MLPs of a few layers (:class:`Subset`). That bounds the memory
(weights, gradients and optimizer state of the subset only; see :func:`memory_bytes`) so that the same
experiment fits one 24 GB GPU for Meta-Llama-3-8B in bf16, and it makes the runs fast: everything
below the first trained layer is fixed, so its output is computed once per sequence batch and only the
layers from there on run at every step (:class:`Tail`). Pieces:

* :class:`Subset` makes the named MLPs the only trainable parameters, in float32 even when the model
  is loaded in bf16 or fp16 (a bf16 weight cannot take an update of relative size 10⁻⁴: its spacing is
  2⁻⁷ of its magnitude), with hooks that cast the module's input to float32 and its output back. It
  keeps a snapshot of the subset on the CPU, :meth:`Subset.restore` puts it back between runs, and on
  exit the subset returns to its dtype and values bit for bit (with ``requires_grad`` flags, gradients
  and train/eval mode), even after an error. A model loaded once and shared by several experiments is
  never left fine-tuned; :meth:`Subset.unchanged` checks this with ``torch.equal``.
* :class:`Tail` runs the decoder layers from ``first`` on from a cached residual stream. Its logits are
  bit-identical to a full forward pass (a test checks this).
* :func:`lm_loss` is the mean next-token cross-entropy over chosen target tokens of right-padded
  sequences (the whole line, or the answer only).
* :func:`score_answers` reads, for sequences whose last example is the query, the log-probability of
  the whole answer (teacher-forced: digits and ``")"``), whether greedy decoding writes it, and the full
  distribution over the answer's first token, which is what a KL between two predictions compares.

The model is a Hugging Face Llama-family causal LM (``model(input_ids=...).logits``, with
``model.model.layers``); the bridge of :mod:`icl.models` wraps one (its ``original_model``), whose
logits are the bridge's own. Right padding never changes the scores of real tokens (attention is
causal and real tokens come first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

OPTIMIZER_STATE_BYTES = {"adam": 8, "sgd": 0}  # fp32 optimizer state per trained parameter


def mlp_layers(n_layers: int, layers: tuple[int, ...] | list[int]) -> list[int]:
    """Layer indices (negative ones count from the end) as sorted non-negative indices."""
    out = sorted({i % n_layers for i in layers if -n_layers <= i < n_layers})
    if len(out) != len(set(layers)):
        raise ValueError(f"layers {tuple(layers)} are not distinct layers of a {n_layers}-layer model")
    return out


def memory_bytes(n_params: int, n_trained: int, weight_bytes: int, optimizer: str) -> dict[str, int]:
    """Device memory of fine-tuning a subset, before activations: the frozen weights in their dtype,
    the trained subset in float32 with its float32 gradient and optimizer state (Adam: two moments).
    The snapshot that restores the subset lives on the CPU (``snapshot_cpu``)."""
    frozen = (n_params - n_trained) * weight_bytes
    trained = n_trained * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])
    return {"frozen_weights": frozen, "trained_state": trained, "device_total": frozen + trained,
            "snapshot_cpu": n_trained * weight_bytes}


def _cast_args(dtype: torch.dtype) -> Callable:
    def hook(module, args, kwargs):
        cast = lambda a: a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def _cast_output(dtype: torch.dtype) -> Callable:
    def hook(module, args, output):
        if torch.is_tensor(output):
            return output.to(dtype)
        if isinstance(output, tuple):
            return tuple(o.to(dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in output)
        return output
    return hook


class Subset:
    """The MLPs of ``layers`` of a Llama-family model as the only trainable parameters (a context manager).

    Inside the block they are float32 (upcast from the model's dtype, which is exact) and require
    gradients; every other parameter is frozen. :meth:`restore` copies the CPU snapshot back.
    """

    def __init__(self, model: torch.nn.Module, layers: list[int]):
        self.model, self.layers = model, layers
        self.names = [f"model.layers.{i}.mlp" for i in layers]
        self.modules = [model.get_submodule(n) for n in self.names]
        self.params = [p for m in self.modules for p in m.parameters()]
        self.dtype = self.params[0].dtype
        self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]
        self._hooks: list[Any] = []

    @property
    def n_trained(self) -> int:
        return sum(p.numel() for p in self.params)

    def __enter__(self) -> "Subset":
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._training = self.model.training
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.dtype != torch.float32:
            for m in self.modules:
                m.float()
                self._hooks.append(m.register_forward_pre_hook(_cast_args(torch.float32), with_kwargs=True))
                self._hooks.append(m.register_forward_hook(_cast_output(self.dtype)))
        for p in self.params:
            p.requires_grad_(True)
        return self

    def restore(self) -> None:
        """Copy the snapshot back into the subset and drop its gradients."""
        with torch.no_grad():
            for p, s in zip(self.params, self.snapshot):
                p.copy_(s)
                p.grad = None

    def __exit__(self, *exc: Any) -> None:
        self.restore()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self.modules:
            m.to(self.dtype)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._training)

    def unchanged(self) -> bool:
        """Whether every parameter of the subset equals its snapshot, in value and dtype."""
        return all(p.dtype == s.dtype and torch.equal(p.detach().cpu(), s)
                   for p, s in zip(self.params, self.snapshot))


class Tail:
    """Decoder layers ``first..`` of a Llama-family causal LM, run from the residual stream at their input.

    :meth:`prefix` computes that stream once (without gradients); :meth:`logits` runs the rest (layers,
    final norm, unembedding) and gives the same logits as ``model(input_ids=ids).logits``.
    """

    def __init__(self, model: Any, first: int):
        self.model, self.first = model, first

    def _run(self, hidden: torch.Tensor, layers: Any) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        rope = self.model.model.rotary_emb(hidden, position_ids=pos)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    @torch.no_grad()
    def prefix(self, ids: torch.Tensor) -> torch.Tensor:  # [batch, len] -> [batch, len, d_model]
        inner = self.model.model
        return self._run(inner.embed_tokens(ids.to(inner.embed_tokens.weight.device)), inner.layers[: self.first])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, len, d_model] -> [batch, len, vocab]
        inner = self.model.model
        return self.model.lm_head(inner.norm(self._run(hidden, inner.layers[self.first:])))


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token lists into a [batch, max_len] tensor."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


def loss_from_logits(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens marked in ``targets`` ([batch, len] bool; token ``t`` is
    predicted from tokens ``< t``, so ``targets[:, 0]`` must be False), each predicted from its prefix."""
    if targets[:, 0].any():
        raise ValueError("the first token of a sequence has no prefix to be predicted from")
    logits = logits[:, :-1].float()  # [batch, len - 1, vocab]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none")
    w = targets[:, 1:].to(ce.device, ce.dtype)
    return (ce * w).sum() / w.sum()


def lm_loss(model: Any, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`loss_from_logits` of a full forward pass of ``model``."""
    return loss_from_logits(model(input_ids=ids.to(model.device)).logits, ids, targets)


@dataclass(frozen=True)
class AnswerScores:
    logp: torch.Tensor  # [n] log-probability of the whole answer (nats, float64)
    exact: torch.Tensor  # [n] bool: every answer token is the argmax at its position
    first: torch.Tensor  # [n, vocab] log-probabilities of the answer's first token (float64)


def scores_from_logits(logits: torch.Tensor, seqs: list[list[int]], answers: list[tuple[int, ...]]) -> AnswerScores:
    """Score answer token positions ``answers[i]`` of each sequence ``seqs[i]`` from logits [n, len, vocab]."""
    logp, exact, first = [], [], []
    for row, (ids, a) in enumerate(zip(seqs, answers)):
        pos = torch.tensor(a) - 1  # answer token t is predicted at position t - 1
        tok = torch.tensor([ids[t] for t in a])
        rows = logits[row, pos.to(logits.device)].double().cpu()  # [len(a), vocab]
        lsm = torch.log_softmax(rows, -1)
        logp.append(lsm[torch.arange(len(a)), tok].sum())
        exact.append(bool((rows.argmax(-1) == tok).all()))
        first.append(lsm[0])
    return AnswerScores(torch.stack(logp), torch.tensor(exact), torch.stack(first))


@torch.no_grad()
def score_answers(model: Any, seqs: list[list[int]], answers: list[tuple[int, ...]], pad_id: int,
                  batch_size: int = 16) -> AnswerScores:
    """Score answer token positions ``answers[i]`` of each sequence ``seqs[i]`` (token ids)."""
    parts = []
    for s in range(0, len(seqs), batch_size):
        chunk, ans = seqs[s : s + batch_size], answers[s : s + batch_size]
        logits = model(input_ids=pad(chunk, pad_id).to(model.device)).logits
        parts.append(scores_from_logits(logits, chunk, ans))
    return AnswerScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logp", "exact", "first")))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, from log-probabilities (nats)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)
