"""Induction heads in the pretrained model: prefix matching, copying, and what the heads look at in
the in-context prompts.

1. Repeated random tokens: ``n_seqs`` sequences of ``half`` uniformly random tokens followed by the same
   tokens again (after the tokenizer's own BOS, if it adds one). Per-token loss on each half, and per
   head the prefix-matching score (attention to the token after the earlier occurrence of the current
   token) and previous-token score from the attention patterns (``hook_pattern``, one pattern per
   query head), scored in hooks without storing caches (:mod:`icl.heads`).
2. Copying score of every head from its OV circuit (:func:`icl.heads.copying_score`), with the key/value
   weights of the KV head the query head reads (grouped-query attention) and the RMSNorm gains folded
   into the circuit. The vocabulary enters only through the ``d_model x d_model`` product ``W_U W_E``
   (:func:`unembed_embed`), summed in float64 over blocks of at most :data:`UE_BLOCK_BYTES` of the
   vocabulary, and the circuits come one layer at a time (:func:`gqa_circuits` is a generator). Memory
   is therefore bounded whatever the vocabulary: at Meta-Llama-3-8B's shape (128,256 x 4,096) about
   1 GB on the model's device besides the weights, instead of three 4.2 GB float64 copies of the
   embedding and all 32 layers' circuits at once. A model whose embedding fits one block (SmolLM2:
   49,152 x 576, 226 MB in float64) is computed in one product, exactly as before.
3. In the task prompts: per head, the attention from the position that predicts the query's answer
   (the space after its comma) to the first answer token of earlier examples (the prefix-matching
   target in these prompts: the token after each earlier ", "), to all earlier answer tokens, and to
   earlier x tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from icl import heads, tasks
from icl.errors import ConfigError
from icl.experiments import TASKS, between, reporter, with_threads
from icl.runner import LlamaStack
from icl.scoring import encode
from icl.stats import bootstrap_mean_ci

NAME = "induction_heads"
VERSION = 2
CHAPTER = "report/06-induction-heads.qmd"
USES_MODEL = True
DESCRIPTION = "prefix-matching, copying and previous-token scores of every head; attention to earlier examples"
THREADS = 1


@dataclass(frozen=True)
class Params:
    n_seqs: int = 50
    half: int = 50
    tasks: tuple[str, ...] = ("identity", "plus-1", "double-plus-3")
    n_prompts: int = 50
    k: int = 12
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 8
    token_low: int = 1000  # random tokens are drawn from ids token_low..token_high-1: ordinary
    token_high: int = 20000  # vocabulary (SmolLM2: no special or single-byte tokens)

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.n_seqs < 2 or self.half < 4 or self.n_prompts < 2 or self.k < 2:
            raise ValueError("need n_seqs >= 2, half >= 4, n_prompts >= 2, k >= 2")
        if not 0 <= self.token_low < self.token_high - self.half:
            raise ValueError("the random-token range must hold more than `half` tokens")


LIMITS = {"n_seqs": between(2, 1000), "half": between(4, 1000), "tasks": TASKS, "n_prompts": between(2, 1000),
          "k": between(2, 99), "n_boot": between(20, 10_000), "batch_size": between(1, 256),
          "token_low": between(0, 1_000_000), "token_high": between(1, 1_000_000)}


def random_tokens(params: Params) -> np.ndarray:
    rng = np.random.default_rng([params.seed, 6])
    first = rng.integers(params.token_low, params.token_high, size=(params.n_seqs, params.half))
    return np.concatenate([first, first], axis=1)


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return tasks.make_suite(params.tasks, params.n_prompts, params.k, params.seed)


def content_digest(params: Params) -> str:
    h = hashlib.sha256(random_tokens(params).tobytes())
    for name, prompts in prompts_for(params).items():
        h.update(f"{name}:{tasks.get_task(name)}:{tasks.prompts_digest(prompts)}".encode())
    return h.hexdigest()


UE_BLOCK_BYTES = 256 * 2**20  # float64 bytes of one block of vocabulary rows in unembed_embed


def gqa_circuits(stack: LlamaStack) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, one layer at a time: ``W_V`` ``[n_heads, d_model, d_head]`` (each query head's KV
    head, ln1 gain folded in) and ``W_O`` ``[n_heads, d_head, d_model]``, fp32 on the model's device.

    A generator, so that only one layer's expanded circuits are alive at once (Meta-Llama-3-8B: 134 MB
    per layer, 4.3 GB for all 32)."""
    for w in stack.layers:
        kv = torch.arange(stack.n_heads) // stack.n_rep  # query head h reads kv head h // n_rep
        W_v = w.W_v.float().view(stack.n_kv, stack.d_head, stack.d_model)[kv]  # [H, d_head, d_model]
        W_V = (W_v * w.ln1.float()[None, None]).transpose(1, 2)  # [H, d_model, d_head]
        W_O = w.W_o.float().view(stack.d_model, stack.n_heads, stack.d_head).permute(1, 2, 0)  # [H, d_head, d_model]
        yield W_V, W_O


