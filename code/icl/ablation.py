"""Head ablation and direct effects, per query head, for grouped-query attention models.

A head's contribution to the residual stream is its row of ``z`` (``hook_z``, ``[batch, pos, n_heads,
d_head]``, one vector per *query* head) times its slice of the output projection ``W_O``. Ablating a
head replaces that row: by zero (*zero ablation*) or by its mean over a reference set of prompts (*mean
ablation*, which removes the information the head carries about this prompt but keeps its average
output, so later layers are not pushed off-distribution). With grouped-query attention several query
heads share one key/value head, so a head cannot be ablated through ``hook_v`` or ``hook_k`` without
taking its siblings with it; ``hook_z`` is the right place.

:func:`last_position_ablation` measures every head's ablation at the answer position (the position that
predicts the answer), as the source notes' notebook does: only that position's stream changes, so each
ablation is a one-position restart over A's cached keys and values. The restarts of all layers run
layer-synchronously (:func:`_answer_position_restarts`): a row joins the batch at the layer whose head
it ablates and from then on every block runs once for all rows of a prompt, which attend to that
prompt's cached prefix without copying it per row. The reference implementation, one restart of
:class:`icl.runner.LlamaStack` per layer, is :func:`last_position_ablation_reference`; a test checks
that both agree.

:func:`direct_effects` is each head's *direct* contribution to the correct answer's logit at the
answer position: ``z_h W_O^h`` read through the final RMSNorm (its scale frozen at the run's value) and
the unembedding. When a head is removed and another head's direct effect grows, the second one is a
*backup head* in the sense of @wang2023ioi and @mcgrath2023hydra.

:func:`zero_heads_hook` is the bridge-hook version of zero ablation (``blocks.{L}.attn.hook_z``), used
when an ablated run A must feed the patching code of :mod:`icl.patching`.

:func:`joint_ablation_logprobs` removes whole *sets* of heads at every position (all induction heads at
once, against random sets of as many heads in the same layers): the blocks below a set's first layer
are shared by all sets, so each set costs only the blocks from there on. Its clean run can be recorded
(:func:`run_layers`), which gives one head's attention from a chosen position (:func:`query_pattern`)
and what the head writes, read as logits (:func:`head_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from icl.patching import AnswerScores, PatchPairs, answer_matrix, score_answers, teacher_forced_batches
from icl.runner import LlamaStack, PatchingError


def _pad(ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(x) for x in ids])
    out = torch.full((len(ids), int(lens.max())), pad, dtype=torch.long)
    for r, x in enumerate(ids):
        out[r, : len(x)] = torch.tensor(list(x))
    return out, lens


def check_heads(stack: LlamaStack, heads: Sequence[tuple[int, int]]) -> None:
    for layer, head in heads:
        if not (0 <= layer < stack.n_layers and 0 <= head < stack.n_heads):
            raise PatchingError(f"head L{layer}H{head} does not exist: layers 0..{stack.n_layers - 1}, "
                                f"query heads 0..{stack.n_heads - 1}")


def zero_heads_edit(heads: Sequence[tuple[int, int]]):
    """A ``z_edit`` for :class:`LlamaStack` zeroing the given (layer, head) rows at every position."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor:
        if layer in by_layer:
            z = z.clone()
            z[:, :, by_layer[layer]] = 0
        return z

    return edit


def zero_heads_hook(heads: Sequence[tuple[int, int]]) -> list[tuple[str, Any]]:
    """Bridge forward hooks zeroing the given heads' ``hook_z`` rows at every position."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make(hs: list[int]):
        def hook(z, hook):  # z [batch, pos, n_heads, d_head]
            z = z.clone()
            z[:, :, hs] = 0
            return z
        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(hs)) for layer, hs in sorted(by_layer.items())]


@dataclass(frozen=True)
class ARuns:
    """A's clean pass at its last position: log P(target), per-head z and direct effects."""

    logp: np.ndarray  # [n] log P(correct first token) at the answer position
    z: torch.Tensor  # [n_layers, n, n_heads, d_head] at the answer position
    direct: np.ndarray  # [n, n_layers, n_heads] direct effect of each head on the target logit


