"""Activation patching from a run with in-context examples into a run without them, fast and GQA-correct.

Run A is a prompt of ``k`` examples whose last line is the query ``(x, `` ; run B is the query line
alone. A knows the rule, B does not. Copy one activation of A into B and ask how much of A's behaviour
B recovers: if copying the residual stream at layer ``L`` and query position ``p`` makes B answer like
A, then by layer ``L`` the information that the examples supplied sits at position ``p``. The two runs
have different lengths, so they are *aligned from the end*: query position ``j`` (0 = the query line's
first token) is position ``len(A) - q + j`` in A and ``len(B) - q + j`` in B, ``q`` being the number of
tokens of the query line; the alignment is checked token by token.

The metric is the log-probability of the correct answer's first token at B's last position,
normalised so that 0 is B's own value and 1 is A's (fraction of the effect recovered)::

    recovered = (m_patched - m_B) / (m_A - m_B)

averaged over prompt pairs before dividing (per-pair ratios explode where A and B nearly agree).

Three kinds of activation are patched, one cell at a time (layer × query position):
``resid_pre`` (the residual stream entering block ``L``), ``attn_out`` and ``mlp_out`` (the outputs of
block ``L``'s attention and MLP). :func:`fast_patch` computes the whole grid with the restartable runner
of :mod:`icl.runner`: one unpatched pass over B records what the restarts need, every cell then only
recomputes layers ``>= L`` at positions ``>= p``, and all cells and prompt pairs that restart at the same
position run as one batch that grows layer by layer (:meth:`~icl.runner.LlamaStack.run_restarts`), so
the matrix products stay large. :func:`reference_patch` computes the same grid with TransformerLens's
own ``generic_activation_patch`` (one hooked bridge forward per cell); ``benchmarks/patching_speed.py``
times the two and checks they agree.

Cost, for a grid of layers × ``q`` query positions on B runs of ``T`` tokens: one forward per cell costs
``n_layers * T`` block-token units plus ``T`` unembeddings; a restart costs ``(n_layers - L) * (T - p)``
units plus one unembedding: on average ``4 / ((1 + 1/n_layers) (1 + 1/q))`` times fewer block-token units
when ``T = q`` (SmolLM2, 30 layers and 5 positions: 3.2×; 3.5× counting the unembeddings). Beyond that
bound only the overhead of many small forward passes can be saved.

A's activations are taken through bridge hooks (:func:`a_activations`) at the aligned positions only,
never as a full activation cache, with optional extra hooks on A (head ablations through
``hook_z``), so the same code fits llama-3-8b on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from icl.runner import LlamaStack, PatchingError, Restart
from icl.scoring import encode, last_digit_index
from icl.tasks import Prompt

KINDS = ("resid_pre", "attn_out", "mlp_out")
HOOK = {"resid_pre": "blocks.{}.hook_resid_pre", "attn_out": "blocks.{}.hook_attn_out",
        "mlp_out": "blocks.{}.hook_mlp_out"}


@dataclass(frozen=True)
class PatchPairs:
    """Prompt pairs aligned from the end of the query line."""

    a_ids: tuple[tuple[int, ...], ...]  # each A: the prompt up to (not including) the last answer
    b_ids: torch.Tensor  # [n, T_B] the query line alone (with the tokenizer's own BOS, if any)
    q_len: int  # tokens of the query line (the patchable positions)
    target: torch.Tensor  # [n] the correct answer's first token
    xs: tuple[int, ...]  # the query's x
    ys: tuple[int, ...]  # the correct answer
    answer_ids: tuple[tuple[int, ...], ...] = ()  # every token of each answer "y)" (target first)
    last_digit: tuple[int, ...] = ()  # index in answer_ids of the token holding y's last digit

    @property
    def n(self) -> int:
        return len(self.a_ids)


def subset(pairs: PatchPairs, rows: Sequence[int]) -> PatchPairs:
    """The pairs ``rows`` of ``pairs`` (in that order)."""
    rows = list(rows)
    pick = lambda seq: tuple(seq[i] for i in rows) if seq else seq  # noqa: E731
    return PatchPairs(a_ids=pick(pairs.a_ids), b_ids=pairs.b_ids[rows], q_len=pairs.q_len,
                      target=pairs.target[rows], xs=pick(pairs.xs), ys=pick(pairs.ys),
                      answer_ids=pick(pairs.answer_ids), last_digit=pick(pairs.last_digit))


def make_pairs(tokenizer, prompts: Sequence[Prompt]) -> PatchPairs:
    """A/B pairs from prompts whose last example is the query. All B runs must have one length (for
    SmolLM2: two-digit x); prompts whose query lines tokenize differently raise :class:`PatchingError`."""
    if not prompts:
        raise PatchingError("no prompts")
    a_all, b_all, tgt, q_lens, answers, last_digit = [], [], [], [], [], []
    for p in prompts:
        enc = encode(tokenizer, p)
        first = enc.answer_tokens[-1][0]
        answers.append(tuple(enc.ids[t] for t in enc.answer_tokens[-1]))
        last_digit.append(last_digit_index(tokenizer, p, enc))
        a = enc.ids[:first]
        line_start = p.line_spans[-1][0]
        query = p.text[line_start:p.answer_spans[-1][0]]  # "(x, "
        b = list(tokenizer(query, add_special_tokens=True)["input_ids"])
        bare = list(tokenizer(query, add_special_tokens=False)["input_ids"])
        q = len(bare)
        if q == 0 or a[-q:] != bare or b[-q:] != bare:
            raise PatchingError(f"query line {query!r} does not tokenize the same inside the prompt and alone, "
                                "so A and B cannot be aligned from the end")
        a_all.append(tuple(a))
        b_all.append(b)
        tgt.append(enc.ids[first])
        q_lens.append(q)
    if len({len(b) for b in b_all}) != 1 or len(set(q_lens)) != 1:
        lens = sorted({len(b) for b in b_all})
        raise PatchingError(f"query lines have different token lengths {lens}: patch prompts with the same "
                            "query alignment together (e.g. only two-digit x)")
    return PatchPairs(tuple(a_all), torch.tensor(b_all, dtype=torch.long), q_lens[0],
                      torch.tensor(tgt, dtype=torch.long), tuple(p.xs[-1] for p in prompts),
                      tuple(p.ys[-1] for p in prompts), tuple(answers), tuple(last_digit))


def answer_matrix(pairs: PatchPairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answers as ``[n, M]`` token ids (right-padded by repeating the last token), a ``[n, M]``
    mask of real tokens (``M`` the longest answer) and the index of the last digit's token ``[n]``."""
    if not pairs.answer_ids:
        raise PatchingError("these pairs carry no answer tokens (build them with make_pairs)")
    M = max(len(a) for a in pairs.answer_ids)
    ids = torch.tensor([list(a) + [a[-1]] * (M - len(a)) for a in pairs.answer_ids], dtype=torch.long)
    mask = torch.arange(M)[None] < torch.tensor([len(a) for a in pairs.answer_ids])[:, None]
    return ids, mask, torch.tensor(pairs.last_digit, dtype=torch.long)


@dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced scores of the whole answer, per pair (or per pair and cell)."""

    first: np.ndarray  # log P(first answer token): the metric of the first-token readouts
    answer: np.ndarray  # log P(all answer tokens, the closing parenthesis included), teacher-forced
    last: np.ndarray  # log P(the token holding the units digit | the tokens before it)
    exact: np.ndarray  # bool: every answer token is the argmax given the ones before


def score_answers(logp: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor, last_digit: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logp`` ``[R, M, vocab]`` at the answer positions; ``answers``/``mask`` ``[R, M]``; ``last_digit``
    ``[R]``."""
    tok = torch.gather(logp, 2, answers[..., None])[..., 0]  # [R, M]
    hit = (logp.argmax(-1) == answers) | ~mask
    whole = (tok * mask).sum(1)
    last = torch.gather(tok, 1, last_digit[:, None])[:, 0]
    return tok[:, 0], whole, last, hit.all(1)


def teacher_forced_batches(pairs: PatchPairs, answers: torch.Tensor, batch_size: int
                           ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The A prompts in batches, each run on through its answer (all tokens but the last, from
    ``answers`` of :func:`answer_matrix`): ``(rows, ids [R, T] right-padded, lens [R] of the A prompts,
    where [R, M] the positions that predict the answer tokens)``."""
    M = answers.shape[1]
    for start in range(0, pairs.n, batch_size):
        rows = list(range(start, min(pairs.n, start + batch_size)))
        seqs = [list(pairs.a_ids[i]) + answers[i, : M - 1].tolist() for i in rows]
        lens = torch.tensor([len(pairs.a_ids[i]) for i in rows])
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x, dtype=torch.long) for x in seqs], batch_first=True)
        yield rows, ids, lens, lens[:, None] - 1 + torch.arange(M)[None]


@torch.inference_mode()
def answer_scores(stack: LlamaStack, pairs: PatchPairs, z_edit: Any = None, batch_size: int = 8) -> AnswerScores:
    """A's whole answer, teacher-forced: each A prompt is run on with its answer's tokens (all but the
    last) and every answer token is read out. ``z_edit`` runs A with heads edited (ablated)."""
    answers, mask, last_digit = answer_matrix(pairs)
    cols: list[list[np.ndarray]] = [[], [], [], []]
    for rows, ids, _, where in teacher_forced_batches(pairs, answers, batch_size):
        tr = stack.forward(ids, keep=where, keep_kv=False, z_edit=z_edit)
        logp = torch.log_softmax(tr.logits.float(), -1)
        got = score_answers(logp, *(t[rows].to(logp.device) for t in (answers, mask, last_digit)))
        for c, v in zip(cols, got):
            c.append(v.cpu().numpy())
    return AnswerScores(*(np.concatenate(c) for c in cols))


def _check_grid(n_layers: int, q_len: int, layers: Sequence[int] | None,
                positions: Sequence[int] | None) -> tuple[list[int], list[int]]:
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    positions = list(range(q_len)) if positions is None else [int(x) for x in positions]
    bad_l = [x for x in layers if not 0 <= x < n_layers]
    if bad_l:
        raise PatchingError(f"layers {bad_l} are out of range: the model has layers 0..{n_layers - 1}")
    bad_p = [x for x in positions if not 0 <= x < q_len]
    if bad_p:
        raise PatchingError(f"query positions {bad_p} are out of range: the query line has positions 0..{q_len - 1}")
    return layers, positions


@torch.inference_mode()
def a_activations(bridge: Any, tokenizer, pairs: PatchPairs, kinds: Sequence[str] = KINDS,
                  fwd_hooks: Sequence[tuple[Any, Any]] = (), batch_size: int = 8,
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A's activations at the aligned query positions, through bridge hooks (no full cache).

    Returns ``{kind: [n_layers, n, q_len, d_model]}`` and A's log-probability of the target ``[n]``.
    ``fwd_hooks`` are extra (name, fn) hooks applied to A, e.g. head ablations on ``hook_z``.
    """
    for kind in kinds:
        if kind not in HOOK:
            raise PatchingError(f"unknown activation kind {kind!r}: use {', '.join(HOOK)}")
    n_layers = int(bridge.cfg.n_layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    q = pairs.q_len
    out = {k: [[None] * pairs.n for _ in range(n_layers)] for k in kinds}
    logp_a = torch.zeros(pairs.n)
    device = bridge.cfg.device
    for start in range(0, pairs.n, batch_size):
        rows = list(range(start, min(pairs.n, start + batch_size)))
        lens = torch.tensor([len(pairs.a_ids[i]) for i in rows])
        ids = torch.full((len(rows), int(lens.max())), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : lens[r]] = torch.tensor(pairs.a_ids[i])
        where = (lens[:, None] - q + torch.arange(q)[None]).to(device)  # [R, q]

        def grab(act, hook, kind, layer):
            idx = where[..., None].expand(-1, -1, act.shape[-1])
            got = torch.gather(act, 1, idx).detach()
            for r, i in enumerate(rows):
                out[kind][layer][i] = got[r]
            return None

        hooks = [(HOOK[k].format(layer), (lambda a, hook, k=k, layer=layer: grab(a, hook, k, layer)))
                 for k in kinds for layer in range(n_layers)]
        logits = bridge.run_with_hooks(ids.to(device), fwd_hooks=list(fwd_hooks) + hooks)
        last = logits[torch.arange(len(rows)), (lens - 1).to(device)].float()
        logp = torch.log_softmax(last, -1)
        logp_a[rows] = logp[torch.arange(len(rows)), pairs.target[rows].to(device)].cpu()
    acts = {k: torch.stack([torch.stack(out[k][layer]) for layer in range(n_layers)]) for k in kinds}
    return acts, logp_a


@dataclass(frozen=True)
class PatchGrid:
    logp: dict[str, np.ndarray]  # kind -> [n, n_layers_patched, n_positions] log P(target) after patching
    argmax: dict[str, np.ndarray]  # kind -> [n, n_layers_patched, n_positions] argmax token after patching
    logp_b: np.ndarray  # [n] B unpatched
    argmax_b: np.ndarray  # [n]
    layers: list[int]
    positions: list[int]
    answer: dict[str, AnswerScores] | None = None  # kind -> whole-answer scores [n, layers, positions]
    answer_b: AnswerScores | None = None  # B unpatched, [n]


@torch.inference_mode()
def fast_patch(stack: LlamaStack, pairs: PatchPairs, a_acts: dict[str, torch.Tensor],
               kinds: Sequence[str] = KINDS, layers: Sequence[int] | None = None,
               positions: Sequence[int] | None = None, max_rows: int = 2048, whole_answer: bool = False,
               z_edit: Any = None) -> PatchGrid:
    """The layers × query-positions patching grid, one restart per (start layer, position) group.

    With ``whole_answer``, B runs on through the correct answer's tokens (teacher-forced; the answer
    comes after every patched position, so the patch is unchanged) and the grid also holds the
    log-probability of the whole answer, of its last token and whether greedy decoding gets all of it
    (``PatchGrid.answer``). ``z_edit`` runs B, and every restart, with those heads edited (the heads
    ablated in A ablated in B as well)."""
    layers, positions = _check_grid(stack.n_layers, pairs.q_len, layers, positions)
    for kind in kinds:
        if kind not in a_acts:
            raise PatchingError(f"no A activations of kind {kind!r}")
        if a_acts[kind].shape[:3] != (stack.n_layers, pairs.n, pairs.q_len):
            raise PatchingError(f"A activations {kind} have shape {tuple(a_acts[kind].shape)}, expected "
                                f"[{stack.n_layers}, {pairs.n}, {pairs.q_len}, d_model]")
    B = pairs.b_ids.to(stack.device)
    n, T = B.shape
    off = T - pairs.q_len  # B position of query position 0
    M = 1
    if whole_answer:
        answers, mask, last_digit = (t.to(stack.device) for t in answer_matrix(pairs))
        M = answers.shape[1]
        B = torch.cat([B, answers[:, : M - 1]], 1)  # teacher-forced answer after the query line
    tr = stack.forward(B, z_edit=z_edit)  # all positions kept: B is short
    target = pairs.target.to(stack.device)
    zeros = {"logp": np.float32, "arg": np.int64, "answer": np.float32, "last": np.float32, "exact": bool}
    res = {name: {k: np.zeros((n, len(layers), len(positions)), dtype=dt) for k in kinds}
           for name, dt in zeros.items()}

    def readout(final: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """final [R, d_model] (or [R, M, d_model] with the whole answer) -> per row: log P(target),
        argmax at the answer's first position, and with the whole answer its log P, last token, exact."""
        logp = torch.log_softmax(stack.logits(final).float(), -1)
        if not whole_answer:
            return logp[torch.arange(len(rows)), target[rows]], logp.argmax(-1)
        first, whole, last, exact = score_answers(logp, answers[rows], mask[rows], last_digit[rows])
        return first, logp[:, 0].argmax(-1), whole, last, exact

    out_b = readout(tr.resid_pre[-1][:, -M:] if whole_answer else tr.resid_pre[-1][:, -1],
                    torch.arange(n, device=stack.device))
    lb, ab = out_b[0], out_b[1]
    # Every cell becomes a restart (start layer, stage, position) with an edited residual; the runner
    # stacks all restarts at one position into a batch that grows layer by layer (run_restarts).
    jobs: list[Restart] = []
    cells: list[tuple[str, int, int]] = []
    acts = {kind: a_acts[kind].to(stack.device, stack.dtype) for kind in kinds}
    index = torch.arange(n, device=stack.device)
    for kind in kinds:
        act = acts[kind]
        for li, layer in enumerate(layers):
            for pi, qpos in enumerate(positions):
                p = off + qpos
                if kind == "resid_pre":
                    start, stage = layer, "attn"
                    resid = tr.resid_pre[layer][:, p:].clone()  # [n, T - p, d_model]
                    resid[:, 0] = act[layer, :, qpos]
                elif kind == "attn_out":
                    start, stage = layer, "mlp"
                    resid = tr.resid_mid[layer][:, p:].clone()
                    resid[:, 0] += act[layer, :, qpos] - tr.attn_out[layer][:, p]
                else:
                    start, stage = layer + 1, "attn"
                    resid = tr.resid_pre[layer + 1][:, p:].clone()
                    resid[:, 0] += act[layer, :, qpos] - tr.mlp_out[layer][:, p]
                jobs.append(Restart(start, stage, p, resid, index))
                cells.append((kind, li, pi))
    finals = stack.run_restarts(jobs, tr.k, tr.v, max_rows=max_rows, last=M, z_edit=z_edit)
    per_chunk = max(1, max_rows // (n * M))  # read out in chunks of about max_rows answer positions
    for c0 in range(0, len(jobs), per_chunk):
        block = list(range(c0, min(len(jobs), c0 + per_chunk)))
        got = readout(torch.cat([finals[c] for c in block]), index.repeat(len(block)))
        for j, c in enumerate(block):
            kind, li, pi = cells[c]
            for name, v in zip(zeros, got):
                res[name][kind][:, li, pi] = v[j * n:(j + 1) * n].cpu().numpy()
    answer = answer_b = None
    if whole_answer:
        answer = {k: AnswerScores(res["logp"][k], res["answer"][k], res["last"][k], res["exact"][k]) for k in kinds}
        answer_b = AnswerScores(*(v.cpu().numpy() for v in (out_b[0], out_b[2], out_b[3], out_b[4])))
    return PatchGrid(res["logp"], res["arg"], lb.cpu().numpy(), ab.cpu().numpy(), layers, positions,
                     answer, answer_b)


def reference_patch(bridge: Any, pairs: PatchPairs, a_acts: dict[str, torch.Tensor], kind: str,
                    layers: Sequence[int] | None = None, positions: Sequence[int] | None = None) -> np.ndarray:
    """The same grid with TransformerLens's ``generic_activation_patch`` (one hooked forward per cell).

    Returns ``[n, n_layers_patched, n_positions]`` log-probabilities of the target."""
    import pandas as pd
    from transformer_lens import patching as tl_patching

    n_layers = int(bridge.cfg.n_layers)
    layers, positions = _check_grid(n_layers, pairs.q_len, layers, positions)
    B = pairs.b_ids.to(bridge.cfg.device)
    n, T = B.shape
    off = T - pairs.q_len
    target = pairs.target.to(bridge.cfg.device)
    act = a_acts[kind]
    clean = {}
    for layer in layers:
        full = torch.zeros(n, T, act.shape[-1], dtype=act.dtype, device=bridge.cfg.device)
        full[:, off:] = act[layer].to(bridge.cfg.device)
        clean[HOOK[kind].format(layer)] = full  # a dict stands in for the ActivationCache
    index_df = pd.DataFrame([(layer, off + p) for layer in layers for p in positions], columns=["layer", "pos"])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, -1].float(), -1)
        return logp[torch.arange(n), target]

    with torch.inference_mode():
        result = tl_patching.generic_activation_patch(
            bridge, B, clean, metric, tl_patching.layer_pos_patch_setter, kind, index_df=index_df,
            reduce="none")
    values = result.values.detach().float().cpu().numpy()  # [cells, n]
    return values.T.reshape(n, len(layers), len(positions))


def recovered(logp: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray) -> np.ndarray:
    """Fraction of the A-B effect recovered, ratio of means over pairs (axis 0): 0 = B, 1 = A."""
    return (logp.mean(0) - logp_b.mean()) / (logp_a.mean() - logp_b.mean())
