"""Contexts to weights on the pretrained model (chapter 8): Q1 for SmolLM2 on a rule it learns in context.

For a task the model learns in context (default ``plus-1``, ``y = x + 1``), ``n_contexts`` prompts of
``max(k) + n_query`` examples are drawn (:func:`icl.tasks.make_prompts`); the first ``k`` lines are the
context and the last ``n_query`` examples, whose ``x`` differ from the context's, are the held-out
queries. For every context and query we compare

* the in-context prediction: the model reads the ``k`` lines and then ``"(x, "``;
* the prediction after fine-tuning: the Hugging Face model under the bridge takes ``n`` optimizer steps
  (Adam or plain SGD) on the language-model loss of the ``k`` context lines, each fed as its own
  sequence (``loss="line"``: every token after the first; ``"answer"``: the answer only), and then
  reads ``"(x, "`` alone. Only the MLPs of ``layers`` (default: layers 14 and 15, the middle of
  SmolLM2's 30 and of Meta-Llama-3-8B's 32) are trained, in float32 whatever the model's dtype
  (:class:`icl.finetune.Subset`); the device memory is then the frozen weights plus 16 bytes per
  trained parameter with Adam (:func:`icl.finetune.memory_bytes`, :func:`llama3_8b_memory`), and the
  layers below the band run once per batch (:class:`icl.finetune.Tail`). The subset is restored from a
  CPU snapshot before the next run and at the end, and compared with it bit for bit (``torch.equal``)
  to check that the shared model is unchanged.

What the restriction means for the question: whatever a fine-tuned band of MLPs reproduces, full
fine-tuning can reproduce as well (it may leave the other weights alone), so the fine-tuned predictions
here are one point inside what a weight update can do, and a gap measured here is an upper bound on
the gap of the best full update with the same optimizer and schedule.

Measured on the query's answer (digits and ``")"``): the probability of the whole correct answer
(teacher-forced), whether greedy decoding writes it, and the KL divergence over the answer's first token
``KL(in-context || fine-tuned)``, with the no-context prediction before any step as the baseline.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from icl import finetune as ft
from icl import scoring, tasks, timing
from icl.errors import ConfigError
from icl.experiments import TASKS, between, each_float, each_int, one_of

NAME = "c2w_pretrained"
VERSION = 2
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = True
DESCRIPTION = "pretrained model: in-context prediction vs fine-tuning on the context lines (Q1)"
THREADS = 1


@dataclass(frozen=True)
class Params:
    seed: int = 0
    task: str = "plus-1"
    ks: tuple[str, ...] = ("2", "5")
    lrs: tuple[str, ...] = ("0.0001", "0.0003", "0.001")
    optimizer: str = "adam"
    steps: int = 10
    record: tuple[str, ...] = ("1", "2", "3", "5", "10")
    n_contexts: int = 6
    n_query: int = 12
    loss: str = "line"
    layers: tuple[str, ...] = ("14", "15")  # the MLPs of these layers are trained (negative: from the end)

    def validate(self) -> None:
        task = tasks.get_task(self.task)
        if task.random_rule:
            raise ValueError("Q1 needs a rule the model can learn; the random rule has none")
        if not all(int(k) >= 1 for k in self.ks) or self.n_query < 1 or self.n_contexts < 2:
            raise ValueError("need every k >= 1, n_query >= 1 and n_contexts >= 2")
        n_x = task.x_max - task.x_min + 1
        if max(int(k) for k in self.ks) + self.n_query > n_x:
            raise ValueError(f"need max(ks) + n_query <= {n_x}: a prompt's x values are distinct")
        if not all(0 < int(n) <= self.steps for n in self.record):
            raise ValueError("record steps must be in 1..steps")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError("optimizer must be adam or sgd")
        if self.loss not in ("line", "answer"):
            raise ValueError("loss must be 'line' (every token after the first) or 'answer'")
        [float(x) for x in self.lrs]
        if not self.layers or len(set(int(i) for i in self.layers)) != len(self.layers):
            raise ValueError("layers must name at least one layer, each once")


LIMITS = {"task": TASKS, "ks": each_int(1, 90), "lrs": each_float(1e-8, 1.0), "optimizer": one_of("adam", "sgd"),
          "steps": between(1, 1000), "record": each_int(1, 1000), "n_contexts": between(2, 100),
          "n_query": between(1, 90), "loss": one_of("line", "answer"),
          "layers": each_int(-200, 199)}


def llama3_8b_memory(p: Params) -> dict[str, int]:
    """Device bytes of this experiment's fine-tuning on Meta-Llama-3-8B in bf16, before activations
    (parameter counts from the published shape, :data:`icl.models.LLAMA3_SHAPES`)."""
    from icl.models import LLAMA3_SHAPES

    s = LLAMA3_SHAPES["8b"]
    d, f, n_l, v = int(s["hidden_size"]), int(s["intermediate_size"]), int(s["num_hidden_layers"]), int(s["vocab_size"])
    kv = d * int(s["num_key_value_heads"]) // int(s["num_attention_heads"])
    per_layer = d * (2 * d + 2 * kv) + 3 * d * f + 2 * d  # attention, MLP, two RMSNorms
    n_params = 2 * v * d + n_l * per_layer + d  # untied embedding and unembedding, final norm
    n_trained = len(ft.mlp_layers(n_l, [int(i) for i in p.layers])) * 3 * d * f
    return {"n_params": n_params, "n_trained": n_trained} | ft.memory_bytes(n_params, n_trained, 2, p.optimizer)


def prompts_for(p: Params) -> list[tasks.Prompt]:
    """One prompt per context: its first ``max(k)`` examples are the context, the rest the queries."""
    return tasks.make_prompts(p.task, p.n_contexts, max(int(k) for k in p.ks) + p.n_query, p.seed)


def content_digest(p: Params) -> str:
    h = hashlib.sha256(repr(tasks.get_task(p.task)).encode())
    h.update(tasks.prompts_digest(prompts_for(p)).encode())
    return h.hexdigest()


def example_prompt(task: str, xs: list[int], ys: list[int]) -> tasks.Prompt:
    """The prompt of the given examples, laid out exactly as :func:`icl.tasks.make_prompts` does."""
    text, lines, answers = "", [], []
    for x, y in zip(xs, ys):
        line, offset = tasks.format_example(x, y)
        start = len(text)
        lines.append((start, start + len(line)))
        answers.append((start + offset, start + len(line) - 1))
        text += line
    return tasks.Prompt(task, tuple(xs), tuple(ys), text, tuple(lines), tuple(answers))


def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _compute(params, model, progress)
    finally:
        torch.set_num_threads(threads)


def _compute(p: Params, loaded: Any, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    hf = loaded.bridge.original_model  # the Hugging Face model the bridge wraps (same parameters)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ks, lrs, record = [int(k) for k in p.ks], [float(x) for x in p.lrs], [int(n) for n in p.record]
    K, C, m = max(ks), p.n_contexts, p.n_query
    prompts = prompts_for(p)
    try:
        layers = ft.mlp_layers(hf.config.num_hidden_layers, [int(i) for i in p.layers])
    except ValueError as exc:
        raise ConfigError(f"{NAME}: {exc}; choose them with --set layers=...") from exc
    tail = ft.Tail(hf, layers[0])

    def query_seqs(c: int, k: int) -> tuple[list[list[int]], list[tuple[int, ...]]]:
        """Context c's first k lines (k may be 0) followed by each query line: ids and answer tokens."""
        pr, seqs, answers = prompts[c], [], []
        for q in range(K, K + m):
            enc = scoring.encode(tok, example_prompt(p.task, [*pr.xs[:k], pr.xs[q]], [*pr.ys[:k], pr.ys[q]]))
            seqs.append(enc.ids)
            answers.append(enc.answer_tokens[-1])
        return seqs, answers

    def train_batch(c: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context c's first k lines, each its own sequence, and the target tokens of the loss."""
        encs = [scoring.encode(tok, example_prompt(p.task, [x], [y]))
                for x, y in zip(prompts[c].xs[:k], prompts[c].ys[:k])]
        ids = ft.pad([e.ids for e in encs], pad_id)
        targets = torch.zeros(ids.shape, dtype=torch.bool)
        for row, e in enumerate(encs):
            chosen = e.line_tokens[0] if p.loss == "line" else e.answer_tokens[0]
            targets[row, list(chosen)] = True
        return ids, targets

    nK, nL, nR = len(ks), len(lrs), len(record)
    start = time.perf_counter()
    hf.eval()
    # before any update: with no context and with each k
    base = [ft.score_answers(hf, *query_seqs(c, 0), pad_id) for c in range(C)]
    icl = [[ft.score_answers(hf, *query_seqs(c, k), pad_id) for c in range(C)] for k in ks]
    timing.record("icl_seconds", time.perf_counter() - start)

    icl_logp = np.array([[s.logp.numpy() for s in row] for row in icl])  # [k, C, m]
    icl_exact = np.array([[s.exact.numpy() for s in row] for row in icl])
    base_logp = np.array([s.logp.numpy() for s in base])  # [C, m]
    base_exact = np.array([s.exact.numpy() for s in base])
    gap0 = np.array([[ft.kl(icl[a][c].first, base[c].first).numpy() for c in range(C)] for a in range(nK)])
    ft_logp = np.full((nK, nL, nR, C, m), np.nan)
    ft_exact = np.zeros((nK, nL, nR, C, m), dtype=bool)
    gap = np.full((nK, nL, nR, C, m), np.nan)  # KL(in-context || fine-tuned), first answer token
    ft_base = np.full((nK, nL, nR, C, m), np.nan)  # KL(fine-tuned || no-context): how far it moved
    train_loss = np.full((nK, nL, nR + 1, C), np.nan)  # loss on the context lines after 0, record... steps

    start = time.perf_counter()
    runs = [(a, b, c) for a in range(nK) for b in range(nL) for c in range(C)]
    loss_slot = {0: 0} | {n: r + 1 for r, n in enumerate(record)}
    # below the first trained layer nothing changes: its output is computed once per batch
    queries = [query_seqs(c, 0) for c in range(C)]
    query_hidden = [tail.prefix(ft.pad(seqs, pad_id)) for seqs, _ in queries]
    batches = {(c, k): train_batch(c, k) for c in range(C) for k in ks}
    batch_hidden = {ck: tail.prefix(ids) for ck, (ids, _) in batches.items()}
    with ft.Subset(hf, layers) as subset:
        for a, b, c in tqdm(runs, desc=NAME, disable=not progress, leave=False):
            subset.restore()
            (ids, targets), hidden = batches[c, ks[a]], batch_hidden[c, ks[a]]
            seqs, answers = queries[c]
            opt = (torch.optim.Adam(subset.params, lr=lrs[b]) if p.optimizer == "adam"
                   else torch.optim.SGD(subset.params, lr=lrs[b]))
            for step in range(1, p.steps + 1):
                loss = ft.loss_from_logits(tail.logits(hidden), ids, targets)
                if step - 1 in loss_slot:  # the loss after step - 1 updates
                    train_loss[a, b, loss_slot[step - 1], c] = loss.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in record:
                    r = record.index(step)
                    with torch.no_grad():
                        if step == p.steps:
                            train_loss[a, b, r + 1, c] = ft.loss_from_logits(tail.logits(hidden), ids, targets).item()
                        s = ft.scores_from_logits(tail.logits(query_hidden[c]), seqs, answers)
                    ft_logp[a, b, r, c] = s.logp.numpy()
                    ft_exact[a, b, r, c] = s.exact.numpy()
                    gap[a, b, r, c] = ft.kl(icl[a][c].first, s.first).numpy()
                    ft_base[a, b, r, c] = ft.kl(s.first, base[c].first).numpy()
            del opt
        n_trained = subset.n_trained
    finetune_seconds = time.perf_counter() - start
    timing.record("finetune_seconds", finetune_seconds)
    timing.record("seconds_per_step", finetune_seconds / (len(runs) * p.steps))
    # the shared model must be exactly as it was: the trained subset equals its snapshot, bit for bit
    unchanged = subset.unchanged() and all(q.grad is None for q in subset.params)
    if not unchanged:
        raise RuntimeError("the model's weights were not restored after fine-tuning")

    arrays = {
        "ks": np.asarray(ks), "lrs": np.asarray(lrs), "record": np.asarray(record),
        "icl_logp": icl_logp.astype(np.float32), "icl_exact": icl_exact,
        "no_context_logp": base_logp.astype(np.float32), "no_context_exact": base_exact,
        "gap_no_update": gap0.astype(np.float32),
        "finetune_logp": ft_logp.astype(np.float32), "finetune_exact": ft_exact,
        "gap": gap.astype(np.float32), "finetune_moved": ft_base.astype(np.float32),
        "train_loss": train_loss.astype(np.float32),
        # means over contexts and queries
        "mean.icl_p": np.exp(icl_logp).mean(axis=(-1, -2)),
        "mean.no_context_p": np.asarray(np.exp(base_logp).mean()),
        "mean.finetune_p": np.exp(ft_logp).mean(axis=(-1, -2)),
        "mean.icl_exact": icl_exact.mean(axis=(-1, -2)), "mean.finetune_exact": ft_exact.mean(axis=(-1, -2)),
        "mean.gap": gap.mean(axis=(-1, -2)), "mean.gap_no_update": gap0.mean(axis=(-1, -2)),
    }
    best = {}
    for a, k in enumerate(ks):
        g = np.where(np.isfinite(arrays["mean.gap"][a]), arrays["mean.gap"][a], np.inf)
        b, r = np.unravel_index(np.argmin(g), g.shape)
        pf = arrays["mean.finetune_p"][a]
        b2, r2 = np.unravel_index(np.nanargmax(pf), pf.shape)
        best[str(k)] = {
            "lr": lrs[b], "steps": record[r], "gap": float(arrays["mean.gap"][a, b, r]),
            "gap_no_update": float(arrays["mean.gap_no_update"][a]),
            "finetune_p": float(pf[b, r]), "icl_p": float(arrays["mean.icl_p"][a]),
            "best_p": {"lr": lrs[b2], "steps": record[r2], "finetune_p": float(pf[b2, r2]),
                       "finetune_exact": float(arrays["mean.finetune_exact"][a, b2, r2]),
                       "gap": float(arrays["mean.gap"][a, b2, r2])},
        }
    data = {
        "model": loaded.spec.name,
        "task": p.task,
        "rule": tasks.get_task(p.task).rule,
        "n_params": int(sum(q.numel() for q in hf.parameters())),
        "n_layers": int(hf.config.num_hidden_layers),
        "trained_layers": layers,
        "n_trained": int(n_trained),
        "weights_restored": unchanged,
        "best": best,
        "threads": THREADS,
        "example_context": prompts[0].text[: prompts[0].line_spans[K - 1][1]],
        "params": json.loads(json.dumps(asdict(p))),
    }
    return arrays, data
