"""Contexts to weights on the pretrained model (chapter 9): Q1 for SmolLM2 on a rule it learns in context.

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

Held-out selection. The learning rate and the number of steps are hyperparameters, and choosing them
on the contexts that are then reported flatters fine-tuning. So the contexts are split: the sweep over
``lrs`` x steps runs on the first ``n_select`` contexts only (the *selection set*), and two settings are
chosen there for each ``k``: the one whose prediction is closest to the in-context one (least KL) and
the one that gives the correct answer the most probability. Only those settings are then run on the
other contexts (the *report set*), and every reported number comes from them.

Specificity control. Fine-tuning on anything shaped like the prompt's lines might move the model
towards the in-context prediction (it learns the format, or "add a number"). The control fine-tunes,
with the same chosen settings, on the same context ``x`` values but the answers of another rule
(``control_task``, default ``y = x + 10``), and is scored against *this* rule: its KL to the in-context
prediction and its probability of this rule's answer are the chance level for "the information of the
context moved into the weights".

What the restriction to a band of MLPs means for the question: whatever it reproduces, full
fine-tuning can reproduce as well (it may leave the other weights alone), so the fine-tuned predictions
here are one point inside what a weight update can do, and a gap measured here is an upper bound on
the gap of the best full update with the same optimizer and schedule.

Measured on the query's answer (digits and ``")"``): the probability of the whole correct answer
(teacher-forced), whether greedy decoding writes it, and the KL divergence over the answer's first token
``KL(in-context || fine-tuned)``, with the no-context prediction before any step as the baseline.
Intervals are percentile bootstraps over the report set's contexts (the queries of one context share
its fine-tuned model, so they are not independent).
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
from icl.experiments import TASKS, between, each_float, each_int, one_of, with_threads
from icl.stats import bootstrap_mean_ci

NAME = "c2w_pretrained"
VERSION = 3
CHAPTER = "report/09-contexts-to-weights.qmd"
USES_MODEL = True
DESCRIPTION = "pretrained model: in-context prediction vs fine-tuning on the context lines (Q1), held-out selection, control rule"
THREADS = 1
CHOICES = ("closest", "most_accurate")  # the two settings chosen on the selection set, per k


@dataclass(frozen=True)
class Params:
    seed: int = 0
    task: str = "plus-1"
    control_task: str = "plus-10"
    ks: tuple[str, ...] = ("2", "5")
    lrs: tuple[str, ...] = ("0.0001", "0.0003", "0.001")
    optimizer: str = "adam"
    steps: int = 10
    record: tuple[str, ...] = ("1", "2", "3", "5", "10")
    n_contexts: int = 12
    n_select: int = 4
    n_query: int = 12
    loss: str = "line"
    layers: tuple[str, ...] = ("14", "15")  # the MLPs of these layers are trained (negative: from the end)
    n_boot: int = 2000

    def validate(self) -> None:
        task = tasks.get_task(self.task)
        control = tasks.get_task(self.control_task)
        if task.random_rule or control.random_rule:
            raise ValueError("Q1 needs a rule the model can learn; the random rule has none")
        if (control.a, control.b) == (task.a, task.b):
            raise ValueError("the control rule must differ from the task's rule")
        if not all(int(k) >= 1 for k in self.ks) or self.n_query < 1:
            raise ValueError("need every k >= 1 and n_query >= 1")
        if not 1 <= self.n_select <= self.n_contexts - 2:
            raise ValueError("need 1 <= n_select <= n_contexts - 2: some contexts select, at least two report")
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


LIMITS = {"task": TASKS, "control_task": TASKS, "ks": each_int(1, 90), "lrs": each_float(1e-8, 1.0),
          "optimizer": one_of("adam", "sgd"), "steps": between(1, 1000), "record": each_int(1, 1000),
          "n_contexts": between(3, 100), "n_select": between(1, 99), "n_query": between(1, 90),
          "loss": one_of("line", "answer"), "layers": each_int(-200, 199), "n_boot": between(20, 10_000)}
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



def choose_settings(gap: np.ndarray, p_correct: np.ndarray) -> dict[str, tuple[int, int]]:
    """The two settings chosen on the selection set, as ``(lr index, record index)``: ``closest``, the
    least mean KL to the in-context prediction, and ``most_accurate``, the largest mean probability of the
    correct answer. ``gap``, ``p_correct``: ``[lr, recorded step]`` means over the selection set (NaN:
    diverged, never chosen). Ties go to the smaller learning rate, then the fewer steps."""
    g = np.where(np.isfinite(gap), gap, np.inf)
    q = np.where(np.isfinite(p_correct), p_correct, -np.inf)
    closest = np.unravel_index(int(np.argmin(g)), g.shape)
    accurate = np.unravel_index(int(np.argmax(q)), q.shape)
    return {"closest": (int(closest[0]), int(closest[1])), "most_accurate": (int(accurate[0]), int(accurate[1]))}


@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    return _compute(params, model, progress)


def _ci(values: np.ndarray, p: Params) -> list[float]:
    """Mean over contexts (axis 0) with a bootstrap interval: ``[mean, low, high]``."""
    mean, lo, hi = bootstrap_mean_ci(values, n_boot=p.n_boot, seed=p.seed)
    return [float(mean), float(lo), float(hi)]


def _compute(p: Params, loaded: Any, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    hf = loaded.bridge.original_model  # the Hugging Face model the bridge wraps (same parameters)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ks, lrs, record = [int(k) for k in p.ks], [float(x) for x in p.lrs], [int(n) for n in p.record]
    K, C, m, S = max(ks), p.n_contexts, p.n_query, p.n_select
    R = C - S
    prompts = prompts_for(p)
    control = tasks.get_task(p.control_task)
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

    def train_batch(c: int, k: int, use_control: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Context c's first k lines (with the control rule's answers if asked), each its own sequence,
        and the target tokens of the loss."""
        xs = list(prompts[c].xs[:k])
        ys = [int(y) for y in control.answers(np.asarray(xs), np.random.default_rng(0))] if use_control \
            else list(prompts[c].ys[:k])
        encs = [scoring.encode(tok, example_prompt(p.task, [x], [y])) for x, y in zip(xs, ys)]
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

    # below the first trained layer nothing changes: its output is computed once per batch
    queries = [query_seqs(c, 0) for c in range(C)]
    query_hidden = [tail.prefix(ft.pad(seqs, pad_id)) for seqs, _ in queries]
    batches: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    n_steps_run = 0

    def finetune(subset: ft.Subset, a: int, lr: float, c: int, n_max: int, use_control: bool) -> dict[str, np.ndarray]:
        """One run from the pretrained weights: up to ``n_max`` steps, scored at every recorded step <= n_max.
        Returns ``[recorded step, query]`` arrays (NaN / False past n_max) and the training loss."""
        nonlocal n_steps_run
        key = (c, ks[a], use_control)
        if key not in batches:
            ids, targets = train_batch(c, ks[a], use_control)
            batches[key] = (ids, targets, tail.prefix(ids))
        ids, targets, hidden = batches[key]
        seqs, answers = queries[c]
        out = {"logp": np.full((nR, m), np.nan), "exact": np.zeros((nR, m), dtype=bool),
               "gap": np.full((nR, m), np.nan), "moved": np.full((nR, m), np.nan), "loss": np.full(nR + 1, np.nan)}
        subset.restore()
        opt = (torch.optim.Adam(subset.params, lr=lr) if p.optimizer == "adam"
               else torch.optim.SGD(subset.params, lr=lr))
        for step in range(1, n_max + 1):
            loss = ft.loss_from_logits(tail.logits(hidden), ids, targets)
            if step == 1:
                out["loss"][0] = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_steps_run += 1
            if step in record:
                r = record.index(step)
                with torch.no_grad():
                    out["loss"][r + 1] = ft.loss_from_logits(tail.logits(hidden), ids, targets).item()
                    s = ft.scores_from_logits(tail.logits(query_hidden[c]), seqs, answers)
                out["logp"][r] = s.logp.numpy()
                out["exact"][r] = s.exact.numpy()
                out["gap"][r] = ft.kl(icl[a][c].first, s.first).numpy()
                out["moved"][r] = ft.kl(s.first, base[c].first).numpy()
        del opt
        return out

    sel = {name: np.full((nK, nL, nR, S, m), np.nan) for name in ("logp", "gap", "moved")}
    sel["exact"] = np.zeros((nK, nL, nR, S, m), dtype=bool)
    sel_loss = np.full((nK, nL, nR + 1, S), np.nan)
    rep = {src: {name: np.full((nK, len(CHOICES), R, m), np.nan) for name in ("logp", "gap", "moved")}
           for src in ("finetune", "control")}
    for src in rep:
        rep[src]["exact"] = np.zeros((nK, len(CHOICES), R, m), dtype=bool)
    chosen: dict[int, dict[str, tuple[int, int]]] = {}
    start = time.perf_counter()
    with ft.Subset(hf, layers) as subset:
        # 1. the sweep, on the selection set only
        runs = [(a, b, c) for a in range(nK) for b in range(nL) for c in range(S)]
        for a, b, c in tqdm(runs, desc=f"{NAME} selection", disable=not progress, leave=False):
            out = finetune(subset, a, lrs[b], c, p.steps, False)
            for name in ("logp", "gap", "moved", "exact"):
                sel[name][a, b, :, c] = out[name]
            sel_loss[a, b, :, c] = out["loss"]
        # 2. the chosen settings, on the report set, trained on this rule's lines and on the control rule's
        sel_p = np.exp(sel["logp"]).mean(axis=(-1, -2))  # [k, lr, n]
        sel_gap = sel["gap"].mean(axis=(-1, -2))
        jobs = []
        for a in range(nK):
            chosen[a] = choose_settings(sel_gap[a], sel_p[a])
            for b in sorted({b for b, _ in chosen[a].values()}):
                n_max = max(record[r] for bb, r in chosen[a].values() if bb == b)
                jobs += [(a, b, c, n_max, src) for src in ("finetune", "control") for c in range(S, C)]
        for a, b, c, n_max, src in tqdm(jobs, desc=f"{NAME} report", disable=not progress, leave=False):
            out = finetune(subset, a, lrs[b], c, n_max, src == "control")
            for i, choice in enumerate(CHOICES):
                bb, r = chosen[a][choice]
                if bb == b:
                    for name in ("logp", "gap", "moved", "exact"):
                        rep[src][name][a, i, c - S] = out[name][r]
        n_trained = subset.n_trained
    finetune_seconds = time.perf_counter() - start
    timing.record("finetune_seconds", finetune_seconds)
    timing.record("seconds_per_step", finetune_seconds / max(1, n_steps_run))
    # the shared model must be exactly as it was: the trained subset equals its snapshot, bit for bit
    unchanged = subset.unchanged() and all(q.grad is None for q in subset.params)
    if not unchanged:
        raise RuntimeError("the model's weights were not restored after fine-tuning")

    arrays: dict[str, np.ndarray] = {
        "ks": np.asarray(ks), "lrs": np.asarray(lrs), "record": np.asarray(record),
        "icl_logp": icl_logp.astype(np.float32), "icl_exact": icl_exact,
        "no_context_logp": base_logp.astype(np.float32), "no_context_exact": base_exact,
        "gap_no_update": gap0.astype(np.float32),
        # the sweep on the selection set: [k, lr, recorded step, context, query]
        "select.finetune_logp": sel["logp"].astype(np.float32), "select.finetune_exact": sel["exact"],
        "select.gap": sel["gap"].astype(np.float32), "select.finetune_moved": sel["moved"].astype(np.float32),
        "select.train_loss": sel_loss.astype(np.float32),
        # its means over the selection set's contexts and queries
        "select.mean.finetune_p": sel_p, "select.mean.gap": sel_gap,
        "select.mean.icl_p": np.exp(icl_logp[:, :S]).mean(axis=(-1, -2)),
        "select.mean.no_context_p": np.asarray(np.exp(base_logp[:S]).mean()),
        "select.mean.gap_no_update": gap0[:, :S].mean(axis=(-1, -2)),
    }
    # the chosen settings on the report set: [k, choice, context, query]
    for src in ("finetune", "control"):
        arrays[f"report.{src}_logp"] = rep[src]["logp"].astype(np.float32)
        arrays[f"report.{src}_exact"] = rep[src]["exact"]
        arrays[f"report.{src}_gap"] = rep[src]["gap"].astype(np.float32)
        arrays[f"report.{src}_moved"] = rep[src]["moved"].astype(np.float32)

    per_c = lambda x: np.asarray(x, dtype=np.float64).mean(axis=-1)  # mean over queries: one value per context
    report: dict[str, Any] = {}
    for a, k in enumerate(ks):
        entry: dict[str, Any] = {
            "icl_p": _ci(per_c(np.exp(icl_logp[a, S:])), p), "icl_exact": _ci(per_c(icl_exact[a, S:]), p),
            "no_context_p": _ci(per_c(np.exp(base_logp[S:])), p),
            "no_context_exact": _ci(per_c(base_exact[S:]), p),
            "gap_no_update": _ci(per_c(gap0[a, S:]), p),
        }
        for i, choice in enumerate(CHOICES):
            b, r = chosen[a][choice]
            f_p, c_p = np.exp(rep["finetune"]["logp"][a, i]), np.exp(rep["control"]["logp"][a, i])  # [R, m]
            f_g, c_g = rep["finetune"]["gap"][a, i], rep["control"]["gap"][a, i]
            entry[choice] = {
                "lr": lrs[b], "steps": record[r],
                "select_gap": float(sel_gap[a, b, r]), "select_finetune_p": float(sel_p[a, b, r]),
                "finetune_p": _ci(per_c(f_p), p), "finetune_exact": _ci(per_c(rep["finetune"]["exact"][a, i]), p),
                "gap": _ci(per_c(f_g), p), "left": _ci(per_c(f_g) / per_c(gap0[a, S:]), p),
                "control_p": _ci(per_c(c_p), p), "control_exact": _ci(per_c(rep["control"]["exact"][a, i]), p),
                "control_gap": _ci(per_c(c_g), p),
                "gap_diff": _ci(per_c(c_g) - per_c(f_g), p), "p_diff": _ci(per_c(f_p) - per_c(c_p), p),
                "p_vs_icl": _ci(per_c(f_p) - per_c(np.exp(icl_logp[a, S:])), p),
            }
        report[str(k)] = entry
    data = {
        "model": loaded.spec.name,
        "task": p.task,
        "rule": tasks.get_task(p.task).rule,
        "control_rule": control.rule,
        "n_params": int(sum(q.numel() for q in hf.parameters())),
        "n_layers": int(hf.config.num_hidden_layers),
        "trained_layers": layers,
        "n_trained": int(n_trained),
        "n_steps_run": int(n_steps_run),
        "weights_restored": unchanged,
        "report": report,
        "n_report": R,
        "threads": THREADS,
        "example_context": prompts[0].text[: prompts[0].line_spans[K - 1][1]],
        "params": json.loads(json.dumps(asdict(p))),
    }
    return arrays, data
