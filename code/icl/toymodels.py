"""Small models trained here from scratch (Part III), in plain torch, deterministic from a seed.

* :class:`AttnOnlyTransformer` — an attention-only transformer (token and learned positional
  embeddings, ``n_layers`` attention layers with ``n_heads`` heads writing into the residual stream, an
  unembedding; no MLPs and, by default, no LayerNorm, so each head's circuits are plain matrix
  products). :meth:`AttnOnlyTransformer.forward` can return every head's attention pattern
  ``[batch, head, query, key]`` and output, and can zero- or mean-ablate chosen heads.
  With ``smeared_keys`` each key is a learned mix of its own and the previous position's
  (:func:`smear_keys`, Olsson et al.'s architecture change); :meth:`AttnOnlyTransformer.chains_forward`
  runs several copies of the weights at once.
* :class:`MarkovRepeatData` — the data on which induction pays: a sparse random Markov chain in which,
  half of the time, the first ``L`` tokens are uniform random and are repeated right after themselves;
  :func:`sample_many` samples several sources at once.
* :func:`repeated_random_tokens` — the probe of the induction literature: random tokens, then the same
  tokens again.
* :func:`planted_induction_model` — a hand-built 2-layer model with a previous-token head in layer 0 and
  an induction head in layer 1, used to test the head scores of :mod:`icl.heads`.
* :func:`train` — AdamW on next-token loss with a callback every ``eval_every`` steps;
  :func:`train_stacked` trains several models of one shape (seeds, learning rates, data) as one program.

Everything random takes an explicit :class:`torch.Generator`; with the same seed and thread count the
same weights come out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttnOnlyConfig:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    vocab: int = 64
    n_ctx: int = 64
    init_std: float = 0.02
    smeared_keys: bool = False  # Olsson et al.'s smeared keys (see :func:`smear_keys`)


class AttnOnlyTransformer(nn.Module):
    """Attention-only transformer: ``resid = W_E[tok] + W_pos``; each layer adds its heads' outputs;
    ``logits = resid @ W_U + b_U``. Weights are stored per head (``W_Q[layer]``: ``[head, d_model,
    d_head]``) so that circuits such as ``W_E W_V W_O W_U`` are one product away."""

    def __init__(self, cfg: AttnOnlyConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head

        def p(*shape: int, std: float = cfg.init_std) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.W_E = p(cfg.vocab, d)
        self.W_pos = p(cfg.n_ctx, d)
        self.W_Q = nn.ParameterList([p(H, d, dh) for _ in range(L)])
        self.W_K = nn.ParameterList([p(H, d, dh) for _ in range(L)])
        self.W_V = nn.ParameterList([p(H, d, dh) for _ in range(L)])
        self.W_O = nn.ParameterList([p(H, dh, d) for _ in range(L)])
        self.W_U = p(d, cfg.vocab)
        self.b_U = nn.Parameter(torch.zeros(cfg.vocab))
        if cfg.smeared_keys:  # created last and without a random draw: the other weights are those of
            self.smear = nn.Parameter(torch.zeros(L, H))  # the plain model of the same seed; sigma(0) = 1/2

    def forward(self, tokens: torch.Tensor, *, return_cache: bool = False,
                head_mask: torch.Tensor | None = None, head_mean: list[torch.Tensor] | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Logits ``[batch, pos, vocab]``; with ``return_cache`` also ``{"pattern": [per layer
        [batch, head, q, k]], "head_out": [per layer [batch, head, q, d_model]], "resid": [...]}``.

        ``head_mask`` ``[n_layers, n_heads]`` scales each head's output (0 = zero ablation). Where
        ``head_mean`` (per layer ``[head, q, d_model]``, e.g. from :meth:`head_means`) is given, an
        ablated head's output is replaced by that mean instead of by zero (mean ablation).
        """
        B, T = tokens.shape
        resid = self.W_E[tokens] + self.W_pos[:T]
        if not return_cache and head_mask is None:
            return self._fast_forward(resid)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tokens.device), diagonal=1)
        scale = 1.0 / math.sqrt(self.cfg.d_head)
        cache: dict[str, Any] = {"pattern": [], "head_out": [], "resid": [resid]}
        for layer in range(self.cfg.n_layers):
            q = torch.einsum("bpd,hde->bhpe", resid, self.W_Q[layer])
            k = torch.einsum("bpd,hde->bhpe", resid, self.W_K[layer])
            if self.cfg.smeared_keys:
                k = smear_keys(k, self.smear[layer])
            v = torch.einsum("bpd,hde->bhpe", resid, self.W_V[layer])
            scores = torch.einsum("bhqe,bhke->bhqk", q, k) * scale
            pattern = scores.masked_fill(mask, float("-inf")).softmax(-1)
            z = torch.einsum("bhqk,bhke->bhqe", pattern, v)
            out = torch.einsum("bhqe,hed->bhqd", z, self.W_O[layer])  # per-head output
            if head_mask is not None:
                m = head_mask[layer].to(out.dtype)[None, :, None, None]
                if head_mean is not None:
                    out = m * out + (1 - m) * head_mean[layer][None, :, :T]
                else:
                    out = m * out
            resid = resid + out.sum(1)
            if return_cache:
                cache["pattern"].append(pattern)
                cache["head_out"].append(out)
                cache["resid"].append(resid)
        logits = resid @ self.W_U + self.b_U
        return (logits, cache) if return_cache else logits

    def _fast_forward(self, resid: torch.Tensor) -> torch.Tensor:
        """The same function as the per-head path, for training and plain evaluation: one fused QKV
        matmul per layer, PyTorch's ``scaled_dot_product_attention`` and one output matmul over all heads
        (the sum over heads of ``z_h W_O[h]`` is ``concat_h(z_h) @ stack_h(W_O[h])``). ``resid``
        ``[batch, pos, d_model]`` -> logits ``[batch, pos, vocab]``."""
        B, T, d = resid.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        for layer in range(self.cfg.n_layers):
            w_qkv = torch.stack([self.W_Q[layer], self.W_K[layer], self.W_V[layer]])  # [3, H, d, dh]
            w_qkv = w_qkv.permute(2, 0, 1, 3).reshape(d, 3 * H * dh)
            q, k, v = (resid @ w_qkv).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [B, H, T, dh]
            if self.cfg.smeared_keys:  # shaped as one copy of chains_forward's keys: the gradient of the
                # smearing weight is then summed in the same order, and stacked training is bit for bit
                k = smear_keys(k[None], self.smear[None, None, layer]).squeeze(0)
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, dh]
            resid = resid + z.transpose(1, 2).reshape(B, T, H * dh) @ self.W_O[layer].reshape(H * dh, d)
        return resid @ self.W_U + self.b_U

    def chains_forward(self, params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """The same function as :meth:`forward` for ``C`` copies of the weights at once: ``params`` maps
        every name in :meth:`named_parameters` to a tensor with a leading chain axis (``W_Q.0``:
        ``[C, head, d_model, d_head]``), ``tokens`` ``[batch, pos]`` are shared, or ``[C, batch, pos]``
        give each copy its own -> logits ``[C, batch, pos, vocab]``. One batched product per weight instead
        of one forward per copy: what SGLD with several chains (:func:`icl.slt.sgld_llc`) and the training
        of several seeds at once (:func:`train_stacked`) spend their time on."""
        H, dh = self.cfg.n_heads, self.cfg.d_head
        C, _, d = params["W_E"].shape
        if tokens.dim() == 3:  # each copy reads its own batch
            B, T = tokens.shape[1:]
            embed = params["W_E"][torch.arange(C)[:, None, None], tokens]
        else:
            B, T = tokens.shape
            embed = params["W_E"][:, tokens]
        resid = embed + params["W_pos"][:, None, :T]  # [C, B, T, d]
        for layer in range(self.cfg.n_layers):
            w_qkv = torch.stack([params[f"W_Q.{layer}"], params[f"W_K.{layer}"], params[f"W_V.{layer}"]], 1)
            w_qkv = w_qkv.permute(0, 3, 1, 2, 4).reshape(C, d, 3 * H * dh)  # [C, d, (3, H, dh)]
            qkv = (resid.reshape(C, B * T, d) @ w_qkv).view(C, B, T, 3, H, dh)
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, C * B, H, T, dh)
            if self.cfg.smeared_keys:  # params["smear"]: [C, layer, head]
                k = smear_keys(k.view(C, B, H, T, dh), params["smear"][:, None, layer]).view(C * B, H, T, dh)
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # [C*B, H, T, dh]
            z = z.view(C, B, H, T, dh).permute(0, 1, 3, 2, 4).reshape(C, B * T, H * dh)
            resid = resid + (z @ params[f"W_O.{layer}"].reshape(C, H * dh, d)).view(C, B, T, d)
        return (resid.reshape(C, B * T, d) @ params["W_U"]).view(C, B, T, -1) + params["b_U"][:, None, None]

    @torch.no_grad()
    def head_means(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each head's output averaged over a reference batch: per layer ``[head, pos, d_model]``."""
        _, cache = self(tokens, return_cache=True)
        return [o.mean(0) for o in cache["head_out"]]

    def ov_circuit(self, layer: int) -> torch.Tensor:
        """Direct-path OV circuit of every head of ``layer``, ``W_E W_V W_O W_U``: ``[head, vocab, vocab]``
        (entry ``[h, a, b]``: how attending to token ``a`` raises the logit of token ``b``)."""
        return torch.einsum("ad,hde,hef,fb->hab", self.W_E, self.W_V[layer], self.W_O[layer], self.W_U)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def smear_keys(k: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Olsson et al.'s *smeared keys*: the key of position ``t`` becomes ``sigma(alpha) k_t + (1 -
    sigma(alpha)) k_{t-1}``, with one learned ``alpha`` per head, so that a single layer can match a
    query against the *previous* token of each position, which is what an induction head needs and
    what otherwise takes a previous-token head in an earlier layer. Position 0 has no predecessor and
    keeps its own key. ``k`` ``[..., head, pos, d_head]``, ``alpha`` ``[..., head]`` (broadcast over the
    leading axes) -> ``[..., head, pos, d_head]``."""
    s = torch.sigmoid(alpha)[..., None, None]
    prev = torch.cat([k[..., :1, :], k[..., :-1, :]], dim=-2)
    return prev + s * (k - prev)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``; ``reduction="none"`` gives
    ``[batch, pos - 1]`` in nats (entry ``t`` is the loss of token ``t + 1``)."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    loss = loss.view(tokens.shape[0], -1)
    return loss.mean() if reduction == "mean" else loss


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class MarkovRepeatSpec:
    vocab: int = 64
    n_ctx: int = 64
    n_successors: int = 4  # each token has this many possible successors (a sparse chain)
    p_repeat: float = 0.5
    min_len: int = 10  # the repeated segment has length L in [min_len, max_len)
    max_len: int = 32


class MarkovRepeatData:
    """Sequences from a sparse random Markov chain; with probability ``p_repeat`` the first ``L`` tokens
    are uniform random and are repeated right after themselves (positions ``L .. 2L-1``), and the
    chain continues from there. Only an in-context mechanism can predict the repeated half: the random
    tokens are not predictable from the bigram statistics that the chain teaches."""

    def __init__(self, spec: MarkovRepeatSpec, seed: int) -> None:
        self.spec = spec
        g = torch.Generator().manual_seed(seed)
        V, S = spec.vocab, spec.n_successors
        succ = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(V)])  # [V, S]
        w = -torch.log(torch.rand(V, S, generator=g))  # Dirichlet(1) weights
        probs = torch.zeros(V, V)
        probs.scatter_(1, succ, w / w.sum(1, keepdim=True))
        self.transition = probs  # [V, V], rows sum to 1
        self.cdf = probs.cumsum(1).contiguous()
        self.bigram_entropy = float(-(probs.clamp_min(1e-30).log() * probs).sum(1).mean())

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[batch, n_ctx]`` and the repeat length of each row (0: no repeat)."""
        s = self.spec
        V, T = s.vocab, s.n_ctx
        repeat = torch.rand(batch, generator=generator) < s.p_repeat
        lens = torch.randint(s.min_len, s.max_len, (batch,), generator=generator) * repeat
        rand = torch.randint(V, (batch, T), generator=generator)
        u = torch.rand(T, batch, 1, generator=generator)
        toks = torch.empty(batch, T, dtype=torch.long)
        toks[:, 0] = rand[:, 0]
        for t in range(1, T):
            chain = torch.searchsorted(self.cdf[toks[:, t - 1]], u[t])[:, 0].clamp_(max=V - 1)
            copy = torch.gather(toks, 1, (t - lens).clamp(min=0)[:, None])[:, 0]
            toks[:, t] = torch.where(t < lens, rand[:, t], torch.where(t < 2 * lens, copy, chain))
        return toks, lens


def sample_many(sources: list[MarkovRepeatData], batch: int, generators: list[torch.Generator],
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sources[c].sample(batch, generators[c])`` for every ``c`` at once, bit for bit: tokens ``[C,
    batch, n_ctx]`` and repeat lengths ``[C, batch]``. Each copy draws its random numbers from its own
    generator in the order :meth:`MarkovRepeatData.sample` does; the walk along the sequence, the slow
    part, is then one loop over all ``C * batch`` rows. The sources may differ in their chain and in
    ``p_repeat``, not in vocabulary, length or repeat lengths."""
    s = sources[0].spec
    if any((d.spec.vocab, d.spec.n_ctx, d.spec.min_len, d.spec.max_len) != (s.vocab, s.n_ctx, s.min_len, s.max_len)
           for d in sources):
        raise ValueError("sample_many needs sources of one vocabulary, length and range of repeat lengths")
    V, T, C = s.vocab, s.n_ctx, len(sources)
    draws = []
    for d, g in zip(sources, generators):  # the draws of MarkovRepeatData.sample, in its order
        repeat = torch.rand(batch, generator=g) < d.spec.p_repeat
        lens = torch.randint(s.min_len, s.max_len, (batch,), generator=g) * repeat
        rand = torch.randint(V, (batch, T), generator=g)
        draws.append((lens, rand, torch.rand(T, batch, 1, generator=g)))
    lens = torch.cat([x[0] for x in draws])  # [C * batch]
    rand = torch.cat([x[1] for x in draws])  # [C * batch, T]
    u = torch.cat([x[2] for x in draws], dim=1)  # [T, C * batch, 1]
    cdf = torch.cat([d.cdf for d in sources])  # [C * V, V]: copy c's row of token a is c * V + a
    offset = torch.arange(C).repeat_interleave(batch) * V
    toks = torch.empty(C * batch, T, dtype=torch.long)
    toks[:, 0] = rand[:, 0]
    for t in range(1, T):
        chain = torch.searchsorted(cdf[offset + toks[:, t - 1]], u[t])[:, 0].clamp_(max=V - 1)
        copy = torch.gather(toks, 1, (t - lens).clamp(min=0)[:, None])[:, 0]
        toks[:, t] = torch.where(t < lens, rand[:, t], torch.where(t < 2 * lens, copy, chain))
    return toks.view(C, batch, T), lens.view(C, batch)


def repeated_random_tokens(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, 2 * length]``: ``length`` uniform random tokens followed by the same tokens again."""
    first = torch.randint(vocab, (batch, length), generator=generator)
    return torch.cat([first, first], dim=1)


# ------------------------------------------------------------------------------------------ training
def train(model: nn.Module, sample: Callable[[torch.Generator], torch.Tensor], *, steps: int, lr: float,
          seed: int, weight_decay: float = 0.0, eval_every: int = 0,
          on_eval: Callable[[int], None] | None = None, betas: tuple[float, float] = (0.9, 0.999),
          progress: bool = False, desc: str = "train") -> list[float]:
    """AdamW on next-token loss over batches from ``sample(generator)``; ``on_eval(step)`` runs at step 0
    and every ``eval_every`` steps (and after the last). Returns the training loss of every step."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    # fused=True: one kernel for the whole update (the unfused elementwise update dominates small models)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0):
        if on_eval is not None and eval_every and step % eval_every == 0:
            model.eval()
            on_eval(step)
            model.train()
        tokens = sample(g)
        loss = next_token_loss(model(tokens), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if on_eval is not None and eval_every:
        model.eval()
        on_eval(steps)
    return losses


def stack_params(models: list[AttnOnlyTransformer]) -> dict[str, torch.Tensor]:
    """The weights of ``C`` models of one shape as leaf tensors with a leading copy axis (``W_Q.0``:
    ``[C, head, d_model, d_head]``), the layout of :meth:`AttnOnlyTransformer.chains_forward`."""
    return {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).requires_grad_(True)
            for k, _ in models[0].named_parameters()}


def copy_of(params: dict[str, torch.Tensor], c: int, model: AttnOnlyTransformer) -> AttnOnlyTransformer:
    """``model`` with the weights of copy ``c`` of stacked ``params`` copied in (returned for chaining)."""
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(params[k][c])
    return model


def train_stacked(models: list[AttnOnlyTransformer], sample: Callable[[list[torch.Generator]], torch.Tensor], *,
                  steps: int, lrs: list[float], seeds: list[int], betas: tuple[float, float] = (0.9, 0.999),
                  eval_every: int = 0, on_eval: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                  progress: bool = False, desc: str = "train") -> np.ndarray:
    """:func:`train` (AdamW, no weight decay) of ``C`` models of one shape at once, as one program: the
    weights are stacked on a leading copy axis, the forward and backward passes are those of
    :meth:`AttnOnlyTransformer.chains_forward` on a batch per copy, ``sample(generators)`` ``[C, batch,
    pos]``, and the update is PyTorch's fused AdamW kernel, the one ``torch.optim.AdamW(fused=True)``
    calls, once per learning rate on every copy's slice of the weights. Copy ``c`` learns at ``lrs[c]`` and
    draws its batches from a generator seeded with ``seeds[c]``, as :func:`train` with ``seed=seeds[c]``
    would. The sum over copies of their mean losses has, for each copy's weights, that copy's own
    gradient, so each copy follows its own run. On one thread on the machines used here it does so to
    the last bit (``tests/test_toymodels.py`` checks it); a batched product need not add in the order of
    a single one, so elsewhere the agreement may be to float rounding only.

    ``on_eval(step, params)`` runs at step 0, every ``eval_every`` steps and after the last, with the
    stacked weights (:func:`copy_of` takes one copy out). Returns every step's training loss, ``[steps,
    C]``; the models themselves are not updated (take the weights from ``on_eval``)."""
    from tqdm.auto import tqdm

    C = len(models)
    if not (len(lrs) == len(seeds) == C):
        raise ValueError("need one learning rate and one seed per model")
    stacked = stack_params(models)
    params = list(stacked.values())
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    rates = sorted(set(lrs))
    groups = [[c for c in range(C) if lrs[c] == lr] for lr in rates]  # copies that share a rate
    state_steps = [[torch.zeros((), dtype=torch.float32) for _ in params for _ in group] for group in groups]

    def slices(tensors: list[torch.Tensor], group: list[int]) -> list[torch.Tensor]:
        # every copy's own slice of each tensor, as separate tensors: the fused kernel then meets the same
        # tensors as for a single model (it rounds a tail shorter than its vector width differently)
        return [t[c] for t in tensors for c in group]

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    losses = torch.empty(steps, C)
    for step in tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0):
        if on_eval is not None and eval_every and step % eval_every == 0:
            on_eval(step, stacked)
        tokens = sample(generators)  # [C, batch, pos]
        logits = models[0].chains_forward(stacked, tokens)
        V = logits.shape[-1]
        per_token = F.cross_entropy(logits[:, :, :-1].reshape(-1, V), tokens[:, :, 1:].reshape(-1), reduction="none")
        per_copy = per_token.view(C, -1).mean(1)  # [C]
        grads = [g.contiguous() for g in torch.autograd.grad(per_copy.sum(), params)]  # the kernel needs dense tensors
        with torch.no_grad():
            for lr, group, counts in zip(rates, groups, state_steps):
                torch._foreach_add_(counts, 1)
                torch._fused_adamw_(slices(params, group), slices(grads, group), slices(exp_avg, group),
                                    slices(exp_avg_sq, group), [], counts, amsgrad=False, lr=lr, beta1=betas[0],
                                    beta2=betas[1], weight_decay=0.0, eps=1e-8, maximize=False)
        losses[step] = per_copy.detach()
    if on_eval is not None and eval_every:
        on_eval(steps, stacked)
    return losses.numpy()


def state_arrays(model: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays named ``prefix + name`` (for the result cache)."""
    return {f"{prefix}{k}": v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def load_state_arrays(model: nn.Module, arrays: dict[str, np.ndarray], prefix: str) -> nn.Module:
    """Inverse of :func:`state_arrays`."""
    state = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------- a planted model
def planted_induction_model(vocab: int = 16, n_ctx: int = 32, n_heads: int = 2, sharpness: float = 30.0,
                            seed: int = 0, noise: float = 0.3) -> AttnOnlyTransformer:
    """A hand-built 2-layer attention-only model that does induction with two known heads.

    The residual stream has four blocks: current token (one-hot, ``vocab``), previous token (``vocab``),
    position (one-hot, ``n_ctx``) and an output block (``vocab``) that alone is read by the unembedding.

    * layer 0, head 0 — a *previous-token head*: its query at position ``p`` matches the key of position
      ``p - 1`` (positional QK); its OV copies that position's token into the previous-token block;
    * layer 1, head 0 — an *induction head*: its query (the current token) matches keys whose
      previous-token block holds the same token (K-composition with the head above), and its OV copies
      the attended token into the output block, so the model predicts the token that followed the
      earlier occurrence of the current token;
    * every other head has small random weights (a distractor: diffuse attention, small output).
    """
    V, T = vocab, n_ctx
    d = 3 * V + T
    tok, prev, pos, out = slice(0, V), slice(V, 2 * V), slice(2 * V, 2 * V + T), slice(2 * V + T, d)
    dh = max(V, T)
    cfg = AttnOnlyConfig(n_layers=2, d_model=d, n_heads=n_heads, d_head=dh, vocab=V, n_ctx=T, init_std=0.0)
    g = torch.Generator().manual_seed(seed)
    model = AttnOnlyTransformer(cfg)
    s = math.sqrt(dh) * sharpness  # undo the 1/sqrt(d_head) of the attention scores
    with torch.no_grad():
        for layer in range(2):  # distractors: small random weights everywhere first
            for name in ("W_Q", "W_K", "W_V"):
                getattr(model, name)[layer].copy_(torch.randn(n_heads, d, dh, generator=g) * noise / math.sqrt(d))
            model.W_O[layer].copy_(torch.randn(n_heads, dh, d, generator=g) * noise / math.sqrt(dh))
        model.W_E.zero_()
        model.W_E[:, tok] = torch.eye(V)
        model.W_pos.zero_()
        model.W_pos[:, pos] = torch.eye(T)
        # layer 0 head 0: query at p -> key at p - 1, copy token into the previous-token block
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            getattr(model, name)[0][0].zero_()
            getattr(model, name)[1][0].zero_()
        model.W_Q[0][0][pos, :T] = torch.eye(T) * s
        model.W_K[0][0][pos, :T] = torch.diag(torch.ones(T - 1), 1)  # key at p' lands on slot p' + 1
        model.W_V[0][0][tok, :V] = torch.eye(V)
        model.W_O[0][0][:V, prev] = torch.eye(V)
        # layer 1 head 0: query = current token, key = previous-token block; copy the key's token to out
        model.W_Q[1][0][tok, :V] = torch.eye(V) * s
        model.W_K[1][0][prev, :V] = torch.eye(V)
        model.W_V[1][0][tok, :V] = torch.eye(V)
        model.W_O[1][0][:V, out] = torch.eye(V)
        model.W_U.zero_()
        model.W_U[out, :] = torch.eye(V) * sharpness
    return model
