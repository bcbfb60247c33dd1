"""Induction heads tested causally: joint ablation against layer-matched random head sets, and the one
head whose ablation hurts y = x + 1 most, characterised.

The ``induction_heads`` experiment names the induction heads by their attention (prefix matching on
repeated random tokens). That they *attend* like induction heads does not say that the model *needs*
them. Here every induction head (prefix-matching score at least ``threshold``, read from that entry:
``DEPENDS``) is zero-ablated at every position, all at once, and three things are measured on the same
inputs with and without them:

1. the long-text ICL score of :mod:`icl.experiments.icl_score` (loss around token 500 minus loss around
   token 50, the same texts, windowing and averaging) on ``n_windows`` windows, one per document;
2. the loss on the second half of repeated random tokens (the sequences of ``induction_heads``,
   the first ``n_seqs`` of them), which induction heads are defined by;
3. the task curves of :mod:`icl.experiments.surprisal`: whole-answer teacher-forced surprisal of
   example ``i`` given the ``i - 1`` before it, for ``tasks`` (``n_prompts`` prompts of ``k`` examples).

The baseline is not "no ablation" but ablating as many other heads: ``n_random`` random sets *matched
by layer* (in each layer as many heads as the induction set has there, drawn from that layer's
non-induction heads), so a set is compared with sets that remove as much of the same layers. The
one-sided empirical p-value of a statistic is ``(1 + #{random sets at least as harmful}) / (n_random +
1)``; intervals resample windows, sequences or prompts (the unit of each measurement).

Zero ablation at every position is cheap to run many times because everything below the set's first
layer is shared (:func:`icl.ablation.joint_ablation_logprobs`): for SmolLM2 only the layers from the
first induction layer on run once per set.

4. The head named by ``head`` (the ``ablation`` experiment's most damaging head for y = x + 1; the
   chapter checks that the name still matches that entry) in the clean run of the task prompts, at
   the position that predicts the query's first answer token: where it attends (earlier answers' first
   tokens, their other tokens, earlier x's, the query's x, the first token, the rest; against the
   share of positions of each kind, which uniform attention would give), and what it writes: its
   output through the unembedding (:func:`icl.ablation.head_logits`), as the rank of the correct first
   answer token among the ten digits (chance 5.5), the digit it promotes most (compared with the
   correct digit and with the query's first x digit, which differ for 2x + 3), the tokens it promotes
   most on average, and its direct logit attribution to the correct token against every other head's
   (:func:`icl.ablation.direct_effects`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl import ablation, tasks, timing
from icl.experiments import TASKS, between, reporter, text, with_threads
from icl.experiments import icl_score as icl_score_exp
from icl.experiments import induction_heads as ih_exp
from icl.runner import LlamaStack
from icl.scoring import encode
from icl.stats import bootstrap_mean_ci

NAME = "induction_ablation"
VERSION = 1
CHAPTER = "report/06-induction-heads.qmd"
USES_MODEL = True
DESCRIPTION = "joint zero-ablation of the induction heads vs layer-matched random head sets; the top ablation head"
THREADS = 1
DEPENDS = ("induction_heads",)  # the prefix-matching scores that name the induction heads
BATCH_SIZE = 8


@dataclass(frozen=True)
class Params:
    threshold: float = 0.3  # prefix-matching score that makes a head an induction head (the chapter's rule)
    n_random: int = 20  # layer-matched random head sets
    n_windows: int = 6  # long-text windows, one per document
    n_seqs: int = 8  # repeated random sequences (the first of induction_heads' sequences)
    tasks: tuple[str, ...] = ("plus-1", "double-plus-3")
    n_prompts: int = 12
    k: int = 12
    late_from: int = 6  # task statistic: mean surprisal of examples late_from..k (1-based)
    head: str = "L23H0"  # the head characterised in step 4
    token_low: int = 1000  # repeated random tokens: ids token_low..token_high-1, as in induction_heads
    token_high: int = 20000
    seed: int = 0
    n_boot: int = 2000

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if not re.fullmatch(r"L\d+H\d+", self.head):
            raise ValueError(f"head must look like L23H0, got {self.head!r}")
        if not 1 <= self.late_from <= self.k:
            raise ValueError("need 1 <= late_from <= k")
        if self.n_windows < 2 or self.n_seqs < 2 or self.n_prompts < 2 or self.n_random < 1:
            raise ValueError("need n_windows, n_seqs, n_prompts >= 2 and n_random >= 1")


LIMITS = {"threshold": between(0.0, 1.0), "n_random": between(1, 1000), "n_windows": between(2, 256),
          "n_seqs": between(2, 1000), "tasks": TASKS, "n_prompts": between(2, 1000), "k": between(2, 99),
          "late_from": between(1, 99), "token_low": between(0, 1_000_000), "token_high": between(1, 1_000_000), "head": text("a head, LxHy (e.g. L23H0)"), "n_boot": between(20, 10_000)}


def parse_head(name: str) -> tuple[int, int]:
    layer, head = re.fullmatch(r"L(\d+)H(\d+)", name).groups()  # type: ignore[union-attr]
    return int(layer), int(head)


def icl_params(params: Params) -> icl_score_exp.Params:
    """The ICL score's windowing (window, early, late, halfwidth: its defaults), one window per document."""
    return icl_score_exp.Params(max_windows_per_doc=1, n_windows=params.n_windows, seed=params.seed)


