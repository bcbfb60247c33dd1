"""In-context linear regression (chapter 8): tasks, the classical estimators, a small transformer trained
here, and linear self-attention that is exactly one step of gradient descent.

A task is ``w ~ N(0, I_d)``; its examples are ``x ~ N(0, I_d)``, ``y = w·x + noise·ε``. A prompt
holds ``k`` examples and one query. Errors are reported as the *normalised excess error*
``E[(ŷ − w·x)²] / d``: 1 for the prediction 0, 0 for the truth (Garg et al. normalise by ``d`` too).

Estimators from the context ``(X, y)`` (``X`` is ``k × d``):

* :func:`least_squares` — minimum-norm least squares ``X⁺ y``; noiseless, its error is exactly
  ``1 − k/d`` in expectation for ``k < d`` and 0 after;
* :func:`ridge` — ``(XᵀX + σ² I)⁻¹ Xᵀ y``, the posterior mean under the prior ``w ~ N(0, I)`` and noise
  ``σ``: the Bayes-optimal prediction;
* :func:`gd_step` — one step of gradient descent from ``w = 0`` on ``L(w) = (1/2k) Σ (w·x_i − y_i)²``:
  ``w₁ = (η/k) Xᵀ y``.

:class:`RegressionTransformer` reads the prompt as tokens ``(x_1, 0), (0, y_1), …`` and predicts ``y_i``
at each ``x_i`` token, so one forward pass yields the prediction after 0, 1, …, K−1 examples.

:class:`LinearSelfAttention` is one layer of *linear* (softmax-free) self-attention on tokens
``e_i = (x_i, y_i)`` and a query ``(x, 0)``; :func:`gd_lsa` builds the weights with which its output at the
query equals the one-step GD prediction (von Oswald et al. 2023). The layer also has a weight matrix
``M`` (zero by default) that enters where the context does, which makes the context-to-weights map exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class Tasks:
    w: torch.Tensor  # [n, d]
    X: torch.Tensor  # [n, k, d] context inputs
    y: torch.Tensor  # [n, k] context targets (noisy)
    Xq: torch.Tensor  # [n, m, d] queries
    yq: torch.Tensor  # [n, m] noiseless targets w·x of the queries

    def hash_into(self, h: Any) -> None:
        """Feed the prompts' content (``w``, ``X``, ``y``) to a hashlib object: the experiments'
        ``content_digest``."""
        for a in (self.w, self.X, self.y):
            h.update(a.numpy().tobytes())


def sample_tasks(n: int, k: int, d: int, noise: float, generator: torch.Generator, n_query: int = 1,
                 dtype: torch.dtype = torch.float32) -> Tasks:
    w = torch.randn(n, d, generator=generator, dtype=dtype)
    X = torch.randn(n, k, d, generator=generator, dtype=dtype)
    y = torch.einsum("nkd,nd->nk", X, w) + noise * torch.randn(n, k, generator=generator, dtype=dtype)
    Xq = torch.randn(n, n_query, d, generator=generator, dtype=dtype)
    return Tasks(w, X, y, Xq, torch.einsum("nmd,nd->nm", Xq, w))


def excess_error(pred: torch.Tensor, target: torch.Tensor, d: int) -> torch.Tensor:
    """Normalised excess error ``(ŷ − w·x)² / d``, elementwise."""
    return (pred - target) ** 2 / d


# ------------------------------------------------------------------------------------- estimators
def least_squares(X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares ``Xq · X⁺ y`` (batched): ``[n, m]``."""
    w = torch.linalg.pinv(X) @ y[..., None]
    return (Xq @ w)[..., 0]