@torch.inference_mode()
def direct_effects(stack: LlamaStack, z: torch.Tensor, final_scale: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """``z`` ``[n_layers, n, n_heads, d_head]`` at one position, ``final_scale`` ``[n, 1]`` (1/rms of the
    final residual), ``target`` ``[n]`` -> ``[n, n_layers, n_heads]`` contributions to the target logit."""
    H, dh = stack.n_heads, stack.d_head
    u = stack.W_U[target.to(stack.device)].float() * stack.ln_final.float()  # [n, d_model]
    out = np.zeros((z.shape[1], stack.n_layers, H))
    for layer in range(stack.n_layers):
        W_o = stack.layers[layer].W_o.float().view(stack.d_model, H, dh)  # [d_model, head, d_head]
        per_head = torch.einsum("nhe,mhe->nhm", z[layer].float(), W_o)  # [n, head, d_model]
        out[:, layer] = (torch.einsum("nhm,nm->nh", per_head, u) * final_scale.float()).cpu().numpy()
    return out


@torch.inference_mode()
def a_runs(stack: LlamaStack, tokenizer, pairs: PatchPairs, z_edit=None, batch_size: int = 8,
           keep_kv: bool = False) -> tuple[ARuns, list[dict[str, torch.Tensor]]]:
    """Run every A (optionally edited) and record its answer position; with ``keep_kv`` also return
    per-batch caches for restarts (keys/values of all positions and the residual at the answer position)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    logps, zs, des, caches = [], [], [], []
    for start in range(0, pairs.n, batch_size):
        rows = list(range(start, min(pairs.n, start + batch_size)))
        ids, lens = _pad([pairs.a_ids[i] for i in rows], pad)
        last = (lens - 1)[:, None]
        tr = stack.forward(ids, keep=last, keep_kv=keep_kv, z_edit=z_edit)
        tgt = pairs.target[rows]
        logp = torch.log_softmax(tr.logits[:, 0].float(), -1)[torch.arange(len(rows)), tgt.to(stack.device)]
        logps.append(logp.cpu().numpy())
        z = tr.z[:, :, 0]  # [n_layers, R, H, d_head]
        zs.append(z.cpu())
        des.append(direct_effects(stack, z, tr.final_scale[:, 0], tgt))
        if keep_kv:
            caches.append({"k": tr.k, "v": tr.v, "resid_pre": tr.resid_pre[:, :, 0], "lens": lens, "rows": rows})
    return ARuns(np.concatenate(logps), torch.cat(zs, dim=1), np.concatenate(des)), caches


@torch.inference_mode()
def a_pass(stack: LlamaStack, pairs: PatchPairs, z_edit=None, batch_size: int = 8
           ) -> tuple[torch.Tensor, AnswerScores, ARuns]:
    """Everything the ablation procedure reads from one (edited) run of A, in one teacher-forced pass.

    Each A runs on through its answer (all tokens but the last), so one forward gives: the residual
    stream entering every block at the aligned query positions (what :func:`icl.patching.fast_patch`
    patches into B; as :func:`icl.patching.a_activations` returns for ``resid_pre``), the whole-answer
    scores (as :func:`icl.patching.answer_scores`), and log P(first answer token), ``z`` and the direct
    effects at the answer position (as :func:`a_runs`). The three functions ran A three times.

    Returns ``(resid_pre [n_layers, n, q_len, d_model], AnswerScores, ARuns)``."""
    answers, mask, last_digit = answer_matrix(pairs)
    q = pairs.q_len
    acts, cols, logps, zs, des = [], [[], [], [], []], [], [], []
    for rows, ids, lens, where in teacher_forced_batches(pairs, answers, batch_size):
        query = lens[:, None] - q + torch.arange(q)[None]  # [R, q]; the last one is the answer position
        tr = stack.forward(ids, keep=torch.cat([query, where], 1), logit_pos=where, keep_kv=False, z_edit=z_edit)
        acts.append(tr.resid_pre[: stack.n_layers, :, :q].cpu())
        logp = torch.log_softmax(tr.logits.float(), -1)
        got = score_answers(logp, *(t[rows].to(logp.device) for t in (answers, mask, last_digit)))
        for c, v in zip(cols, got):
            c.append(v.cpu().numpy())
        logps.append(got[0].cpu().numpy())
        z = tr.z[:, :, q - 1]  # [n_layers, R, H, d_head] at the answer position
        zs.append(z.cpu())
        des.append(direct_effects(stack, z, tr.final_scale[:, q - 1], pairs.target[rows]))
    return (torch.cat(acts, dim=1), AnswerScores(*(np.concatenate(c) for c in cols)),
            ARuns(np.concatenate(logps), torch.cat(zs, dim=1), np.concatenate(des)))


@torch.inference_mode()
def last_position_ablation(stack: LlamaStack, tokenizer, pairs: PatchPairs, mean_z: torch.Tensor,
                           batch_size: int = 8, caches: list[dict[str, torch.Tensor]] | None = None
                           ) -> dict[str, np.ndarray]:
    """log P(target) at A's answer position with each head ablated there, zero and mean.

    ``mean_z`` ``[n_layers, n_heads, d_head]``: the mean-ablation values. ``caches``: A's clean runs
    from :func:`a_runs` with ``keep_kv=True`` (computed here if not given). Returns ``{"zero": [n,
    n_layers, n_heads], "mean": ...}``."""
    H, L = stack.n_heads, stack.n_layers
    out = {"zero": np.zeros((pairs.n, L, H)), "mean": np.zeros((pairs.n, L, H))}
    if caches is None:
        _, caches = a_runs(stack, tokenizer, pairs, batch_size=batch_size, keep_kv=True)
    target = pairs.target.to(stack.device)
    for cache in caches:
        rows = cache["rows"]
        lp = _answer_position_restarts(stack, cache, mean_z, target[rows])  # [R, L, 2, H]
        out["zero"][rows] = lp[:, :, 0]
        out["mean"][rows] = lp[:, :, 1]
    return out


READOUT_ROWS = 256  # rows of vocabulary-sized logits held at once by the ablation readout


def _answer_position_restarts(stack: LlamaStack, cache: dict[str, torch.Tensor], mean_z: torch.Tensor,
                              target: torch.Tensor) -> np.ndarray:
    """Every (layer, mode, head) ablation of one batch of prompts at their answer positions, as one
    layer-synchronous pass; returns log P(target) ``[R, n_layers, 2 (zero, mean), n_heads]``.

    Rows are kept per prompt, ``x [R, M, d_model]``: at layer ``l`` the ``2 H`` rows that ablate a head
    of layer ``l`` join (row ``m``: layer ``m // 2H``, mode ``m % 2H // H``, head ``m % H``), each a copy
    of the prompt's clean residual entering layer ``l``. A row's query attends to the prompt's cached
    keys before the answer position, shared by all its rows, and to its own key at the answer position."""
    H, L, dh, n_kv, rep = stack.n_heads, stack.n_layers, stack.d_head, stack.n_kv, stack.n_rep
    lens = cache["lens"]
    R = len(cache["rows"])
    P = int(lens.max()) - 1
    dev, dt = stack.device, stack.dtype
    valid = (torch.arange(P)[None] < (lens - 1)[:, None]).to(dev)  # [R, P] keys before the answer
    cos, sin = stack.rotary((lens - 1)[:, None])  # [R, 1, d_head] at each prompt's answer position
    cos, sin = cos[:, None], sin[:, None]  # [R, 1, 1, d_head], broadcast over heads and rows
    half = dh // 2

    def rope(t: torch.Tensor) -> torch.Tensor:  # t [R, heads, M, d_head]
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

    x = torch.zeros(R, 0, stack.d_model, device=dev, dtype=dt)
    mode_head = torch.arange(2 * H, device=dev)
    for layer in range(L):
        x = torch.cat([x, cache["resid_pre"][layer].to(dev, dt)[:, None].expand(R, 2 * H, -1)], dim=1)
        M = x.shape[1]
        w = stack.layers[layer]
        h = stack.rms(x, w.ln1)
        q = torch.nn.functional.linear(h, w.W_q).view(R, M, H, dh).transpose(1, 2)  # [R, H, M, dh]
        k = torch.nn.functional.linear(h, w.W_k).view(R, M, n_kv, dh).transpose(1, 2)  # [R, kv, M, dh]
        v = torch.nn.functional.linear(h, w.W_v).view(R, M, n_kv, dh).transpose(1, 2)
        q, k = rope(q), rope(k)
        q = q.view(R, n_kv, rep, M, dh)  # query head h reads kv head h // rep
        kp = cache["k"][layer][:, :, :P].to(dev)  # [R, kv, P, dh]
        vp = cache["v"][layer][:, :, :P].to(dev)
        s_prefix = torch.matmul(q, kp[:, :, None].transpose(-1, -2)) * stack.scaling  # [R, kv, rep, M, P]
        s_prefix = s_prefix.masked_fill(~valid[:, None, None, None], torch.finfo(s_prefix.dtype).min)
        s_self = (q * k[:, :, None]).sum(-1, keepdim=True) * stack.scaling  # [R, kv, rep, M, 1]
        pattern = torch.softmax(torch.cat([s_prefix, s_self], -1), dim=-1, dtype=torch.float32).to(dt)
        z = torch.matmul(pattern[..., :P], vp[:, :, None]) + pattern[..., P:] * v[:, :, None]  # [R, kv, rep, M, dh]
        z = z.reshape(R, H, M, dh).transpose(1, 2).clone()  # [R, M, H, d_head]
        repl = torch.zeros(2 * H, dh, device=dev, dtype=dt)  # mode 0 (rows 0..H-1): zero
        repl[H:] = mean_z[layer].to(dev, dt)  # mode 1: the head's mean over prompts
        z[:, M - 2 * H:][:, mode_head, mode_head % H] = repl  # the rows that joined at this layer
        x = x + torch.nn.functional.linear(z.reshape(R, M, H * dh), w.W_o)
        x = x + stack.mlp(layer, x)
    # The readout, a few hundred rows at a time: all rows at once would hold R * L * 2H rows of
    # vocabulary-sized logits (at Meta-Llama-3-8B's shape, 8 prompts: about 12 GB in float32).
    rows = x.reshape(R * x.shape[1], -1)
    tgt = target.to(dev).repeat_interleave(x.shape[1])
    lp = torch.cat([torch.log_softmax(stack.logits(rows[i:i + READOUT_ROWS]).float(), -1)
                    .gather(-1, tgt[i:i + READOUT_ROWS, None])[:, 0] for i in range(0, len(rows), READOUT_ROWS)])
    return lp.view(R, L, 2, H).cpu().numpy()


@torch.inference_mode()
def last_position_ablation_reference(stack: LlamaStack, tokenizer, pairs: PatchPairs, mean_z: torch.Tensor,
                           batch_size: int = 4) -> dict[str, np.ndarray]:
    """:func:`last_position_ablation` computed one layer at a time with :meth:`LlamaStack.run_suffix`
    (slower; the reference for the tests). log P(target) at A's answer position with each head ablated
    there, zero and mean.

    ``mean_z`` ``[n_layers, n_heads, d_head]``: the mean-ablation values. Returns ``{"zero": [n,
    n_layers, n_heads], "mean": ...}``."""
    H, L = stack.n_heads, stack.n_layers
    out = {"zero": np.zeros((pairs.n, L, H)), "mean": np.zeros((pairs.n, L, H))}
    _, caches = a_runs(stack, tokenizer, pairs, batch_size=batch_size, keep_kv=True)
    target = pairs.target.to(stack.device)
    for cache in caches:
        rows, lens = cache["rows"], cache["lens"]
        R = len(rows)
        P = int(lens.max()) - 1
        valid = torch.arange(P)[None] < (lens - 1)[:, None]  # [R, P] keys before the answer position
        k, v = cache["k"][:, :, :, :P], cache["v"][:, :, :, :P]
        for layer in range(L):
            # rows: (mode, head, prompt) -> 2 * H * R
            n_rows = 2 * H * R
            prompt = torch.arange(R).repeat(2 * H)
            head = torch.arange(H).repeat_interleave(R).repeat(2)
            mode_mean = torch.arange(2).repeat_interleave(H * R) == 1
            repl = torch.zeros(n_rows, stack.d_head, dtype=stack.dtype, device=stack.device)
            repl[mode_mean.to(stack.device)] = mean_z[layer][head[mode_mean]].to(stack.device, stack.dtype)
            rows_dev = torch.arange(n_rows, device=stack.device)
            head_dev = head.to(stack.device)

            def edit(at: int, z: torch.Tensor, layer=layer, repl=repl, rows_dev=rows_dev, head_dev=head_dev):
                if at != layer:
                    return z
                z = z.clone()
                z[rows_dev, -1, head_dev] = repl
                return z

            resid = cache["resid_pre"][layer][prompt][:, None]  # [n_rows, 1, d_model]
            kd = {l: k[l][prompt] for l in range(layer, L)}  # only the layers the restart reads
            vd = {l: v[l][prompt] for l in range(layer, L)}
            final = stack.run_suffix(layer, resid, (lens - 1)[prompt], kd, vd,
                                     prefix_valid=valid[prompt], z_edit=edit)
            logp = torch.log_softmax(stack.logits(final).float(), -1)
            lp = logp[torch.arange(n_rows), target[[rows[i] for i in prompt.tolist()]]].cpu().numpy()
            lp = lp.reshape(2, H, R)
            out["zero"][rows, layer] = lp[0].T
            out["mean"][rows, layer] = lp[1].T
    return out


# ------------------------------------------------------------------------ joint ablation of head sets
# Ablating a *set* of heads at every position (not at one position, as above) changes every position
# from the set's first layer on, so nothing after that layer can be reused; everything before it can.
# :func:`joint_ablation_logprobs` therefore runs the layers below the earliest ablated layer once per
# batch and only the rest once per head set: for SmolLM2's induction heads (layers 17-24 of 30) that is
# 13 of 30 layers per set. :func:`run_layers` is the plain loop over blocks it uses, with a recorder
# that sees each block's input residual, rotated keys and per-head outputs (for attention patterns and
# direct logit attribution of a clean run, :func:`query_pattern`).

Recorder = Any  # (layer, resid_in [R, T, d_model], k [R, n_kv, T, d_head], z [R, T, n_heads, d_head]) -> None


@torch.inference_mode()
def run_layers(stack: LlamaStack, x: torch.Tensor, start: int, stop: int, cos: torch.Tensor, sin: torch.Tensor,
               z_edit=None, record: Recorder | None = None) -> torch.Tensor:
    """Blocks ``start .. stop - 1`` of a full causal pass over ``x`` ``[R, T, d_model]`` (the residual
    entering block ``start`` at positions ``0..T-1``; ``cos``/``sin`` ``[R, T, d_head]`` from
    :meth:`LlamaStack.rotary`). ``z_edit`` edits per-head outputs as in :meth:`LlamaStack.forward`;
    ``record`` is called per block with its input, rotated keys and (edited) ``z``."""
    for layer in range(start, stop):
        a, k, _, z = stack.attention(layer, x, cos, sin, z_edit=z_edit)
        if record is not None:
            record(layer, x, k, z)
        x = x + a
        x = x + stack.mlp(layer, x)
    return x


@torch.inference_mode()
def target_logprobs(stack: LlamaStack, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """log P(``target[i]``) read from the final residual ``x`` ``[R, T, d_model]`` at ``(rows[i], pos[i])``,
    ``[n]`` float32, in chunks of :data:`READOUT_ROWS` vocabulary-sized rows."""
    out = []
    for i in range(0, len(rows), READOUT_ROWS):
        r, p, t = rows[i:i + READOUT_ROWS], pos[i:i + READOUT_ROWS], target[i:i + READOUT_ROWS]
        logp = torch.log_softmax(stack.logits(x[r, p]).float(), -1)  # [chunk, vocab]
        out.append(logp.gather(-1, t.to(logp.device)[:, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


@torch.inference_mode()
def joint_ablation_logprobs(stack: LlamaStack, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                            head_sets: Sequence[Sequence[tuple[int, int]]], record: Recorder | None = None
                            ) -> np.ndarray:
    """log P(next token) at chosen positions with each set of heads zero-ablated at every position.

    ``ids`` ``[R, T]`` (right padding is harmless: attention is causal); ``rows``, ``pos`` ``[n]``: the
    positions read, each predicting token ``ids[rows[i], pos[i] + 1]``. ``head_sets``: lists of
    ``(layer, head)``; an empty set is the clean run. Returns ``[n_sets, n]``. The blocks below the
    earliest ablated layer of all sets run once and are shared. ``record`` (see :func:`run_layers`)
    observes the run of every empty set, from block 0, and is finally called with ``layer = n_layers``
    and the final residual (keys and ``z`` None)."""
    for heads in head_sets:
        check_heads(stack, heads)
    ids = ids.to(stack.device)
    R, T = ids.shape
    rows, pos = rows.to(stack.device), pos.to(stack.device)
    if len(pos) and int(pos.max()) >= T - 1:
        raise PatchingError(f"position {int(pos.max())} has no next token in a sequence of {T}")
    target = ids[rows, pos + 1]
    cos, sin = stack.rotary(torch.arange(T, device=stack.device).expand(R, T))
    L = stack.n_layers
    first = min((layer for heads in head_sets for layer, _ in heads), default=L)
    clean_record = record if any(len(h) == 0 for h in head_sets) else None  # the shared blocks are clean
    x0 = run_layers(stack, torch.nn.functional.embedding(ids, stack.W_E), 0, first, cos, sin,
                    record=clean_record)  # [R, T, d_model] entering block `first`
    out = np.zeros((len(head_sets), len(rows)))
    for s, heads in enumerate(head_sets):
        edit = zero_heads_edit(heads) if heads else None
        x = run_layers(stack, x0, first, L, cos, sin, z_edit=edit, record=None if heads else record)
        if record is not None and not heads:
            record(L, x, None, None)  # the final residual (before the final norm)
        out[s] = target_logprobs(stack, x, rows, pos, target).cpu().numpy()
    return out


@torch.inference_mode()
def query_pattern(stack: LlamaStack, layer: int, head: int, resid: torch.Tensor, k: torch.Tensor,
                  qpos: torch.Tensor) -> torch.Tensor:
    """One head's attention from position ``qpos[r]`` of each row, ``[R, T]`` (zero after the query).

    ``resid`` ``[R, T, d_model]``: the residual entering block ``layer``; ``k`` ``[R, n_kv, T, d_head]``:
    that block's rotated keys (both as :func:`run_layers` records them)."""
    w = stack.layers[layer]
    R, T, _ = resid.shape
    r = torch.arange(R, device=resid.device)
    qpos = qpos.to(resid.device)
    h = stack.rms(resid[r, qpos], w.ln1)  # [R, d_model]
    q = torch.nn.functional.linear(h, w.W_q).view(R, stack.n_heads, stack.d_head)[:, head]  # [R, d_head]
    cos, sin = stack.rotary(qpos[:, None])  # [R, 1, d_head]
    half = stack.d_head // 2
    q = q * cos[:, 0] + torch.cat((-q[:, half:], q[:, :half]), dim=-1) * sin[:, 0]
    keys = k[:, head // stack.n_rep]  # [R, T, d_head]
    scores = torch.einsum("rtd,rd->rt", keys, q) * stack.scaling
    scores = scores.masked_fill(torch.arange(T, device=resid.device)[None] > qpos[:, None],
                                torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


@torch.inference_mode()
def head_logits(stack: LlamaStack, layer: int, head: int, z: torch.Tensor, final_scale: torch.Tensor) -> torch.Tensor:
    """What one head writes, read as logits: ``z`` ``[n, d_head]`` (its output before ``W_O``) times its
    slice of ``W_O``, through the final RMSNorm with its scale frozen at ``final_scale`` ``[n, 1]`` and the
    unembedding: ``[n, vocab]`` (the head's direct contribution to every logit; the bias, if any, left out)."""
    H, dh = stack.n_heads, stack.d_head
    W_o = stack.layers[layer].W_o.float().view(stack.d_model, H, dh)[:, head]  # [d_model, d_head]
    out = z.float() @ W_o.T  # [n, d_model]
    return (out * final_scale.float() * stack.ln_final.float()) @ stack.W_U.float().T