def repeat_params(params: Params) -> ih_exp.Params:
    return ih_exp.Params(n_seqs=params.n_seqs, seed=params.seed, token_low=params.token_low,
                         token_high=params.token_high)


def prompts_for(params: Params) -> dict[str, list[tasks.Prompt]]:
    params.validate()
    return tasks.make_suite(params.tasks, params.n_prompts, params.k, params.seed)


def content_digest(params: Params) -> str:
    h = hashlib.sha256(icl_score_exp.content_digest(icl_params(params)).encode())
    h.update(ih_exp.random_tokens(repeat_params(params)).tobytes())
    h.update(tasks.suite_digest(prompts_for(params)).encode())
    return h.hexdigest()


def induction_set(prefix: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Heads ``(layer, head)`` whose prefix-matching score ``prefix`` ``[layer, head]`` is at least ``threshold``."""
    return [(int(layer), int(head)) for layer, head in np.argwhere(prefix >= threshold)]


def layer_matched_sets(chosen: list[tuple[int, int]], n_heads: int, n: int,
                       rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """``n`` distinct random head sets with as many heads in each layer as ``chosen``, drawn from the
    heads of that layer that are not in ``chosen`` (sorted; raises if there are fewer than ``n``)."""
    per_layer: dict[int, int] = {}
    for layer, _ in chosen:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    pools = {layer: [h for h in range(n_heads) if (layer, h) not in chosen] for layer in per_layer}
    for layer, m in per_layer.items():
        if len(pools[layer]) < m:
            raise ValueError(f"layer {layer} has only {len(pools[layer])} other heads for {m}")
    n_distinct = 1
    for layer, m in per_layer.items():
        n_distinct *= int(np.prod(range(len(pools[layer]) - m + 1, len(pools[layer]) + 1)) // np.prod(range(1, m + 1)))
    if n > n_distinct:
        raise ValueError(f"only {n_distinct} distinct layer-matched sets exist, asked for {n}")
    sets: list[list[tuple[int, int]]] = []
    while len(sets) < n:
        s = sorted((layer, int(h)) for layer in sorted(per_layer)
                   for h in rng.choice(pools[layer], size=per_layer[layer], replace=False))
        if s not in sets:
            sets.append(s)
    return sets


def p_harmful(induction: float, random: np.ndarray) -> float:
    """One-sided empirical p-value: how often a random set does at least as much harm (larger is more harm)."""
    return float((1 + int((random >= induction).sum())) / (len(random) + 1))


def _triple(values: np.ndarray, params: Params) -> list[float]:
    m, lo, hi = bootstrap_mean_ci(np.asarray(values, dtype=np.float64)[:, None], n_boot=params.n_boot, seed=params.seed)
    return [float(m[0]), float(lo[0]), float(hi[0])]


def _test(harm: np.ndarray, params: Params) -> dict[str, Any]:
    """``harm`` ``[n_sets, n_units]`` (row 0 clean, 1 the induction set, then the random sets), larger =
    more harm, already relative to the clean run. The induction set's harm with its interval, the random
    sets' harms, their mean with an interval (resampling units, the mean over sets per unit), the
    paired difference and the empirical p-value."""
    ind, rnd = harm[1], harm[2:]
    return {
        "induction": _triple(ind, params),
        "random_mean": _triple(rnd.mean(0), params),
        "induction_minus_random": _triple(ind - rnd.mean(0), params),
        "random": [float(v) for v in rnd.mean(1)],
        "p": p_harmful(float(ind.mean()), rnd.mean(1)),
    }


@torch.inference_mode()
@with_threads
def compute(params: Params, model: Any, progress: bool = False, upstream: dict[str, Any] | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    params.validate()
    torch.manual_seed(params.seed)
    say = reporter(NAME, progress)
    bridge, tok = model.bridge, model.tokenizer
    stack = LlamaStack(bridge)
    L, H = stack.n_layers, stack.n_heads
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if upstream is None or "induction_heads" not in upstream:
        raise ValueError(f"{NAME} analyses the induction_heads entry: pass upstream={{'induction_heads': entry}}")
    prefix = np.asarray(upstream["induction_heads"].arrays["prefix_matching"])  # [layer, head]
    if prefix.shape != (L, H):
        raise ValueError(f"induction_heads has scores for {prefix.shape} heads, the model has {(L, H)}")
    induction = induction_set(prefix, params.threshold)
    if not induction:
        raise ValueError(f"no head has a prefix-matching score of at least {params.threshold}")
    focus = parse_head(params.head)
    ablation.check_heads(stack, [focus])
    rng = np.random.default_rng(params.seed)
    random_sets = layer_matched_sets(induction, H, params.n_random, rng)
    head_sets = [[], induction, *random_sets]  # row 0 clean, row 1 the induction heads, then random sets
    n_sets = len(head_sets)
    arrays: dict[str, np.ndarray] = {"induction_set": np.array(induction, dtype=np.int16),
                                     "random_sets": np.array(random_sets, dtype=np.int16)}  # [n_random, n_ind, 2]
    data: dict[str, Any] = {"model": model.spec.name, "n_layers": L, "n_heads": H, "threshold": params.threshold,
                            "induction": [list(h) for h in induction], "n_random": params.n_random,
                            "head": params.head, "seed": params.seed}

    # 1. the long-text ICL score, late minus early, per window and head set
    ip = icl_params(params)
    with timing.timed("icl_score_seconds"):
        wins = icl_score_exp.windows(tok, ip)  # [n_windows] lists of ip.window ids
        hw = ip.halfwidth
        # the loss of 1-based token t is read at position t - 2 (as in icl_score), +- halfwidth
        read = [t - 2 + d for t in (ip.early, ip.late) for d in range(-hw, hw + 1)]
        early = np.zeros((n_sets, len(wins)))
        late = np.zeros((n_sets, len(wins)))
        for b in range(0, len(wins), BATCH_SIZE // 2):
            say(f"ICL score: windows {b + 1}-{min(len(wins), b + BATCH_SIZE // 2)} of {len(wins)}, {n_sets} head sets")
            batch = torch.tensor(wins[b:b + BATCH_SIZE // 2], dtype=torch.long)
            R = len(batch)
            rows = torch.arange(R).repeat_interleave(len(read))
            pos = torch.tensor(read).repeat(R)
            loss = -ablation.joint_ablation_logprobs(stack, batch, rows, pos, head_sets).reshape(n_sets, R, 2, -1)
            early[:, b:b + R], late[:, b:b + R] = loss[:, :, 0].mean(-1), loss[:, :, 1].mean(-1)
    score = late - early  # [n_sets, n_windows]
    arrays["icl.early"], arrays["icl.late"] = early, late
    data["icl"] = {"n_windows": len(wins), "window": ip.window, "early": ip.early, "late": ip.late,
                   "halfwidth": hw, "clean_score": _triple(score[0], params),
                   "induction_score": _triple(score[1], params),
                   "clean_early": _triple(early[0], params), "induction_early": _triple(early[1], params),
                   "test": _test(score - score[0], params)}  # harm: the score rises towards zero

    # 2. the loss on the second half of repeated random tokens
    with timing.timed("repeat_seconds"):
        rp = repeat_params(params)
        bos = list(tok("", add_special_tokens=True)["input_ids"])
        rep = torch.tensor(ih_exp.random_tokens(rp), dtype=torch.long)  # [n_seqs, 2 half]
        ids = torch.cat([torch.tensor([bos] * len(rep), dtype=torch.long).reshape(len(rep), len(bos)), rep], 1)
        second = list(range(len(bos) + rp.half, ids.shape[1] - 1))  # predicts tokens 2..half of the repeat
        rloss = np.zeros((n_sets, len(rep)))
        for b in range(0, len(rep), BATCH_SIZE):
            say(f"repeated tokens: sequences {b + 1}-{min(len(rep), b + BATCH_SIZE)} of {len(rep)}")
            batch = ids[b:b + BATCH_SIZE]
            R = len(batch)
            lp = ablation.joint_ablation_logprobs(stack, batch, torch.arange(R).repeat_interleave(len(second)),
                                                  torch.tensor(second).repeat(R), head_sets)
            rloss[:, b:b + R] = -lp.reshape(n_sets, R, -1).mean(-1)
    arrays["repeat.loss"] = rloss
    data["repeat"] = {"n_seqs": len(rep), "half": rp.half, "clean": _triple(rloss[0], params),
                      "induction": _triple(rloss[1], params), "test": _test(rloss - rloss[0], params)}

    # 3. task curves, and 4. the focus head in the clean run
    fl, fh = focus
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    data["tasks"], data["focus"] = {}, {}
    kinds = ("first_answer", "answer_rest", "earlier_x", "query_x_first", "query_x_rest", "first_token", "other")
    for name, prompts in prompts_for(params).items():
        enc = [encode(tok, p) for p in prompts]
        nats = np.zeros((n_sets, len(prompts), params.k))
        att = np.zeros((len(prompts), len(kinds)))  # attention mass per kind of position
        share = np.zeros((len(prompts), len(kinds)))  # share of positions per kind (uniform attention)
        correct_rank = np.zeros(len(prompts))
        top_digit = np.zeros(len(prompts), dtype=int)
        correct_digit = np.zeros(len(prompts), dtype=int)
        x_digit = np.zeros(len(prompts), dtype=int)
        mean_logits = torch.zeros(stack.W_U.shape[0])
        direct = np.zeros((len(prompts), L, H))
        with timing.timed(f"{name}_seconds"):
            for b in range(0, len(prompts), BATCH_SIZE):
                say(f"task {name}: prompts {b + 1}-{min(len(prompts), b + BATCH_SIZE)} of {len(prompts)}")
                chunk = enc[b:b + BATCH_SIZE]
                R = len(chunk)
                T = max(len(e.ids) for e in chunk)
                ids = torch.full((R, T), pad, dtype=torch.long)
                for r, e in enumerate(chunk):
                    ids[r, :len(e.ids)] = torch.tensor(e.ids)
                where = [(r, t - 1) for r, e in enumerate(chunk) for a in e.answer_tokens for t in a]
                qpos = torch.tensor([e.answer_tokens[-1][0] - 1 for e in chunk])  # predicts the query's answer
                seen: dict[str, Any] = {"z": {}}

                def record(layer, x, k, z, seen=seen):
                    if layer == L:  # the final residual: its RMSNorm scale at the answer position
                        xq = x[torch.arange(R), qpos].float()
                        seen["final_scale"] = torch.rsqrt(xq.pow(2).mean(-1, keepdim=True) + stack.eps)
                        return
                    seen["z"][layer] = z[torch.arange(R), qpos]  # [R, H, d_head] at the answer position
                    if layer == fl:
                        seen["pattern"] = ablation.query_pattern(stack, layer, fh, x, k, qpos)  # [R, T]

                lp = ablation.joint_ablation_logprobs(stack, ids, torch.tensor([w[0] for w in where]),
                                                      torch.tensor([w[1] for w in where]), head_sets, record=record)
                i = 0
                for r, e in enumerate(chunk):
                    for ex, a in enumerate(e.answer_tokens):
                        nats[:, b + r, ex] = -lp[:, i:i + len(a)].sum(1)
                        i += len(a)
                # the focus head at the answer position: where it looks ...
                pattern = seen["pattern"].cpu().numpy()
                for r, (e, p) in enumerate(zip(chunk, prompts[b:b + R])):
                    q = int(qpos[r])
                    kind = np.full(q + 1, len(kinds) - 1)
                    for ex in range(p.k):
                        ans = e.answer_tokens[ex]
                        xs = [t for t in e.line_tokens[ex] if t < ans[0] and tok.decode([e.ids[t]]).strip().isdigit()]
                        if ex < p.k - 1:
                            kind[list(ans)] = 1
                            kind[ans[0]] = 0
                            kind[xs] = 2
                        else:
                            kind[xs] = 4
                            kind[xs[:1]] = 3  # the query's first x digit (the answer's first digit for x + 1)
                    kind[0] = 5
                    for c in range(len(kinds)):
                        att[b + r, c] = pattern[r, :q + 1][kind == c].sum()
                        share[b + r, c] = (kind == c).mean()
                # ... and what it writes (its output through the unembedding, final norm scale frozen)
                z_all = torch.stack([seen["z"][layer] for layer in range(L)])  # [L, R, H, d_head]
                targets = torch.tensor([e.ids[e.answer_tokens[-1][0]] for e in chunk])
                final_scale = seen["final_scale"]  # [R, 1]
                direct[b:b + R] = ablation.direct_effects(stack, z_all, final_scale, targets)
                logits = ablation.head_logits(stack, fl, fh, z_all[fl][:, fh], final_scale).cpu()  # [R, vocab]
                mean_logits += logits.sum(0)
                dl = logits[:, digits].numpy()  # [R, 10]
                for r, p in enumerate(prompts[b:b + R]):
                    cd = int(str(p.ys[-1]).lstrip("-")[0])
                    correct_digit[b + r], x_digit[b + r] = cd, int(str(p.xs[-1])[0])
                    top_digit[b + r] = int(dl[r].argmax())
                    correct_rank[b + r] = 1 + int((dl[r] > dl[r, cd]).sum())
        late = nats[:, :, params.late_from - 1:].mean(-1)  # [n_sets, n_prompts]
        arrays[f"{name}.answer_nats"] = nats.astype(np.float32)
        m, lo, hi = bootstrap_mean_ci(nats[0], n_boot=params.n_boot, seed=params.seed)
        arrays[f"{name}.clean.mean"], arrays[f"{name}.clean.lo"], arrays[f"{name}.clean.hi"] = m, lo, hi
        m, lo, hi = bootstrap_mean_ci(nats[1], n_boot=params.n_boot, seed=params.seed)
        arrays[f"{name}.induction.mean"], arrays[f"{name}.induction.lo"], arrays[f"{name}.induction.hi"] = m, lo, hi
        arrays[f"{name}.random.mean"] = nats[2:].mean(1)  # [n_random, k]
        data["tasks"][name] = {"late_from": params.late_from, "clean_late": _triple(late[0], params),
                               "induction_late": _triple(late[1], params), "test": _test(late - late[0], params)}
        # the focus head
        arrays[f"{name}.focus.attention"] = att
        arrays[f"{name}.direct.mean"] = direct.mean(0)  # [L, H] direct logit attribution to the correct token
        mean_logits /= len(prompts)
        top = torch.topk(mean_logits, 10)
        rank_of_focus = 1 + int((direct.mean(0) > direct.mean(0)[fl, fh]).sum())
        data["focus"][name] = {
            "kinds": list(kinds),
            "attention": [_triple(att[:, c], params) for c in range(len(kinds))],
            "uniform": [float(v) for v in share.mean(0)],
            "correct_rank": _triple(correct_rank, params),  # among the ten digits; chance 5.5
            "top_is_correct": _triple((top_digit == correct_digit).astype(float), params),
            "top_is_x": _triple((top_digit == x_digit).astype(float), params),
            "correct_is_x": float((correct_digit == x_digit).mean()),
            "top_tokens": [[tok.decode([int(t)]), float(v)] for v, t in zip(top.values, top.indices)],
            "direct": _triple(direct[:, fl, fh], params),
            "direct_rank": rank_of_focus,  # among all heads, by mean direct effect on the correct token
            "direct_other_heads_mean": float(np.delete(direct.mean(0).ravel(), fl * H + fh).mean()),
            "direct_top": [[int(i // H), int(i % H), float(direct.mean(0).flat[i])]
                           for i in np.argsort(-direct.mean(0), axis=None)[:5]],
        }
    arrays["random_has_head"] = np.array([focus in s for s in random_sets])  # [n_random] the set holds `head`
    data["random_sets_with_head"] = int(arrays["random_has_head"].sum())
    return arrays, data



def passes(test: dict[str, Any], n_random: int) -> bool:
    """The declared test of one measure: the induction set does more harm than every random set (so
    its empirical p is the smallest possible, ``1 / (n_random + 1)``) and its interval lies above zero."""
    return test["p"] <= 1 / (n_random + 1) + 1e-12 and test["induction"][1] > 0


def verdict(data: dict[str, Any]) -> dict[str, Any]:
    """The declared decision rule applied to a result's ``data``: per measure whether it passes
    (``repeat`` is R, ``icl`` is S, each task is T) and the strong reading of C6: ``holds`` if S and T
    pass for every task, ``holds in part`` if R passes and at least one of S and the T's does, else
    ``fails``."""
    tests = {"repeat": data["repeat"]["test"], "icl": data["icl"]["test"],
             **{name: t["test"] for name, t in data["tasks"].items()}}
    ok = {m: passes(t, data["n_random"]) for m, t in tests.items()}
    n_tasks = sum(ok[name] for name in data["tasks"])
    if ok["icl"] and n_tasks == len(data["tasks"]):
        strong = "holds"
    elif ok["repeat"] and (ok["icl"] or n_tasks):
        strong = "holds in part"
    else:
        strong = "fails"
    return {"passes": ok, "strong": strong}
