"""Scores that name attention heads, for any model (Olsson et al. 2022).

The pattern scores take an attention pattern ``[batch, head, query, key]`` (rows sum to one, causal),
as :class:`icl.toymodels.AttnOnlyTransformer` returns it and as TransformerLens caches it
(``blocks.{L}.attn.hook_pattern``), and return one number per head:

* :func:`previous_token_score` — mean attention from each token to the token right before it;
* :func:`prefix_matching_score` — mean attention from each token to the tokens that *followed* earlier
  occurrences of the same token, the attention pattern of an induction head (on repeated random tokens
  this is attention from position ``L + i`` to ``i + 1``).

The copying score reads weights, not patterns: :func:`copying_score` is Olsson et al.'s eigenvalue
score of a head's OV circuit ``W_E W_V W_O W_U`` (entry ``[a, b]``: attending to token ``a`` raises the
logit of token ``b``), ``sum(λ) / sum(|λ|)`` over its eigenvalues: +1 for a pure copying head, −1 for
one that suppresses what it attends to, near 0 for neither. The circuit is ``vocab × vocab``, but its
non-zero eigenvalues are those of the ``d_head × d_head`` product ``W_O W_U W_E W_V`` (the eigenvalues
of ``AB`` and ``BA`` agree apart from zeros), so the score costs nothing even for a 49k vocabulary.

:func:`rank_heads` sorts heads by a score.
"""

from __future__ import annotations

import torch


def _check(pattern: torch.Tensor) -> torch.Tensor:
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"expected an attention pattern [batch, head, query, key], got {tuple(pattern.shape)}")
    return pattern.float()


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Mean over batch and over queries ``q >= 1`` of the attention paid to key ``q - 1``: ``[head]``."""
    p = _check(pattern)
    return torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))


def prefix_match_targets(tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, query, key]`` mask: key ``k`` follows an earlier occurrence of the query's token,
    i.e. ``tokens[k - 1] == tokens[q]`` with ``1 <= k <= q``."""
    T = tokens.shape[-1]
    same = tokens[:, None, :-1] == tokens[:, :, None]  # [b, q, j]: tokens[j] == tokens[q], j = k - 1
    target = torch.zeros(tokens.shape[0], T, T, dtype=torch.bool, device=tokens.device)
    target[:, :, 1:] = same
    q = torch.arange(T, device=tokens.device)
    return target & (q[None, :, None] >= q[None, None, :])  # k <= q (so j = k - 1 < q)


def prefix_matching_score(pattern: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over batch and over the queries that have at least one target key of the attention paid to
    target keys (:func:`prefix_match_targets`): ``[head]``. On repeated random tokens it is Olsson et
    al.'s prefix-matching (induction) score."""
    p = _check(pattern)
    if tokens.shape != p.shape[:1] + p.shape[-1:]:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match pattern {tuple(p.shape)}")
    target = prefix_match_targets(tokens)  # [b, q, k]
    has = target.any(-1)  # [b, q]
    if not bool(has.any()):
        raise ValueError("no query has an earlier occurrence of its token: use repeated tokens")
    mass = (p * target[:, None].to(p.dtype)).sum(-1)  # [b, h, q]
    w = has[:, None].to(p.dtype)
    return (mass * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2))


def copying_score(W_E: torch.Tensor, W_V: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """Eigenvalue copying score of each head's OV circuit ``W_E W_V W_O W_U``: ``[head]``.

    ``W_E`` ``[vocab, d_model]``, ``W_V`` ``[head, d_model, d_head]``, ``W_O`` ``[head, d_head, d_model]``,
    ``W_U`` ``[d_model, vocab]``. A head whose circuit is zero scores 0.
    """
    W_E, W_V, W_O, W_U = (t.detach().double() for t in (W_E, W_V, W_O, W_U))
    small = torch.einsum("hed,dv,vm,hmf->hef", W_O, W_U, W_E, W_V)
    return _eigen_score(torch.linalg.eigvals(small))


def copying_score_of_circuit(circuit: torch.Tensor) -> torch.Tensor:
    """The same score from full circuits ``[head, vocab, vocab]`` (for checking; quadratic in vocab)."""
    return _eigen_score(torch.linalg.eigvals(circuit.double()))


def _eigen_score(eig: torch.Tensor) -> torch.Tensor:
    total = eig.real.sum(-1)
    size = eig.abs().sum(-1)
    return torch.where(size > 1e-12, total / size.clamp_min(1e-300), torch.zeros_like(total)).float()


def rank_heads(scores: torch.Tensor, top: int | None = None) -> list[tuple[int, int, float]]:
    """``scores`` ``[layer, head]`` → ``[(layer, head, score), ...]`` from highest to lowest."""
    flat = [(layer, head, float(scores[layer, head]))
            for layer in range(scores.shape[0]) for head in range(scores.shape[1])]
    flat.sort(key=lambda r: -r[2])
    return flat[:top] if top else flat
