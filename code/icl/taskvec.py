"""Task vectors and function vectors: one residual vector that carries the task.

Two published ways of finding "the task" inside a model that learns in context:

* A *task vector* (Hendel et al. 2023) is the residual stream at the last query position of a k-shot
  prompt, at one layer, averaged over many prompts of the task. Written over the residual stream of a
  zero-shot prompt (the query alone) at that layer and position, it should make the model answer by
  the task's rule. The layer at which this works best is the task-vector layer.
* A *function vector* (Todd et al. 2024) is the sum of the mean outputs of a few attention heads, the
  heads whose mean output (over k-shot prompts, at the last position) most raises the correct answer
  when patched into prompts whose demonstration labels are shuffled (their *causal indirect effect*).
  Added to the residual stream of a zero-shot prompt at a middle layer, it should install the task.

Everything here is measured with the whole answer, teacher-forced: the log-probability of every
answer token (digits and ``)``; SmolLM2 writes one token per digit, Llama-3 one per number up to 999),
each read at the position before it, summed. Positions are found from the prompt's character spans
(:func:`icl.scoring.encode`), so a tokenizer that adds a BOS (Llama-3) or merges tokens is handled
without special cases. Prompts of different lengths are right-padded: attention is causal, so padding
never changes a real position.

The forward passes reuse :class:`icl.runner.LlamaStack`'s blocks: :func:`answer_logp` runs a full pass
with a residual-stream edit at one layer and the query position of each row (replace or add a
vector) and an optional per-head ``z`` edit, and :func:`run_from` restarts a pass at any layer over the
last positions of each prompt, attending to cached keys and values (for per-head patches, which
change nothing before their layer and position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from icl.runner import LlamaStack, ZEdit
from icl.scoring import encode
from icl.tasks import Prompt


@dataclass(frozen=True)
class PromptBatch:
    """Tokenized prompts with the positions of every example's answer."""

    ids: tuple[tuple[int, ...], ...]  # each prompt's tokens up to its last answer's last token
    answers: tuple[tuple[tuple[int, ...], ...], ...]  # [prompt][example] token indices of the answer
    pad: int

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return len(self.answers[0])

    def pred(self, example: int = -1) -> torch.Tensor:
        """``[n]`` position that predicts example ``example``'s first answer token (the query position
        for the last example: the space after its comma)."""
        return torch.tensor([a[example][0] - 1 for a in self.answers])

    def preds(self) -> torch.Tensor:
        """``[n, k]`` the prediction position of every example's answer."""
        return torch.tensor([[e[0] - 1 for e in a] for a in self.answers])


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> PromptBatch:
    """Tokenize prompts (the tokenizer's own special tokens included), cut after the last answer."""
    if not prompts:
        raise ValueError("no prompts")
    if len({p.k for p in prompts}) != 1:
        raise ValueError("all prompts must have the same number of examples")
    ids, answers = [], []
    for p in prompts:
        enc = encode(tokenizer, p)
        end = enc.answer_tokens[-1][-1] + 1
        ids.append(tuple(enc.ids[:end]))
        answers.append(enc.answer_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return PromptBatch(tuple(ids), tuple(answers), int(pad))


def padded(pb: PromptBatch, rows: Sequence[int]) -> torch.Tensor:
    """``[len(rows), T]`` right-padded ids of the chosen prompts."""
    T = max(len(pb.ids[i]) for i in rows)
    out = torch.full((len(rows), T), pb.pad, dtype=torch.long)
    for r, i in enumerate(rows):
        out[r, : len(pb.ids[i])] = torch.tensor(pb.ids[i])
    return out


def answer_index(pb: PromptBatch, rows: Sequence[int], examples: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where to read the answers of ``examples`` of each row: positions ``[R, E, S]`` (the position
    before each answer token), target ids ``[R, E, S]`` and a validity mask ``[R, E, S]`` (answers
    shorter than the longest, ``S`` tokens, are padded)."""
    S = max(len(pb.answers[i][e]) for i in rows for e in examples)
    R, E = len(rows), len(examples)
    pos = torch.zeros((R, E, S), dtype=torch.long)
    tgt = torch.zeros((R, E, S), dtype=torch.long)
    valid = torch.zeros((R, E, S), dtype=torch.bool)
    for r, i in enumerate(rows):
        for j, e in enumerate(examples):
            toks = pb.answers[i][e]
            for s, t in enumerate(toks):
                pos[r, j, s], tgt[r, j, s], valid[r, j, s] = t - 1, pb.ids[i][t], True
            pos[r, j, len(toks):] = toks[-1] - 1
    return pos, tgt, valid


@torch.inference_mode()
def whole_answer_logp(stack: LlamaStack, final: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``final`` ``[R, E, S, d_model]`` final residuals at the answer-reading positions -> ``[R, E]`` the
    log-probability of each whole answer (sum over its tokens), in float64 on the CPU."""
    logp = torch.log_softmax(stack.logits(final).float(), -1)
    got = logp.gather(-1, tgt.to(logp.device)[..., None])[..., 0]
    return (got * valid.to(got.device)).double().sum(-1).cpu()


@dataclass(frozen=True)
class ResidEdit:
    """Replace (``mode="replace"``) or add to (``"add"``) the residual stream entering block ``layer``
    (``layer == n_layers``: the final residual) at each row's position ``pos`` ``[R]`` with ``vector``
    ``[d_model]`` or ``[R, d_model]``."""

    layer: int
    pos: torch.Tensor
    vector: torch.Tensor
    mode: str = "replace"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        rows = torch.arange(x.shape[0], device=x.device)
        pos = self.pos.to(x.device)
        vec = self.vector.to(x.device, x.dtype)
        if self.mode == "replace":
            x[rows, pos] = vec.expand(len(rows), -1) if vec.ndim == 1 else vec
        elif self.mode == "add":
            x[rows, pos] = x[rows, pos] + vec
        else:
            raise ValueError(f"unknown edit mode {self.mode!r}")
        return x


@torch.inference_mode()
def forward_final(stack: LlamaStack, ids: torch.Tensor, read: torch.Tensor, edit: ResidEdit | None = None,
                  z_edit: ZEdit | None = None, keep: torch.Tensor | None = None):
    """A full pass over ``ids`` ``[R, T]`` with an optional residual edit and ``z`` edit; returns the
    final residual at positions ``read`` ``[R, ...]`` (any trailing shape) -> ``[R, ..., d_model]``.
    With ``keep`` ``[R, m]`` it also returns the residual stream entering every block (and the final
    one) at those positions, after any edit: ``[n_layers + 1, R, m, d_model]``."""
    ids = ids.to(stack.device)
    R, T = ids.shape
    cos, sin = stack.rotary(torch.arange(T, device=stack.device).expand(R, T))
    x = torch.nn.functional.embedding(ids, stack.W_E)
    kept = []

    def take(x: torch.Tensor) -> None:
        if keep is not None:
            where = keep.to(stack.device)
            kept.append(torch.gather(x, 1, where[..., None].expand(-1, -1, x.shape[-1])))

    for layer in range(stack.n_layers):
        if edit is not None and edit.layer == layer:
            x = edit.apply(x)
        take(x)
        a, _, _, _ = stack.attention(layer, x, cos, sin, z_edit=z_edit)
        x = x + a
        x = x + stack.mlp(layer, x)
    if edit is not None and edit.layer == stack.n_layers:
        x = edit.apply(x)
    take(x)
    flat = read.reshape(R, -1).to(stack.device)
    out = torch.gather(x, 1, flat[..., None].expand(-1, -1, x.shape[-1])).reshape(*read.shape, x.shape[-1])
    return out if keep is None else (out, torch.stack(kept))


@torch.inference_mode()
def answer_logp(stack: LlamaStack, pb: PromptBatch, examples: Sequence[int] = (-1,), batch_size: int = 16,
                edit_layer: int | None = None, vector: torch.Tensor | None = None, mode: str = "replace",
                edit_example: int = -1, z_edit_for=None, residuals: bool = False):
    """Whole-answer log-probability ``[n, E]`` of ``examples`` of every prompt, optionally with the
    residual entering block ``edit_layer`` at the prediction position of ``edit_example`` replaced by
    (or added to) ``vector``; ``z_edit_for(rows, pos)`` may return a ``z`` edit for a batch. With
    ``residuals`` it also returns the residual stream at that prediction position entering every block
    (and the final one), ``[n_layers + 1, n, d_model]`` in float32 on the CPU."""
    examples = [e % pb.k for e in examples]
    out = np.zeros((pb.n, len(examples)))
    kept = []
    for start in range(0, pb.n, batch_size):
        rows = list(range(start, min(pb.n, start + batch_size)))
        ids = padded(pb, rows)
        pos, tgt, valid = answer_index(pb, rows, examples)
        where = pb.pred(edit_example)[rows]
        edit = None if edit_layer is None else ResidEdit(edit_layer, where, vector, mode)
        z_edit = None if z_edit_for is None else z_edit_for(rows, where)
        got = forward_final(stack, ids, pos, edit, z_edit, keep=where[:, None] if residuals else None)
        final = got[0] if residuals else got
        if residuals:
            kept.append(got[1][:, :, 0].float().cpu())
        out[rows] = whole_answer_logp(stack, final, tgt, valid).numpy()
    return (out, torch.cat(kept, 1)) if residuals else out


def recovered_fraction(patched: np.ndarray, high: np.ndarray, low: np.ndarray, n_boot: int = 1000, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of an effect recovered, ``(mean(patched) - mean(low)) / (mean(high) - mean(low))`` (ratio
    of means over prompts: per-prompt ratios explode where high and low nearly agree), with a paired
    95% percentile bootstrap over prompts. ``patched`` ``[n, ...]``; ``high``, ``low`` ``[n]``."""
    patched, high, low = (np.asarray(v, np.float64) for v in (patched, high, low))
    n = patched.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))

    def frac(i: np.ndarray) -> np.ndarray:
        return (patched[i].mean(0) - low[i].mean()) / (high[i].mean() - low[i].mean())

    boots = np.stack([frac(i) for i in idx])
    lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
    return frac(np.arange(n)), lo, hi


@dataclass
class SuffixRun:
    """One unedited pass over a batch of prompts, kept for restarts over the *suffix* of each prompt:
    its query position and the positions that read the query's answer tokens (``S`` of them). An edit
    at the query position at layer ``l`` changes nothing before it, so the edited pass is a restart of
    layers ``>= l`` over the suffix, attending to the kept keys and values of the prefix."""

    rows: list[int]
    q: torch.Tensor  # [R] query position
    resid: torch.Tensor  # [n_layers + 1, R, S, d_model] residual entering each block (last: final) at the suffix
    z: torch.Tensor  # [n_layers, R, S, n_heads, d_head]
    k: torch.Tensor  # [n_layers, R, n_kv, P, d_head] rotated keys of the prefix (positions < max q)
    v: torch.Tensor  # [n_layers, R, n_kv, P, d_head]
    prefix_valid: torch.Tensor  # [R, P] key j < q[r]
    tgt: torch.Tensor  # [R, 1, S] answer tokens
    valid: torch.Tensor  # [R, 1, S]
    base: np.ndarray  # [R] whole-answer log-probability of the unedited pass


@torch.inference_mode()
def suffix_runs(stack: LlamaStack, pb: PromptBatch, batch_size: int = 8) -> list[SuffixRun]:
    """Unedited passes over ``pb`` in batches, each kept as a :class:`SuffixRun` for the last example."""
    out = []
    for start in range(0, pb.n, batch_size):
        rows = list(range(start, min(pb.n, start + batch_size)))
        R = len(rows)
        pos, tgt, valid = answer_index(pb, rows, [pb.k - 1])  # [R, 1, S]
        S = pos.shape[-1]
        q = pb.pred()[rows]
        suffix = q[:, None] + torch.arange(S)[None]  # reading position of answer token s is q + s
        width = int(suffix.max()) + 1
        ids = torch.full((R, width), pb.pad, dtype=torch.long)
        for r, i in enumerate(rows):
            n_ids = min(width, len(pb.ids[i]))
            ids[r, :n_ids] = torch.tensor(pb.ids[i][:n_ids])
        tr = stack.forward(ids, keep=suffix, logit_pos=suffix[:, :1], keep_kv=True)
        P = int(q.max())
        base = whole_answer_logp(stack, tr.resid_pre[stack.n_layers][:, None], tgt, valid)[:, 0].numpy()
        out.append(SuffixRun(rows, q, tr.resid_pre, tr.z, tr.k[:, :, :, :P], tr.v[:, :, :, :P],
                             torch.arange(P)[None] < q[:, None], tgt, valid, base))
    return out


@torch.inference_mode()
def restart(stack: LlamaStack, run: SuffixRun, layer: int, resid: torch.Tensor, index: torch.Tensor,
            z_edit: ZEdit | None = None) -> np.ndarray:
    """Whole-answer log-probability after restarting block ``layer`` over the suffix from ``resid``
    ``[R', S, d_model]``; row ``j`` attends to the prefix of the run's row ``index[j]``. Returns ``[R']``."""
    kc = {l: run.k[l][index] for l in range(layer, stack.n_layers)}
    vc = {l: run.v[l][index] for l in range(layer, stack.n_layers)}
    final = run_from(stack, layer, resid, run.q[index], kc, vc, run.prefix_valid[index], z_edit)
    return whole_answer_logp(stack, final[:, None], run.tgt[index], run.valid[index])[:, 0].numpy()


@torch.inference_mode()
def layer_sweep(stack: LlamaStack, pb: PromptBatch, vectors: torch.Tensor, mode: str = "replace",
                batch_size: int = 8, layers: Sequence[int] | None = None,
                runs: list[SuffixRun] | None = None) -> np.ndarray:
    """Whole-answer log-probability of each prompt's last answer ``[n, len(layers)]`` with ``vectors[l]``
    (``[n_layers, d_model]``, or ``[n_layers, n, d_model]`` for one vector per prompt) written over
    (``replace``) or added to (``add``) the residual entering block ``l`` at the query position, one
    layer at a time, by restarts over the suffix (:class:`SuffixRun`)."""
    layers = list(range(stack.n_layers)) if layers is None else list(layers)
    runs = suffix_runs(stack, pb, batch_size) if runs is None else runs
    out = np.zeros((pb.n, len(layers)))
    for run in runs:
        R = len(run.rows)
        index = torch.arange(R)
        for j, layer in enumerate(layers):
            vec = vectors[layer] if vectors.ndim == 2 else vectors[layer][run.rows]
            vec = vec.to(stack.device, stack.dtype)
            resid = run.resid[layer].clone()
            resid[:, 0] = vec if mode == "replace" else resid[:, 0] + vec
            if mode not in ("replace", "add"):
                raise ValueError(f"unknown edit mode {mode!r}")
            out[run.rows, j] = restart(stack, run, layer, resid, index)
    return out


def leave_one_out(resid: torch.Tensor) -> torch.Tensor:
    """``resid`` ``[layers, n, d]`` -> the mean over the *other* prompts for each prompt, same shape."""
    n = resid.shape[1]
    return (resid.sum(1, keepdim=True) - resid) / (n - 1)


@torch.inference_mode()
def run_from(stack: LlamaStack, start_layer: int, resid: torch.Tensor, start_pos: torch.Tensor, k_cache,
             v_cache, prefix_valid: torch.Tensor | None, z_edit: ZEdit | None = None) -> torch.Tensor:
    """Restart a pass at block ``start_layer`` over ``S`` positions ``start_pos[r] .. + S - 1`` of each row
    from ``resid`` ``[R, S, d_model]``, attending to the unedited run's keys and values before them
    (``k_cache[layer]`` ``[R, n_kv, P, d_head]``, ``prefix_valid`` ``[R, P]``); returns the final residual
    at all ``S`` positions ``[R, S, d_model]`` (:meth:`LlamaStack.run_suffix` returns the last only)."""
    x = resid.to(stack.device)
    R, S, _ = x.shape
    pos = start_pos.to(stack.device)[:, None] + torch.arange(S, device=stack.device)[None]
    cos, sin = stack.rotary(pos)
    for layer in range(start_layer, stack.n_layers):
        a, _, _, _ = stack.attention(layer, x, cos, sin, k_cache[layer], v_cache[layer], prefix_valid, z_edit)
        x = x + a
        x = x + stack.mlp(layer, x)
    return x


@torch.inference_mode()
def head_out(stack: LlamaStack, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write to the residual stream: ``z`` ``[..., n_heads, d_head]`` -> ``[..., n_heads,
    d_model]`` (``z_h W_O^h``)."""
    W_o = stack.layers[layer].W_o.float().view(stack.d_model, stack.n_heads, stack.d_head)
    return torch.einsum("...he,mhe->...hm", z.float(), W_o.to(z.device))


@torch.inference_mode()
def number_mass(stack: LlamaStack, resid: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """Probability on number tokens (``numbers``: ``[vocab]`` bool) after the final norm and the
    unembedding of ``resid`` ``[..., d_model]``: ``[...]``."""
    p = torch.softmax(stack.logits(resid).float(), -1)
    return p[..., numbers.to(p.device)].sum(-1)


def map_heads(named: Sequence[str], from_layers: int, from_heads: int, n_layers: int, n_heads: int
              ) -> list[tuple[int, int]]:
    """Heads named ``LxHy`` in a model of ``from_layers`` x ``from_heads`` mapped to the same relative
    depth and head slot of a model of ``n_layers`` x ``n_heads`` (duplicates dropped, order kept).
    Head indices carry no meaning across models: only the relative depth is informative."""
    out: list[tuple[int, int]] = []
    for name in named:
        layer, head = (int(v) for v in name[1:].split("H"))
        mapped = (min(n_layers - 1, round(layer * n_layers / from_layers)), head * n_heads // from_heads)
        if mapped not in out:
            out.append(mapped)
    return out


@torch.inference_mode()
def attention_from(stack: LlamaStack, layer: int, resid: torch.Tensor, pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention pattern of every query head of ``layer`` from chosen positions: ``resid`` ``[R, m,
    d_model]`` is the residual stream entering the block at positions ``pos`` ``[R, m]``, ``k`` ``[R, n_kv,
    T, d_head]`` the layer's rotated keys at all positions (:class:`icl.runner.Trace`). Returns ``[R,
    n_heads, m, T]`` (rows sum to one over keys ``<=`` each position)."""
    w = stack.layers[layer]
    R, m, _ = resid.shape
    h = stack.rms(resid.to(stack.device), w.ln1)
    q = torch.nn.functional.linear(h, w.W_q).view(R, m, stack.n_heads, stack.d_head).transpose(1, 2)
    cos, sin = stack.rotary(pos.to(stack.device))
    q = stack._rope(q, cos, sin)
    k_rep = k.repeat_interleave(stack.n_rep, dim=1)  # query head h reads kv head h // n_rep
    scores = torch.matmul(q, k_rep.transpose(2, 3)) * stack.scaling  # [R, H, m, T]
    T = k.shape[2]
    allowed = torch.arange(T, device=stack.device)[None, None, None] <= pos.to(stack.device)[:, None, :, None]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1)
