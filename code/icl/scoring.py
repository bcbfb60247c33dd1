"""Per-example surprisal from one teacher-forced forward pass per prompt.

For a prompt of ``k`` examples the model's log-probability of every token given the tokens before it
comes out of a single forward pass. The surprisal of example ``i``'s answer, the quantity the book
plots against ``i``, is

    S_i = -sum_{t in answer_i} log P(token_t | tokens_<t)        (nats)

— the information, in the source notes' sense, that example ``i`` still had to supply after the model
had seen ``i - 1`` examples. Summing ``S_i`` over ``i`` gives the total information spent to learn the
task. ``exp(-S_i)`` is the probability the model gives the whole correct answer, and the answer is an
*exact match* when greedy decoding would write it: every answer token is the argmax at its position.

Answers are located by character offsets, so whatever the tokenizer does (one token per digit for
SmolLM2; up to three digits per token for Llama-3) the whole answer is scored. An answer must begin on
a token boundary, or inside a token whose part before the answer is whitespace only: a negative
answer's ``"-"`` is fused with the space before it (``" -"`` is one token for SmolLM2 and for
Llama-3), and that token is scored whole, space included; the space is fixed by the line format, so
this costs the model next to nothing. Its last token may likewise run past the closing parenthesis
(``")\n"`` is one token for some tokenizers), in which case that token is scored whole.

Prompts are right-padded into batches. Padding never changes the scores of real tokens: attention is
causal and real tokens come first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from icl.tasks import Prompt


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    answer_tokens: tuple[tuple[int, ...], ...]  # token indices of each example's answer
    line_tokens: tuple[tuple[int, ...], ...]  # token indices of each example's whole line


def _tokens_in(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    return [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def encode(tokenizer, prompt: Prompt) -> EncodedPrompt:
    """Tokenize a prompt (with the tokenizer's own special tokens) and map answers to token indices."""
    enc = tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    answers, lines = [], []
    for (a0, a1), (l0, l1) in zip(prompt.answer_spans, prompt.line_spans):
        toks = _tokens_in(offsets, a0, a1)
        lead = prompt.text[offsets[toks[0]][0] : a0] if toks else "x"
        if not toks or (lead and not lead.isspace()):  # " -": a space fused with a minus sign is fine
            raise ValueError(f"answer {prompt.text[a0:a1]!r} does not start on a token boundary")
        if toks[0] == 0:
            raise ValueError("an answer cannot be the first token of a prompt")
        answers.append(tuple(toks))
        lines.append(tuple(t for t in _tokens_in(offsets, l0, l1) if t > 0))
    return EncodedPrompt(ids, tuple(answers), tuple(lines))


def last_digit_index(tokenizer, prompt: Prompt, encoded: EncodedPrompt, example: int = -1) -> int:
    """Index, within ``encoded.answer_tokens[example]``, of the token that holds the last digit of that
    example's answer (the answer span is ``y)``, so the closing parenthesis, or a token fused with it,
    can come after it)."""
    a0 = prompt.answer_spans[example][0]
    offsets = tokenizer(prompt.text, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]
    digits = _tokens_in([tuple(o) for o in offsets], a0, a0 + len(str(prompt.ys[example])))
    return encoded.answer_tokens[example].index(digits[-1])


@dataclass(frozen=True)
class ExampleScores:
    answer_nats: np.ndarray  # [n_prompts, k] surprisal of each example's full answer
    line_nats: np.ndarray  # [n_prompts, k] surprisal of each example's whole line, x included
    exact: np.ndarray  # [n_prompts, k] bool, greedy decoding reproduces the answer
    answer_len: np.ndarray  # [n_prompts, k] number of answer tokens


@torch.inference_mode()
def token_logprobs(bridge, batch_ids: list[list[int]], pad_id: int,
                   device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and whether it is the argmax.

    Returns ``logp`` [batch, max_len] and ``is_top`` [batch, max_len] (bool), where entry ``t`` refers
    to token ``t`` predicted from tokens ``< t``; entry 0 is NaN/False.
    """
    length = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), length), pad_id, dtype=torch.long)
    for row, x in enumerate(batch_ids):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    ids = ids.to(device)
    logits = bridge(ids).float()  # [batch, pos, d_vocab]
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    logp = torch.full(ids.shape, float("nan"))
    is_top = torch.zeros(ids.shape, dtype=torch.bool)
    logp[:, 1:] = logp_all.gather(-1, target[..., None])[..., 0].cpu()
    is_top[:, 1:] = (logits[:, :-1].argmax(-1) == target).cpu()
    return logp, is_top


def score_examples(bridge, tokenizer, prompts: list[Prompt], batch_size: int = 8,
                   device: str = "cpu", progress: bool = False, desc: str = "scoring") -> ExampleScores:
    """Teacher-forced per-example scores for prompts that all have the same number of examples."""
    k = prompts[0].k
    if any(p.k != k for p in prompts):
        raise ValueError("all prompts must have the same number of examples")
    encoded = [encode(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = len(prompts)
    answer = np.zeros((n, k))
    line = np.zeros((n, k))
    exact = np.zeros((n, k), dtype=bool)
    alen = np.zeros((n, k), dtype=np.int64)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        chunk = encoded[start : start + batch_size]
        logp, is_top = token_logprobs(bridge, [e.ids for e in chunk], pad_id, device)
        for row, enc in enumerate(chunk):
            for i, (a, l) in enumerate(zip(enc.answer_tokens, enc.line_tokens)):
                answer[start + row, i] = -float(logp[row, list(a)].double().sum())
                line[start + row, i] = -float(logp[row, list(l)].double().sum())
                exact[start + row, i] = bool(is_top[row, list(a)].all())
                alen[start + row, i] = len(a)
    return ExampleScores(answer, line, exact, alen)