def unembed_embed(stack: LlamaStack, block_bytes: int = UE_BLOCK_BYTES) -> torch.Tensor:
    """``W_U W_E`` ``[d_model, d_model]`` in float64, on the CPU: the unembedding (final RMSNorm gain
    folded in) times the embedding as the first RMSNorm sees it (each row divided by its rms).

    The copying score's non-zero eigenvalues depend on the ``vocab x vocab`` circuit only through this
    product. It is summed over blocks of vocabulary rows, each converted to float64 on the model's
    device and freed before the next, so the float64 work never holds more than about three blocks of
    ``block_bytes`` (``rows = block_bytes // (8 * d_model)``) whatever the vocabulary. When the whole
    vocabulary fits one block the product is one matrix product over all rows, the same operations in
    the same order as an unblocked computation (so SmolLM2's scores are unchanged bit for bit); more
    blocks change the float64 summation order only (differences at float64 rounding level)."""
    vocab, d_model = stack.W_E.shape
    rows = max(1, block_bytes // (8 * d_model))
    ln = stack.ln_final.double()  # [d_model]
    UE = None
    for a in range(0, vocab, rows):
        W_E = stack.W_E[a:a + rows].double()  # [rows, d_model]
        W_E = W_E * torch.rsqrt(W_E.pow(2).mean(-1, keepdim=True) + stack.eps)  # as the first RMSNorm sees it
        W_U = (stack.W_U[a:a + rows].double() * ln[None]).T  # [d_model, rows]
        part = W_U @ W_E  # [d_model, d_model]
        del W_E, W_U
        UE = part if UE is None else UE.add_(part)
        del part
    return UE.cpu()  # type: ignore[union-attr]


@torch.inference_mode()
@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    bridge, tok = model.bridge, model.tokenizer
    stack = LlamaStack(bridge)
    vocab = int(stack.W_E.shape[0])
    if params.token_high > vocab:  # the vocabulary is the model's, so this is checked once it is loaded
        raise ConfigError(f"{NAME}: parameter token_high={params.token_high} is beyond this model's "
                          f"vocabulary of {vocab} tokens; use --set token_high={vocab} or less")
    L, H = stack.n_layers, stack.n_heads
    device = bridge.cfg.device
    arrays: dict[str, np.ndarray] = {}
    say = reporter(NAME, progress)

    # 1. repeated random tokens
    say(f"{params.n_seqs} repeated random sequences: loss and prefix-matching / previous-token scores")
    bos = list(tok("", add_special_tokens=True)["input_ids"])
    rep = torch.tensor(random_tokens(params), dtype=torch.long)
    ids = torch.cat([torch.tensor([bos] * params.n_seqs, dtype=torch.long).reshape(params.n_seqs, len(bos)), rep], 1)
    prefix = np.zeros((L, H))
    prev = np.zeros((L, H))
    losses = []
    for start in range(0, params.n_seqs, params.batch_size):
        batch = ids[start:start + params.batch_size].to(device)
        w = len(batch) / params.n_seqs

        def score(pattern, hook):  # pattern [batch, n_heads, query, key]
            layer = int(hook.name.split(".")[1])
            prefix[layer] += w * heads.prefix_matching_score(pattern, batch).cpu().numpy()
            prev[layer] += w * heads.previous_token_score(pattern).cpu().numpy()

        logits = bridge.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", score)
                                                         for layer in range(L)])
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        losses.append(-logp.gather(-1, batch[:, 1:, None])[..., 0].cpu().numpy())
    loss = np.concatenate(losses)  # [n_seqs, T - 1]; entry t is the loss of token t + 1
    b = len(bos)
    first_half = loss[:, b:b + params.half - 1]  # tokens 2..half of the first copy
    second_half = loss[:, b + params.half:]  # tokens 2..half of the second copy
    arrays["loss_per_token.mean"] = loss.mean(0)
    l1 = bootstrap_mean_ci(first_half.mean(1, keepdims=True), n_boot=params.n_boot, seed=params.seed)
    l2 = bootstrap_mean_ci(second_half.mean(1, keepdims=True), n_boot=params.n_boot, seed=params.seed)
    arrays["prefix_matching"], arrays["previous_token"] = prefix, prev

    # 2. copying scores from weights (eigenvalues of the OV circuit W_E W_V W_O W_U). Its non-zero
    # eigenvalues depend on W_U W_E only through their d_model x d_model product, so we form that once
    # (in float64, blockwise over the vocabulary) and pass it with an identity: same scores, without a
    # vocab-sized product per head. One layer's circuits at a time, each moved to the CPU and dropped.
    say(f"copying scores of {L * H} heads from their OV circuits")
    UE = unembed_embed(stack)  # [d_model, d_model] float64, CPU
    eye = torch.eye(stack.d_model, dtype=torch.float64)
    copying = np.zeros((L, H))
    for layer, (W_V, W_O) in enumerate(gqa_circuits(stack)):
        copying[layer] = heads.copying_score(eye, W_V.cpu(), W_O.cpu(), UE).cpu().numpy()
        del W_V, W_O
    arrays["copying"] = copying
    del UE, eye

    # 3. attention in the task prompts, from the answer position of the query
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    att_summary = {}
    suite = prompts_for(params)
    for t, (name, prompts) in enumerate(suite.items(), 1):
        say(f"task {t}/{len(suite)} {name}: attention from the query's answer position, {len(prompts)} prompts")
        to_first = np.zeros((len(prompts), L, H))
        to_answers = np.zeros((len(prompts), L, H))
        to_xs = np.zeros((len(prompts), L, H))
        for start in range(0, len(prompts), params.batch_size):
            chunk = prompts[start:start + params.batch_size]
            enc = [encode(tok, p) for p in chunk]
            qpos = [e.answer_tokens[-1][0] - 1 for e in enc]  # predicts the query's first answer token
            T = max(qpos) + 1
            ids_c = torch.full((len(chunk), T), pad, dtype=torch.long)
            masks = torch.zeros(3, len(chunk), T)
            for r, (e, p) in enumerate(zip(enc, chunk)):
                ids_c[r, : qpos[r] + 1] = torch.tensor(e.ids[: qpos[r] + 1])
                for i in range(p.k - 1):
                    ans = e.answer_tokens[i]
                    masks[0, r, ans[0]] = 1
                    masks[1, r, list(ans)] = 1
                    line = [t for t in e.line_tokens[i] if t < ans[0]]
                    x_toks = [t for t in line if tok.decode([e.ids[t]]).strip().isdigit()]
                    masks[2, r, x_toks] = 1
            masks = masks.to(device)
            q_idx = torch.tensor(qpos, device=device)

            def grab(pattern, hook, start=start, q_idx=q_idx, masks=masks):
                layer = int(hook.name.split(".")[1])
                rows = torch.arange(pattern.shape[0], device=pattern.device)
                att = pattern[rows, :, q_idx].float()  # [R, H, key]
                got = torch.einsum("rhk,mrk->mrh", att, masks).cpu().numpy()
                sl = slice(start, start + pattern.shape[0])
                to_first[sl, layer], to_answers[sl, layer], to_xs[sl, layer] = got[0], got[1], got[2]

            bridge.run_with_hooks(ids_c.to(device), fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", grab)
                                                               for layer in range(L)])
        for key, values in (("to_first_answer_token", to_first), ("to_answers", to_answers), ("to_xs", to_xs)):
            arrays[f"{name}.{key}"] = values.mean(0)
        top = np.argsort(-to_first.mean(0), axis=None)[:5]
        att_summary[name] = {"top_to_first_answer_token": [[int(i // H), int(i % H), float(to_first.mean(0).flat[i])]
                                                           for i in top]}

    def ranked(scores: np.ndarray, n: int = 8) -> list[list[float]]:
        return [[int(layer), int(head), float(s)] for layer, head, s in heads.rank_heads(torch.tensor(scores), top=n)]

    data = {
        "model": model.spec.name, "n_layers": L, "n_heads": H, "n_kv_heads": stack.n_kv,
        "n_seqs": params.n_seqs, "half": params.half, "bos": len(bos),
        "loss_first_half": [float(np.ravel(v)[0]) for v in l1],
        "loss_second_half": [float(np.ravel(v)[0]) for v in l2],
        "top_prefix_matching": ranked(prefix), "top_previous_token": ranked(prev), "top_copying": ranked(copying),
        "attention": att_summary, "n_prompts": params.n_prompts, "k": params.k, "seed": params.seed,
    }
    return arrays, data
