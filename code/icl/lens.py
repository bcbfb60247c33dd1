"""The logit lens: read the residual stream after every layer as if it were the last one.

A decoder-only transformer writes its prediction into the residual stream, and only the final RMSNorm
and the unembedding turn that stream into logits. Applying those two maps to the stream after layer
``l`` (nostalgebraist 2020) gives the distribution the model "would" output if the remaining layers did
nothing. It is a biased probe (middle layers were never trained to be read this way), but the depth at
which a property of the output appears in it is a useful, cheap landmark.

For the answer of an in-context example ``(x, y)`` we read, at the position that predicts the answer's
first token (the space after the comma), per layer:

* the probability and the rank of the correct first token,
* the probability mass on *number tokens* (tokens that decode to digits only) — is the answer going to
  be a number at all? — and
* teacher-forced, the log-probability of the whole answer (digits and ``)``), each answer token read
  at the position before it at the same layer.

Layer index ``0`` is the embedding, ``n_layers`` the final residual stream (the model's real output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from icl.runner import LlamaStack
from icl.scoring import encode, last_digit_index
from icl.tasks import Prompt


def number_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """``[vocab]`` bool: tokens whose text, stripped of spaces, is a non-empty string of digits."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i]).strip()
        mask[i] = bool(text) and text.isdigit() and text.isascii()
    return mask


@dataclass(frozen=True)
class LensResult:
    p_first: np.ndarray  # [n_prompts, n_layers + 1] probability of the correct first answer token
    rank_first: np.ndarray  # [n_prompts, n_layers + 1] its rank (0 = argmax)
    number_mass: np.ndarray  # [n_prompts, n_layers + 1] probability on number tokens (first answer position)
    logp_answer: np.ndarray  # [n_prompts, n_layers + 1] teacher-forced log-prob of the whole answer (nats)
    logp_last: np.ndarray  # [n_prompts, n_layers + 1] log-prob of the answer's last digit, the digits before it given


@torch.inference_mode()
def answer_lens(stack: LlamaStack, tokenizer, prompts: list[Prompt], batch_size: int = 8) -> LensResult:
    """Logit lens on the last example's answer of each prompt (the earlier examples are the context)."""
    numbers = number_token_mask(tokenizer, stack.W_U.shape[0]).to(stack.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    L1 = stack.n_layers + 1
    n = len(prompts)
    p_first = np.zeros((n, L1))
    rank = np.zeros((n, L1), dtype=np.int64)
    mass = np.zeros((n, L1))
    logp_ans = np.zeros((n, L1))
    logp_last = np.zeros((n, L1))
    encoded = [encode(tokenizer, p) for p in prompts]
    last_idx = torch.tensor([last_digit_index(tokenizer, p, e) for p, e in zip(prompts, encoded)])
    for start in range(0, n, batch_size):
        chunk = encoded[start:start + batch_size]
        R = len(chunk)
        answers = [list(e.answer_tokens[-1]) for e in chunk]
        width = max(len(a) for a in answers)
        T = max(a[-1] + 1 for a in answers)
        ids = torch.full((R, T), pad, dtype=torch.long)
        keep = torch.zeros((R, width), dtype=torch.long)
        targets = torch.zeros((R, width), dtype=torch.long)
        valid = torch.zeros((R, width), dtype=torch.bool)
        for r, (e, a) in enumerate(zip(chunk, answers)):
            ids[r, : a[-1] + 1] = torch.tensor(e.ids[: a[-1] + 1])
            for j, t in enumerate(a):
                keep[r, j], targets[r, j], valid[r, j] = t - 1, e.ids[t], True
            keep[r, len(a):] = a[-1] - 1
        trace = stack.forward(ids, keep=keep, logit_pos=keep[:, :1], keep_kv=False)
        targets, valid = targets.to(stack.device), valid.to(stack.device)
        for layer in range(L1):
            logp = torch.log_softmax(stack.logits(trace.resid_pre[layer]).float(), dim=-1)  # [R, width, vocab]
            tgt = logp.gather(-1, targets[..., None])[..., 0]  # [R, width]
            first = logp[:, 0]
            rows = slice(start, start + R)
            p_first[rows, layer] = tgt[:, 0].exp().cpu().numpy()
            rank[rows, layer] = (first > tgt[:, :1]).sum(-1).cpu().numpy()
            mass[rows, layer] = first.exp()[:, numbers].sum(-1).cpu().numpy()
            logp_ans[rows, layer] = (tgt * valid).sum(-1).double().cpu().numpy()
            logp_last[rows, layer] = tgt.gather(1, last_idx[rows].to(tgt.device)[:, None])[:, 0].cpu().numpy()
    return LensResult(p_first, rank, mass, logp_ans, logp_last)