def ridge(X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge ``Xq (XᵀX + λI)⁻¹ Xᵀ y``; with ``λ = σ²`` the posterior mean under ``w ~ N(0, I)``."""
    d = X.shape[-1]
    A = X.transpose(-1, -2) @ X + lam * torch.eye(d, dtype=X.dtype)
    w = torch.linalg.solve(A, X.transpose(-1, -2) @ y[..., None])
    return (Xq @ w)[..., 0]


def gd_step(X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """One gradient step from ``w = 0`` on ``(1/2k) Σ (w·x_i − y_i)²``, then predict: ``Xq · (η/k) Xᵀ y``."""
    k = X.shape[-2]
    w = (X.transpose(-1, -2) @ y[..., None])[..., 0] * (lr / k)
    return (Xq @ w[..., None])[..., 0]


def best_gd_lr(X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor, yq: torch.Tensor) -> float:
    """The step size of :func:`gd_step` with the least squared error on these tasks (the prediction is
    linear in the step size, so this is a one-variable least-squares fit)."""
    a = gd_step(X, y, Xq, 1.0)
    return float((a * yq).sum() / (a * a).sum())


def gd_path(X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor, lrs: torch.Tensor,
            steps: list[int], relative: bool = False) -> torch.Tensor:
    """``t`` steps of gradient descent from ``w = 0`` on ``(1/2k) Σ (w·x_i − y_i)²``, for every step size in
    ``lrs`` ``[L]`` and every ``t`` in ``steps``, predicting the queries: returns ``[len(steps), L, n, m]``.

    In closed form: with ``H = XᵀX/k = V diag(λ) Vᵀ`` and ``b = Xᵀy/k``, the iterate is
    ``w_t = V diag((1 − (1 − ηλ_i)^t) / λ_i) Vᵀ b`` (``ηt`` where ``λ_i = 0``), so every ``(t, η)`` costs one
    elementwise product after one batched eigendecomposition. With one step this is :func:`gd_step`; as
    ``t → ∞`` with a stable step size it tends to minimum-norm least squares (GD from 0 stays in the row
    space of ``X``). With ``relative``, each prompt's step size is ``lrs / λ_max`` of its own ``XᵀX/k``,
    so any factor below 2 is stable on every prompt (a fixed step size diverges on the rare prompts whose
    ``λ_max`` is large, which gives GD the heavy tail of least squares).
    """
    k = X.shape[-2]
    lam, V = torch.linalg.eigh(X.transpose(-1, -2) @ X / k)  # [n, d], [n, d, d]
    lam = lam.clamp_min(0.0)
    b = (V.transpose(-1, -2) @ (X.transpose(-1, -2) @ y[..., None]))[..., 0] / k  # [n, d]: Vᵀ b
    q = Xq @ V  # [n, m, d]: queries in the eigenbasis
    eta = lrs.to(X.dtype).view(-1, *[1] * lam.ndim)  # [L, 1, 1]
    if relative:
        eta = eta / lam.max(-1, keepdim=True).values.clamp_min(1e-12)  # [L, n, 1]
    small = lam < 1e-12
    out = []
    for t in steps:
        el = eta * lam  # [L, n, d]
        # 1 − (1 − ηλ)^t, computed without cancellation where ηλ is small
        one_minus = torch.where(el < 1, -torch.expm1(t * torch.log1p(-el.clamp(max=1 - 1e-16))), 1 - (1 - el) ** t)
        f = torch.where(small, eta * t, one_minus / torch.where(small, torch.ones_like(lam), lam))  # [L, n, d]
        out.append(torch.einsum("nmd,lnd->lnm", q, f * b))
    return torch.stack(out)


def prediction_gap(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, d: int):
    """Squared prediction difference ``(a − b)² / d``, elementwise: the agreement measure of Akyürek et
    al. (2023) in the units of :func:`excess_error` (1 is the size of the prediction 0's error)."""
    return (a - b) ** 2 / d


def hill_tail_index(values: np.ndarray, tail: int) -> float:
    """Hill's estimate of the tail index ``α`` of positive ``values`` from their ``tail`` largest:
    ``P(V > v) ~ v^{-α}``. The mean of ``V`` is finite only for ``α > 1``; ``α ≤ 1`` means it diverges."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if not 1 <= tail < len(v) or v[tail] <= 0:
        raise ValueError("need 1 <= tail < len(values) and positive values")
    return float(1.0 / np.mean(np.log(v[:tail] / v[tail])))


# ------------------------------------------------------------------------------ the transformer
@dataclass(frozen=True)
class RegressionConfig:
    d: int = 5
    max_k: int = 20
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    mlp_mult: int = 2


def interleave(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tokens ``[n, 2k, d + 1]``: ``(x_1, 0), (0, y_1), (x_2, 0), …``."""
    n, k, d = X.shape
    xt = torch.cat([X, torch.zeros(n, k, 1, dtype=X.dtype)], -1)
    yt = torch.cat([torch.zeros(n, k, d, dtype=X.dtype), y[..., None]], -1)
    return torch.stack([xt, yt], dim=2).reshape(n, 2 * k, d + 1)


class _Block(nn.Module):
    def __init__(self, cfg: RegressionConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_mult * D), nn.GELU(), nn.Linear(cfg.mlp_mult * D, D))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # written out (not F.scaled_dot_product_attention) so that torch.func.vmap batches it
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        a = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return h + self.mlp(self.ln2(h))


class RegressionTransformer(nn.Module):
    """A GPT-style transformer (pre-LayerNorm, MLPs, learned positions) on interleaved ``(x, y)`` tokens."""

    def __init__(self, cfg: RegressionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.d + 1, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(2 * cfg.max_k, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.readout = nn.Linear(cfg.d_model, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scalar output at every token ``[n, T]``; at ``x`` tokens it is the prediction of ``y``."""
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln(h))[..., 0]

    def predict_all(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Prediction for ``x_i`` after the ``i − 1`` examples before it, for every ``i``: ``[n, k]``."""
        return self(interleave(X, y))[:, 0::2]

    def predict(self, X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor) -> torch.Tensor:
        """In-context prediction ``T_w(c, x)`` for each query, after all ``k`` examples of ``(X, y)``: ``[n, m]``.
        With ``k = 0`` it is the no-context prediction ``T_w(x)``."""
        n, m, d = Xq.shape
        Xr = X.repeat_interleave(m, 0)
        yr = y.repeat_interleave(m, 0)
        full_X = torch.cat([Xr, Xq.reshape(n * m, 1, d)], 1)
        full_y = torch.cat([yr, torch.zeros(n * m, 1, dtype=y.dtype)], 1)
        return self.predict_all(full_X, full_y)[:, -1].view(n, m)


def single_token_forward(model: RegressionTransformer, stacked: dict[str, torch.Tensor],
                         tokens: torch.Tensor) -> torch.Tensor:
    """The model's output on one-token prompts, for ``N`` copies of its weights at once.

    ``stacked``: the model's parameters by name, each with a leading copy axis ``[N, ...]``; ``tokens``
    ``[N, B, d + 1]``: ``B`` separate one-token prompts per copy. With a single token, causal attention
    attends only to itself, so each block adds ``proj(v)``; this equals ``model(tokens[n, :, None])``
    for each copy (tested) and lets many copies be fine-tuned in one batched pass. Returns ``[N, B]``.
    """
    D = model.cfg.d_model

    def lin(x: torch.Tensor, name: str, rows: slice = slice(None)) -> torch.Tensor:  # x [N, B, in]
        return x @ stacked[f"{name}.weight"][:, rows].transpose(1, 2) + stacked[f"{name}.bias"][:, None, rows]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        x = F.layer_norm(x, (D,))
        return x * stacked[f"{name}.weight"][:, None] + stacked[f"{name}.bias"][:, None]

    h = lin(tokens, "embed") + stacked["pos"][:, None, 0]  # [N, B, D]
    for i in range(model.cfg.n_layers):
        b = f"blocks.{i}"
        v = lin(ln(h, f"{b}.ln1"), f"{b}.qkv", slice(2 * D, 3 * D))
        h = h + lin(v, f"{b}.proj")
        h = h + lin(F.gelu(lin(ln(h, f"{b}.ln2"), f"{b}.mlp.0")), f"{b}.mlp.2")
    return lin(ln(h, "ln"), "readout")[..., 0]


def finetune_many(model: RegressionTransformer, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                  Xq: torch.Tensor, lrs: torch.Tensor, steps: int, record: list[int]) -> dict[int, torch.Tensor]:
    """Full-batch gradient descent, all parameters, for ``N`` independent copies of ``model``: copy ``n``
    fits the pairs ``(X[n, i], y[n, i])`` with ``mask[n, i] = 1`` (``[N, k, d]``, ``[N, k]``), each fed
    alone as a one-token prompt, on the loss ``mean_i (T(x_i) − y_i)²`` with step size ``lrs[n]``.
    Returns the no-context predictions for ``Xq`` ``[N, m, d]`` after each step count in ``record``."""
    N = X.shape[0]
    stacked = {k: v.detach()[None].repeat(N, *[1] * v.ndim).clone().requires_grad_(True)
               for k, v in model.named_parameters()}
    pad = torch.zeros(*X.shape[:-1], 1, dtype=X.dtype)
    xs = torch.cat([X, pad], -1)  # [N, k, d + 1]: (x_i, 0)
    qs = torch.cat([Xq, torch.zeros(*Xq.shape[:-1], 1, dtype=Xq.dtype)], -1)
    w = mask / mask.sum(1, keepdim=True)
    out = {}
    for step in range(1, steps + 1):
        loss = (((single_token_forward(model, stacked, xs) - y) ** 2) * w).sum()
        grads = torch.autograd.grad(loss, list(stacked.values()))
        with torch.no_grad():
            for (name, p), g in zip(stacked.items(), grads):
                p -= lrs.view(N, *[1] * (p.ndim - 1)) * g
        if step in record:
            with torch.no_grad():
                out[step] = single_token_forward(model, stacked, qs).clone()
    return out


# ---------------------------------------------------------------------- linear self-attention
class LinearSelfAttention(nn.Module):
    """One layer of linear self-attention read out at the query token ``e_q = (x, 0)``:

    ``e_q' = e_q + P (M + Σ_i e_i e_iᵀ) Q e_q / k``,  prediction ``ŷ = (e_q')_y`` (the last coordinate),

    where the sum runs over the ``k`` context tokens ``e_i = (x_i, y_i)``, ``P = W_V`` and ``Q = W_Kᵀ W_Q``
    (``(d+1) × (d+1)``), and ``M`` is a weight matrix (zero unless set) that plays the part of the
    context: this is ``e_q + Σ_i (P e_i)(e_iᵀ Q e_q) / k``, attention with values ``P e_i`` and scores
    ``e_iᵀ Q e_q`` and no softmax. With no context the prediction is ``(P M Q e_q)_y / k``.
    """

    def __init__(self, d: int, k: int, init_std: float = 0.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.d, self.k = d, k
        self.P = nn.Parameter(torch.randn(d + 1, d + 1, generator=generator, dtype=dtype) * init_std)
        self.Q = nn.Parameter(torch.randn(d + 1, d + 1, generator=generator, dtype=dtype) * init_std)
        self.M = nn.Parameter(torch.zeros(d + 1, d + 1, dtype=dtype), requires_grad=False)

    def forward(self, X: torch.Tensor, y: torch.Tensor, Xq: torch.Tensor) -> torch.Tensor:
        """Predictions ``[n, m]`` for queries ``Xq`` ``[n, m, d]`` given contexts ``X`` ``[n, k, d]``, ``y``."""
        E = torch.cat([X, y[..., None]], -1)  # [n, k, d+1]
        return _lsa_read(self.P, self.Q, self.M.to(E.dtype) + E.transpose(-1, -2) @ E, Xq, self.k)


def _lsa_read(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, Xq: torch.Tensor, k: int) -> torch.Tensor:
    """``(e + P C Q e / k)_y`` for each query token ``e = (x, 0)``, ``Xq`` ``[..., m, d]``: ``[..., m]``."""
    Eq = torch.cat([Xq, torch.zeros(*Xq.shape[:-1], 1, dtype=Xq.dtype)], -1)  # [..., m, d+1]
    P, Q = P.to(Xq.dtype), Q.to(Xq.dtype)
    return (Eq + (P @ C.to(Xq.dtype) @ Q @ Eq.transpose(-1, -2)).transpose(-1, -2) / k)[..., -1]


def gd_lsa(d: int, k: int, lr: float, dtype: torch.dtype = torch.float64) -> LinearSelfAttention:
    """The linear self-attention layer whose prediction is one GD step of size ``lr`` from ``w = 0``:
    ``Q`` keeps the ``x`` block (scores ``x_i·x``), ``P`` keeps ``y`` scaled by ``lr`` (values ``lr·y_i``),
    so ``ŷ = (lr/k) Σ_i y_i x_i·x = x · w₁``."""
    lsa = LinearSelfAttention(d, k, dtype=dtype)
    with torch.no_grad():
        lsa.Q.zero_()
        lsa.Q[:d, :d] = torch.eye(d)
        lsa.P.zero_()
        lsa.P[d, d] = lr
    return lsa


def lsa_weight_update(lsa: LinearSelfAttention, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The change of ``M`` that stands for the context ``(X, y)`` (one task: ``X`` ``[k, d]``):
    ``ΔM = Σ_i e_i e_iᵀ``, so that the layer with ``M + ΔM`` and no context predicts what the layer with
    ``M`` predicts in context (exactly: the context enters only through this sum)."""
    E = torch.cat([X, y[:, None]], -1)
    return E.T @ E


def gd_on_M(lsa: LinearSelfAttention, X: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One gradient step on ``M`` alone, from the layer's own loss ``(1/2k) Σ (ŷ(x_i) − y_i)²`` on the
    context pairs fed *without* context: returns ``ΔM = −lr ∇_M``."""
    M = lsa.M.detach().clone().to(X.dtype).requires_grad_(True)
    pred = _lsa_read(lsa.P.detach(), lsa.Q.detach(), M, X, lsa.k)
    loss = 0.5 * ((pred - y) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, M)
    return -lr * grad


def lsa_no_context(lsa: LinearSelfAttention, Xq: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Prediction of the layer with weight ``M`` and no context: ``[n, m]``."""
    return _lsa_read(lsa.P.detach(), lsa.Q.detach(), M, Xq, lsa.k)


def lsa_train(d: int, k: int, noise: float, steps: int, lr: float, batch: int, seed: int,
              init_std: float = 0.01) -> tuple[LinearSelfAttention, list[float]]:
    """Train ``P`` and ``Q`` of a linear self-attention layer on fresh regression tasks (Adam)."""
    g = torch.Generator().manual_seed(seed)
    lsa = LinearSelfAttention(d, k, init_std=init_std, generator=g)
    opt = torch.optim.Adam([lsa.P, lsa.Q], lr=lr)
    losses = []
    for _ in range(steps):
        t = sample_tasks(batch, k, d, noise, g)
        loss = ((lsa(t.X, t.y, t.Xq) - t.yq) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return lsa, losses


def expected_least_squares_error(k: int, d: int) -> float:
    """Noiseless minimum-norm least squares: ``E||P_⊥ w||² / d = 1 − k/d`` for ``k < d``, else 0."""
    return max(0.0, 1.0 - k / d)


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "math")]
