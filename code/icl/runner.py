"""A transparent, restartable forward pass for Llama-family bridges (SmolLM2, Llama-3).

Activation patching and head ablation ask the same question many times over: *if this one activation
were different, what would the model output?* A hook-based answer (TransformerLens's
``generic_activation_patch``) runs the whole model once per question. Most of that work is wasted,
because in a causal transformer an edit to the residual stream at layer ``L`` and position ``p``

* leaves every layer before ``L`` untouched, and
* leaves every position before ``p`` untouched (attention only looks backwards),

so only the block ``layers >= L`` × ``positions >= p`` needs recomputing, and the keys and values that
the recomputed positions attend to at positions ``< p`` are those of the unedited run. This module is a
small re-implementation of the Llama decoder stack (RMSNorm, rotary attention with grouped-query
key/value heads, SwiGLU MLP), reading the weights in place from a
:class:`~transformer_lens.model_bridge.TransformerBridge`, with exactly that entry point:
:meth:`LlamaStack.run_suffix` starts at any layer (and at the attention or the MLP half of it) from a
given residual stream over positions ``p..T-1``, attending to cached keys and values for ``0..p-1``,
and :meth:`LlamaStack.run_restarts` runs thousands of such restarts layer-synchronously: those that
restart at the same position share one batch that grows as their start layers come up, so every block
runs as a few large matrix products.

Grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads; Llama-3-8B: 32 share 8) is
handled the way the Hugging Face model does it: query head ``h`` reads key/value head
``h // (n_heads // n_kv_heads)``. Per-head quantities live in ``z`` ``[batch, pos, n_heads, d_head]``
(TransformerLens's ``hook_z``: one vector per *query* head) and the output projection, never in the
key/value tensors, so nothing assumes ``n_kv_heads == n_heads`` (the failure of TransformerLens issue
#980).

:meth:`LlamaStack.forward` is the ordinary full pass; it records what the restarts need (residual
stream before and between the halves of each block, attention and MLP outputs, ``z`` at chosen
positions, and rotated keys and values at all positions). Its logits equal the bridge's to float
precision; the tests and the patching benchmark check that. Devices and dtypes are the model's own, so
the same code runs llama-3-8b in bf16 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from icl.errors import ICLError

ZEdit = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, z [rows, pos, n_heads, d_head]) -> z


class UnsupportedModelError(ICLError, ValueError):
    """The bridge is not a Llama-family decoder this runner can re-run."""


class PatchingError(ICLError, ValueError):
    """A patch or ablation request that cannot be honoured (layer, position or alignment out of range)."""


def _weight(module: Any) -> torch.Tensor:
    return getattr(module, "original_component", module).weight


def _bias(module: Any) -> torch.Tensor | None:
    return getattr(getattr(module, "original_component", module), "bias", None)


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [d_model]
    ln2: torch.Tensor  # [d_model]
    W_q: torch.Tensor  # [n_heads * d_head, d_model]   (nn.Linear layout: out, in)
    W_k: torch.Tensor  # [n_kv * d_head, d_model]
    W_v: torch.Tensor  # [n_kv * d_head, d_model]
    W_o: torch.Tensor  # [d_model, n_heads * d_head]
    W_gate: torch.Tensor  # [d_mlp, d_model]
    W_up: torch.Tensor  # [d_mlp, d_model]
    W_down: torch.Tensor  # [d_model, d_mlp]


@dataclass
class Restart:
    """One batch of restarts from the same point: ``resid`` ``[rows, S, d_model]`` enters block
    ``start_layer`` (``stage="attn"``) or its MLP (``"mlp"``) at positions ``pos .. pos + S - 1``;
    ``rows`` ``[rows]`` index the unedited run whose keys and values the restarts attend to."""

    start_layer: int
    stage: str
    pos: int
    resid: torch.Tensor
    rows: torch.Tensor


@dataclass
class Trace:
    """What :meth:`LlamaStack.forward` recorded. ``keep`` positions are per row ([rows, n_keep])."""

    logits: torch.Tensor  # [rows, n_logit_pos, vocab] at the requested logit positions
    resid_pre: torch.Tensor  # [n_layers + 1, rows, n_keep, d_model]; entry n_layers = final residual
    resid_mid: torch.Tensor  # [n_layers, rows, n_keep, d_model]
    attn_out: torch.Tensor  # [n_layers, rows, n_keep, d_model]
    mlp_out: torch.Tensor  # [n_layers, rows, n_keep, d_model]
    z: torch.Tensor  # [n_layers, rows, n_keep, n_heads, d_head]
    k: torch.Tensor | None  # [n_layers, rows, n_kv, pos, d_head] (rotated), all positions
    v: torch.Tensor | None  # [n_layers, rows, n_kv, pos, d_head]
    final_scale: torch.Tensor  # [rows, n_keep, 1] the final RMSNorm's 1/rms at the kept positions


class LlamaStack:
    """The decoder stack of a Llama-family TransformerBridge, runnable from any layer and position."""

    def __init__(self, bridge: Any) -> None:
        cfg = bridge.cfg
        hf = getattr(bridge, "original_model", None)
        arch = (getattr(getattr(hf, "config", None), "architectures", None) or [""])[0]
        if hf is None or "Llama" not in arch and "Mistral" not in arch and "Qwen2" not in arch:
            raise UnsupportedModelError(
                f"the fast runner supports Llama-family decoders (RMSNorm, rotary GQA attention, SwiGLU); "
                f"this bridge wraps {arch or type(hf).__name__}. Use the hook-based reference "
                "(icl.patching.reference_resid_patch) instead"
            )
        self.bridge = bridge
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.n_kv = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.d_model)
        self.d_head = int(cfg.d_head)
        if self.n_heads % self.n_kv:
            raise UnsupportedModelError(f"{self.n_heads} query heads do not share {self.n_kv} KV heads evenly")
        self.n_rep = self.n_heads // self.n_kv
        attn0 = hf.model.layers[0].self_attn
        attn0 = getattr(attn0, "original_component", attn0)
        self.scaling = float(getattr(attn0, "scaling", self.d_head ** -0.5))
        norm = bridge.ln_final.original_component
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.ln_final = norm.weight
        self.W_U = _weight(bridge.unembed)  # [vocab, d_model]
        self.b_U = _bias(bridge.unembed)  # [vocab] or None
        self.W_E = _weight(bridge.embed)  # [vocab, d_model]
        self.rotary_emb = getattr(hf.model.rotary_emb, "original_component", hf.model.rotary_emb)
        act = getattr(hf.config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"MLP activation {act!r} is not SiLU")
        self.layers: list[LayerWeights] = []
        for blk in bridge.blocks:
            self.layers.append(LayerWeights(
                ln1=blk.ln1.original_component.weight, ln2=blk.ln2.original_component.weight,
                W_q=_weight(blk.attn.q), W_k=_weight(blk.attn.k), W_v=_weight(blk.attn.v),
                W_o=_weight(blk.attn.o), W_gate=_weight(blk.mlp.gate), W_up=_weight(getattr(blk.mlp, "in")),
                W_down=_weight(blk.mlp.out)))
        self.device = self.W_E.device
        self.dtype = self.W_E.dtype

    # ------------------------------------------------------------------------------------ pieces
    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """HF LlamaRMSNorm: normalise in fp32, cast back, scale."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[rows, pos, d_head]`` for absolute ``positions`` ``[rows, pos]``."""
        dummy = torch.zeros(1, device=self.device, dtype=self.dtype)
        return self.rotary_emb(dummy, positions.to(self.device))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [rows, heads, pos, d_head]; cos/sin [rows, pos, d_head]
        cos, sin = cos[:, None], sin[:, None]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def mlp(self, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        h = self.rms(resid_mid, w.ln2)
        return torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(h, w.W_gate)) * torch.nn.functional.linear(h, w.W_up),
            w.W_down)

    def attention(self, layer: int, resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_prefix: torch.Tensor | None = None, v_prefix: torch.Tensor | None = None,
                  prefix_valid: torch.Tensor | None = None, z_edit: ZEdit | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of ``resid`` ``[rows, S, d_model]`` (positions given by cos/sin) over cached prefix
        keys/values ``[rows, n_kv, P, d_head]`` (``prefix_valid`` ``[rows, P]`` masks padding) and itself,
        causally. Returns (attn_out [rows, S, d_model], k, v [rows, n_kv, S, d_head], z [rows, S, H, d_head])."""
        w = self.layers[layer]
        R, S, _ = resid.shape
        h = self.rms(resid, w.ln1)
        q = torch.nn.functional.linear(h, w.W_q).view(R, S, self.n_heads, self.d_head).transpose(1, 2)
        k = torch.nn.functional.linear(h, w.W_k).view(R, S, self.n_kv, self.d_head).transpose(1, 2)
        v = torch.nn.functional.linear(h, w.W_v).view(R, S, self.n_kv, self.d_head).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        P = 0 if k_prefix is None else k_prefix.shape[2]
        k_all = k if P == 0 else torch.cat([k_prefix, k], dim=2)  # [R, n_kv, P + S, d_head]
        v_all = v if P == 0 else torch.cat([v_prefix, v], dim=2)
        k_rep = k_all.repeat_interleave(self.n_rep, dim=1)  # query head h reads kv head h // n_rep
        v_rep = v_all.repeat_interleave(self.n_rep, dim=1)
        scores = torch.matmul(q, k_rep.transpose(2, 3)) * self.scaling  # [R, H, S, P + S]
        mask = torch.ones(S, P + S, dtype=torch.bool, device=resid.device).tril(diagonal=P)
        mask = mask[None, None].expand(R, 1, S, P + S)
        if P and prefix_valid is not None:
            mask = mask & torch.cat([prefix_valid.to(resid.device),
                                     torch.ones(R, S, dtype=torch.bool, device=resid.device)], 1)[:, None, None]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = torch.matmul(pattern, v_rep).transpose(1, 2)  # [R, S, H, d_head]
        if z_edit is not None:
            z = z_edit(layer, z)
        out = torch.nn.functional.linear(z.reshape(R, S, self.n_heads * self.d_head), w.W_o)
        return out, k, v, z

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and unembedding of residual vectors ``[..., d_model]`` -> ``[..., vocab]``."""
        out = torch.nn.functional.linear(self.rms(resid, self.ln_final), self.W_U)
        return out + self.b_U if self.b_U is not None else out

    # ------------------------------------------------------------------------------ full pass
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None, logit_pos: torch.Tensor | None = None,
                keep_kv: bool = True, z_edit: ZEdit | None = None) -> Trace:
        """Full pass over ``ids`` ``[rows, T]`` (right-padded rows are fine: causal). ``keep`` ``[rows, n]``
        chooses the positions whose activations are recorded (default: all); ``logit_pos`` ``[rows, m]``
        those whose logits are returned (default: the kept ones)."""
        ids = ids.to(self.device)
        R, T = ids.shape
        keep = torch.arange(T, device=self.device).expand(R, T) if keep is None else keep.to(self.device)
        logit_pos = keep if logit_pos is None else logit_pos.to(self.device)
        pos = torch.arange(T, device=self.device).expand(R, T)
        cos, sin = self.rotary(pos)
        x = torch.nn.functional.embedding(ids, self.W_E)  # [R, T, d_model]

        def take(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:  # [R, T, ...] -> [R, n, ...]
            idx = where.reshape(R, -1, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
            return torch.gather(t, 1, idx)

        L = self.n_layers
        pre, mid, att, mlp, zs, ks, vs = [], [], [], [], [], [], []
        for layer in range(L):
            pre.append(take(x, keep))
            a, k, v, z = self.attention(layer, x, cos, sin, z_edit=z_edit)
            x = x + a
            mid.append(take(x, keep))
            m = self.mlp(layer, x)
            x = x + m
            att.append(take(a, keep))
            mlp.append(take(m, keep))
            zs.append(take(z, keep))
            if keep_kv:
                ks.append(k)
                vs.append(v)
        pre.append(take(x, keep))
        final = take(x, logit_pos)
        xf = x.float()
        scale = torch.rsqrt(take(xf, keep).pow(2).mean(-1, keepdim=True) + self.eps)
        return Trace(logits=self.logits(final), resid_pre=torch.stack(pre), resid_mid=torch.stack(mid),
                     attn_out=torch.stack(att), mlp_out=torch.stack(mlp), z=torch.stack(zs),
                     k=torch.stack(ks) if keep_kv else None, v=torch.stack(vs) if keep_kv else None,
                     final_scale=scale)

    # --------------------------------------------------------------------------- restarts
    @torch.inference_mode()
    def run_suffix(self, start_layer: int, resid: torch.Tensor, start_pos: torch.Tensor,
                   k_cache: Any, v_cache: Any,
                   prefix_valid: torch.Tensor | None = None, stage: str = "attn",
                   z_edit: ZEdit | None = None) -> torch.Tensor:
        """Continue a forward pass from ``start_layer`` over a suffix of positions and return the final
        residual at the suffix's last position, ``[rows, d_model]`` (apply :meth:`logits`).

        ``resid`` ``[rows, S, d_model]``: the residual stream entering the start point (``stage="attn"``:
        before block ``start_layer``; ``"mlp"``: between its attention and its MLP) at absolute positions
        ``start_pos[r] .. start_pos[r] + S - 1``. ``k_cache``/``v_cache`` ``[n_layers, rows, n_kv, P,
        d_head]`` (or anything indexable by layer, e.g. a dict of the layers used): rotated keys and values of the unedited run at positions ``0..P-1`` (only layers
        ``>= start_layer`` are read; positions ``>= start_pos`` must be masked off by ``prefix_valid``
        ``[rows, P]`` when rows differ). ``start_layer == n_layers`` means the final residual itself.
        """
        if not 0 <= start_layer <= self.n_layers:
            raise PatchingError(f"start layer {start_layer} is outside 0..{self.n_layers}")
        if stage not in ("attn", "mlp") or (stage == "mlp" and start_layer == self.n_layers):
            raise PatchingError(f"bad stage {stage!r} at layer {start_layer}")
        x = resid.to(self.device)
        R, S, _ = x.shape
        pos = start_pos.to(self.device)[:, None] + torch.arange(S, device=self.device)[None]
        cos, sin = self.rotary(pos)
        for layer in range(start_layer, self.n_layers):
            if not (layer == start_layer and stage == "mlp"):
                kp = None if k_cache is None else k_cache[layer]  # [rows, n_kv, P, d_head]
                vp = None if v_cache is None else v_cache[layer]
                if kp is not None and kp.shape[2] == 0:
                    kp = vp = None
                a, _, _, _ = self.attention(layer, x, cos, sin, kp, vp, prefix_valid, z_edit)
                x = x + a
            x = x + self.mlp(layer, x)
        return x[:, -1]

    @torch.inference_mode()
    def run_restarts(self, jobs: Sequence[Restart], k_cache: torch.Tensor, v_cache: torch.Tensor,
                     max_rows: int = 4096, last: int = 1, z_edit: ZEdit | None = None) -> list[torch.Tensor]:
        """Run many restarts layer-synchronously and return, per job, the final residual at its last
        position ``[rows, d_model]`` (with ``last > 1``: at its last ``last`` positions, ``[rows, last,
        d_model]``, e.g. every position of a teacher-forced answer). ``z_edit`` edits the heads' outputs
        in every block the restarts run (the same heads ablated as in the run the caches come from).

        All restarts that start at the same position share the same key/value prefix length, so they
        are stacked into one growing batch: a job joins the batch at its start layer, and from then on
        every block runs once for all of them. The position-wise work (norms, projections, MLP) then
        runs as a few large matrix products instead of one small product per job, which is where the
        time goes on a CPU; no work is spent on layers before a job's start or on positions before its
        patch. ``k_cache``/``v_cache`` ``[n_layers, N, n_kv, T, d_head]``: the unedited run's keys and
        values; job rows index its batch dimension.
        """
        for job in jobs:
            if not 0 <= job.start_layer <= self.n_layers:
                raise PatchingError(f"start layer {job.start_layer} is outside 0..{self.n_layers}")
            if job.stage not in ("attn", "mlp") or (job.stage == "mlp" and job.start_layer == self.n_layers):
                raise PatchingError(f"bad stage {job.stage!r} at layer {job.start_layer}")
        out: list[torch.Tensor | None] = [None] * len(jobs)
        by_pos: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_pos.setdefault(job.pos, []).append(i)
        for pos, idxs in by_pos.items():
            # chunks of at most max_rows rows (a single job is never split)
            chunks, current, size = [], [], 0
            for i in sorted(idxs, key=lambda i: (jobs[i].start_layer, jobs[i].stage)):
                if current and size + len(jobs[i].rows) > max_rows:
                    chunks.append(current)
                    current, size = [], 0
                current.append(i)
                size += len(jobs[i].rows)
            chunks.append(current)
            for chunk in chunks:
                self._run_chunk(pos, [jobs[i] for i in chunk], chunk, k_cache, v_cache, out, last, z_edit)
        return out  # type: ignore[return-value]

    def _run_chunk(self, pos: int, jobs: list[Restart], ids: list[int], k_cache: torch.Tensor,
                   v_cache: torch.Tensor, out: list, last: int = 1, z_edit: ZEdit | None = None) -> None:
        S = jobs[0].resid.shape[1]
        if any(j.resid.shape[1] != S for j in jobs):
            raise PatchingError("restarts at the same position must cover the same positions")
        if not 1 <= last <= S:
            raise PatchingError(f"cannot return the last {last} positions of restarts that cover {S}")
        positions = torch.arange(pos, pos + S, device=self.device)[None]
        cos, sin = self.rotary(positions)  # [1, S, d_head], broadcast over rows
        x = torch.zeros(0, S, self.d_model, device=self.device, dtype=self.dtype)
        rows = torch.zeros(0, dtype=torch.long, device=self.device)
        order: list[tuple[int, int]] = []  # (output slot, number of rows) in batch order

        def join(stage: str, layer: int) -> None:
            nonlocal x, rows
            for slot, job in zip(ids, jobs):
                if job.start_layer == layer and job.stage == stage:
                    x = torch.cat([x, job.resid.to(self.device, self.dtype)])
                    rows = torch.cat([rows, job.rows.to(self.device)])
                    order.append((slot, len(job.rows)))

        first = min(j.start_layer for j in jobs)
        for layer in range(first, self.n_layers):
            join("attn", layer)
            if len(x):
                kp = k_cache[layer][rows, :, :pos] if pos else None
                vp = v_cache[layer][rows, :, :pos] if pos else None
                a, _, _, _ = self.attention(layer, x, cos, sin, kp, vp, z_edit=z_edit)
                x = x + a
            join("mlp", layer)
            if len(x):
                x = x + self.mlp(layer, x)
        join("attn", self.n_layers)
        final = x[:, -1] if last == 1 else x[:, -last:]
        start = 0
        for slot, n in order:
            out[slot] = final[start:start + n]
            start += n
