"""Task vectors, the growth of the task direction with the number of examples, unit-digit probes and
the mass on number tokens, on the tasks plus-1, plus-10, identity, double and a shuffled-answer control.

1. Task vector (Hendel et al. 2023). Per task, the mean residual stream at the query position (the
   space after the last comma) over ``n_prompts`` prompts of ``k`` examples, per layer. Written over the
   residual stream of zero-shot prompts (each prompt's query line alone) at that layer and position
   (each prompt gets the mean over the *other* prompts: leave one out), it is scored by the
   whole-answer log-probability of the correct answer; the fraction of the k-shot advantage recovered
   is ``(m_patched - m_zero) / (m_kshot - m_zero)`` (ratio of means, 95% bootstrap intervals). The
   edited passes are restarts over the query position and the answer's tokens
   (:func:`icl.taskvec.layer_sweep`). Baseline: the shuffled-answer control's own
   mean vector, patched the same way. The task-vector layer is the layer with the largest recovered
   fraction averaged over the tasks. At that layer each task's vector is also written into prompts of
   another task (``k_cross`` examples): does the answer move to the patched task's rule?
2. Growth with k. Prompts of ``k_sweep + 1`` examples: one pass reads, at the prediction position of
   every example, the residual stream after ``0 .. k_sweep`` earlier examples. The task direction at
   each layer is the task's vector minus the control's, normalised; the projection of the residual on
   it, and the whole-answer log-odds, are fitted by a line and by a saturating exponential
   (:mod:`icl.growth`). At the task-vector layer the projection is split into the embedding, every
   earlier MLP and every earlier head (``z_h W_O^h``), each as a curve over k. The same pass records,
   per head, the attention from each answer's prediction position to the x of its own line (the
   post's "x-to-y" head).
3. Unit-digit probes. Ridge probes (:mod:`icl.probes`) for the answer's last digit, ``y mod 2``,
   ``y mod 5`` and, as a reference, the query's own last digit ``x mod 10``, from the residual stream at
   the prediction positions with at least ``probe_min_k`` earlier examples, on the additive tasks
   (plus-1, plus-10, identity: Hu et al.'s add-k setting), per layer, with a shuffled-label probe.
4. Number-token mass by the logit lens at the prediction position, every ``lens_every``-th layer and
   the output, for the numbers of earlier examples in ``lens_ks``.

The shuffled-answer control ``shuffled`` is made of ``control`` prompts whose answers are permuted
among the examples of each prompt (no answer stays with its own x, the query's included): the same
numbers, no rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


import numpy as np
import torch

from icl import growth, probes, tasks, taskvec
from icl.experiments import TASKS, between, each_int, reporter, with_threads
from icl.lens import number_token_mask
from icl.runner import LlamaStack
from icl.scoring import encode
from icl.stats import bootstrap_mean_ci, store_mean_ci

NAME = "task_vectors"
VERSION = 1
CHAPTER = "report/07-task-vectors.qmd"
USES_MODEL = True
DESCRIPTION = "task vectors per layer, growth of the task direction with k, unit-digit probes, number-token mass"
THREADS = 1
CONTROL = "shuffled"
ADDITIVE = ("plus-1", "plus-10", "identity")


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = ("plus-1", "plus-10", "identity", "double")
    control: str = "plus-1"
    k: int = 10
    n_prompts: int = 40
    k_sweep: int = 20
    n_sweep: int = 24
    k_cross: int = 5
    n_cross: int = 16
    probe_min_k: int = 4
    probe_lam: float = 1.0
    n_folds: int = 4
    lens_ks: tuple[int, ...] = (0, 1, 2, 5, 10, 20)
    lens_every: int = 3  # the logit lens reads every lens_every-th layer (and the output)
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 8

    def validate(self) -> None:
        for name in self.tasks + (self.control,):
            tasks.get_task(name)
        if len(self.tasks) < 2:
            raise ValueError("need at least two tasks (the cross-task test writes one task's vector into another's prompts)")
        if max(self.lens_ks) > self.k_sweep:
            raise ValueError("lens_ks must not exceed k_sweep")
        if self.probe_min_k > self.k_sweep:
            raise ValueError("probe_min_k must not exceed k_sweep")
        if self.n_folds > self.n_sweep:
            raise ValueError("n_folds must not exceed n_sweep")


LIMITS = {"tasks": TASKS, "control": TASKS, "k": between(1, 60), "n_prompts": between(3, 1000),
          "lens_every": between(1, 100), "k_sweep": between(3, 60), "n_sweep": between(4, 1000),
          "k_cross": between(1, 60), "n_cross": between(2, 1000), "probe_min_k": between(0, 60),
          "probe_lam": between(1e-4, 1e4), "n_folds": between(2, 20), "lens_ks": each_int(0, 60),
          "n_boot": between(20, 10_000), "batch_size": between(1, 256)}


def all_tasks(params: Params) -> tuple[str, ...]:
    return tuple(params.tasks) + (CONTROL,)


def _make(params: Params, name: str, n: int, k: int, seed: int) -> list[tasks.Prompt]:
    if name == CONTROL:
        return tasks.shuffle_answers(tasks.make_prompts(params.control, n, k, seed), params.seed, name=CONTROL)
    return tasks.make_prompts(name, n, k, seed)


def zero_shot(prompts: list[tasks.Prompt]) -> list[tasks.Prompt]:
    """The query line of each prompt alone, with its answer."""
    return [tasks.prompt_from(p.task, p.xs[-1:], p.ys[-1:]) for p in prompts]


def recipient(params: Params, name: str) -> str:
    """The task whose prompts receive ``name``'s vector in the cross-task test (the next in the list)."""
    i = params.tasks.index(name)
    return params.tasks[(i + 1) % len(params.tasks)]


def prompts_for(params: Params) -> dict[str, dict[str, list[tasks.Prompt]]]:
    params.validate()
    out: dict[str, dict[str, list[tasks.Prompt]]] = {}
    for name in all_tasks(params):
        pool = _make(params, name, params.n_prompts, params.k, params.seed)
        out[name] = {"kshot": pool, "zero": zero_shot(pool),
                     "sweep": _make(params, name, params.n_sweep, params.k_sweep + 1, params.seed + 1)}
    for name in params.tasks:
        other = recipient(params, name)
        base = tasks.make_prompts(other, params.n_cross, params.k_cross, params.seed + 2)
        rule = tasks.get_task(name)
        out[name]["cross_own"] = base  # the recipient's rule answers the query
        out[name]["cross_patched_rule"] = [
            tasks.prompt_from(other, p.xs, p.ys[:-1] + (int(rule.a * p.xs[-1] + rule.b),)) for p in base]
    return out


def content_digest(params: Params) -> str:
    return tasks.sets_digest(prompts_for(params))


def own_x_tokens(tokenizer, prompt: tasks.Prompt) -> list[list[int]]:
    """Per example, the token positions of its own x (the digits of the line before the answer)."""
    enc = encode(tokenizer, prompt)
    out = []
    for line, ans in zip(enc.line_tokens, enc.answer_tokens):
        out.append([t for t in line if t < ans[0] and tokenizer.decode([enc.ids[t]]).strip().isdigit()])
    return out


def log_odds(logp: np.ndarray) -> np.ndarray:
    """``log p - log(1 - p)`` of log-probabilities, clipped away from 0 and 1."""
    lp = np.clip(logp, -50.0, -1e-6)
    return lp - np.log(-np.expm1(lp))


@torch.inference_mode()
@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    say = reporter(NAME, progress)
    stack = LlamaStack(model.bridge)
    tok = model.tokenizer
    L, H = stack.n_layers, stack.n_heads
    bs = params.batch_size
    suite = prompts_for(params)
    names = all_tasks(params)
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}

    # 1. task vectors ---------------------------------------------------------------------------
    tv: dict[str, torch.Tensor] = {}
    loo: dict[str, torch.Tensor] = {}
    logp_k: dict[str, np.ndarray] = {}
    for name in names:
        say(f"task vector of {name}: {params.n_prompts} prompts of {params.k} examples")
        logp, resid = taskvec.answer_logp(stack, taskvec.encode_prompts(tok, suite[name]["kshot"]), batch_size=bs,
                                          residuals=True)
        logp_k[name] = logp[:, 0]
        tv[name] = resid.mean(1)  # [L + 1, d_model]
        loo[name] = taskvec.leave_one_out(resid)  # [L + 1, n, d_model]: each prompt's vector leaves it out
    for name in names:
        say(f"writing task vectors into zero-shot prompts of {name} at every layer")
        zero_pb = taskvec.encode_prompts(tok, suite[name]["zero"])
        runs = taskvec.suffix_runs(stack, zero_pb, 4 * bs)
        logp_0 = np.concatenate([run.base for run in runs])
        own = taskvec.layer_sweep(stack, zero_pb, loo[name][:L], runs=runs)  # [n, L]
        ctrl = taskvec.layer_sweep(stack, zero_pb, tv[CONTROL][:L], runs=runs) if name != CONTROL else None
        arrays[f"{name}.logp_kshot"] = logp_k[name].astype(np.float32)
        arrays[f"{name}.logp_zero"] = logp_0.astype(np.float32)
        arrays[f"{name}.logp_tv"] = own.astype(np.float32)
        s: dict[str, Any] = {
            "logp_kshot": [float(v) for v in np.ravel(np.stack(bootstrap_mean_ci(logp_k[name][:, None], params.n_boot,
                                                                                seed=params.seed)))],
            "logp_zero": [float(v) for v in np.ravel(np.stack(bootstrap_mean_ci(logp_0[:, None], params.n_boot,
                                                                               seed=params.seed)))],
        }
        store_mean_ci(arrays, f"{name}.tv_gain", own - logp_0[:, None], params.n_boot, params.seed)
        if name != CONTROL:
            arrays[f"{name}.logp_ctrl_tv"] = ctrl.astype(np.float32)
            m, lo, hi = taskvec.recovered_fraction(own, logp_k[name], logp_0, params.n_boot, params.seed)
            arrays[f"{name}.recovered.mean"], arrays[f"{name}.recovered.lo"], arrays[f"{name}.recovered.hi"] = m, lo, hi
            cm, clo, chi = taskvec.recovered_fraction(ctrl, logp_k[name], logp_0, params.n_boot, params.seed)
            arrays[f"{name}.ctrl_recovered.mean"], arrays[f"{name}.ctrl_recovered.lo"] = cm, clo
            arrays[f"{name}.ctrl_recovered.hi"] = chi
            store_mean_ci(arrays, f"{name}.ctrl_gain", ctrl - logp_0[:, None], params.n_boot, params.seed)
            best = int(np.argmax(m))
            s.update({"best_layer": best, "recovered_at_best": [float(m[best]), float(lo[best]), float(hi[best])],
                      "ctrl_recovered_at_best": [float(cm[best]), float(clo[best]), float(chi[best])],
                      "rule": tasks.get_task(name).rule})
        summary[name] = s
    mean_rec = np.mean([arrays[f"{n}.recovered.mean"] for n in params.tasks], axis=0)
    tv_layer = int(np.argmax(mean_rec))
    arrays["mean_recovered"] = mean_rec

    # cross-task: task A's vector into prompts of task B at the task-vector layer
    for name in params.tasks:
        say(f"cross-task: {name}'s vector into {recipient(params, name)} prompts at layer {tv_layer}")
        res = {}
        for tag in ("cross_own", "cross_patched_rule"):
            pb = taskvec.encode_prompts(tok, suite[name][tag])
            runs = taskvec.suffix_runs(stack, pb, bs)
            res[tag] = np.concatenate([run.base for run in runs])
            res[tag + ".patched"] = taskvec.layer_sweep(stack, pb, tv[name][:L], layers=[tv_layer], runs=runs)[:, 0]
        pref_before = res["cross_patched_rule"] - res["cross_own"]
        pref_after = res["cross_patched_rule.patched"] - res["cross_own.patched"]
        arrays[f"{name}.cross.pref_before"] = pref_before.astype(np.float32)
        arrays[f"{name}.cross.pref_after"] = pref_after.astype(np.float32)
        ci = lambda v: [float(x) for x in np.ravel(np.stack(bootstrap_mean_ci(v[:, None], params.n_boot, seed=params.seed)))]
        summary[name]["cross"] = {
            "recipient": recipient(params, name),
            "pref_before": ci(pref_before), "pref_after": ci(pref_after),
            "shift": ci(pref_after - pref_before),
            "wins_before": float((pref_before > 0).mean()), "wins_after": float((pref_after > 0).mean()),
        }

    # 2-4. one pass over prompts of k_sweep + 1 examples per task ----------------------------------
    numbers = number_token_mask(tok, stack.W_U.shape[0])
    K = params.k_sweep + 1
    ks = np.arange(K)
    lens_ks = list(params.lens_ks)
    lens_layers = sorted(set(range(0, L + 1, params.lens_every)) | {L})
    dirs = {}
    for name in params.tasks:
        d = tv[name] - tv[CONTROL]  # [L + 1, d_model]
        dirs[name] = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    probe_x: list[np.ndarray] = []  # per batch [L + 1, samples, d]
    probe_y: list[np.ndarray] = []
    probe_g: list[np.ndarray] = []
    growth_out: dict[str, Any] = {}
    for name in names:
        say(f"growth sweep for {name}: {params.n_sweep} prompts of {K} examples")
        pb = taskvec.encode_prompts(tok, suite[name]["sweep"])
        preds = pb.preds()
        n = pb.n
        proj = {t: np.zeros((n, L + 1, K)) for t in params.tasks}
        parts_head = np.zeros((n, tv_layer, H, K))
        parts_mlp = np.zeros((n, tv_layer, K))
        parts_embed = np.zeros((n, K))
        logp = np.zeros((n, K))
        mass = np.zeros((n, len(lens_layers), len(lens_ks)))
        to_own_x = np.zeros((n, L, H))  # attention from y's prediction position to the same line's x
        x_tokens = [own_x_tokens(tok, p) for p in suite[name]["sweep"]]
        own_dir = dirs[name] if name in dirs else None
        for start in range(0, n, bs):
            rows = list(range(start, min(n, start + bs)))
            R = len(rows)
            pos, tgt, valid = taskvec.answer_index(pb, rows, list(range(K)))
            tr = stack.forward(taskvec.padded(pb, rows), keep=preds[rows], logit_pos=pos.reshape(R, -1), keep_kv=True)
            x_mask = torch.zeros(R, K, tr.k.shape[3])
            for r, i in enumerate(rows):
                for j in range(1, K):  # examples with at least one before them
                    x_mask[r, j, x_tokens[i][j]] = 1.0
            for layer in range(L):
                pat = taskvec.attention_from(stack, layer, tr.resid_pre[layer], preds[rows], tr.k[layer])
                to_own_x[rows, layer] = (pat * x_mask[:, None].to(pat.device)).sum(-1)[..., 1:].mean(-1).cpu().numpy()
            lp = torch.log_softmax(tr.logits.float(), -1).reshape(*tgt.shape, -1)
            got = lp.gather(-1, tgt.to(lp.device)[..., None])[..., 0]
            logp[rows] = (got * valid.to(got.device)).double().sum(-1).cpu().numpy()
            del lp, got
            resid = tr.resid_pre.float()  # [L + 1, R, K, d]
            for t in params.tasks:
                proj[t][rows] = torch.einsum("lrkd,ld->rlk", resid, dirs[t].to(resid.device)).cpu().numpy()
            if own_dir is not None:
                u = own_dir[tv_layer].to(resid.device)
                parts_embed[rows] = (resid[0] @ u).cpu().numpy()
                for layer in range(tv_layer):
                    per_head = taskvec.head_out(stack, layer, tr.z[layer])  # [R, K, H, d]
                    parts_head[rows, layer] = (per_head @ u).permute(0, 2, 1).cpu().numpy()
                    parts_mlp[rows, layer] = (tr.mlp_out[layer].float() @ u).cpu().numpy()
            for j, layer in enumerate(lens_layers):
                mass[rows, j] = taskvec.number_mass(stack, tr.resid_pre[layer][:, lens_ks], numbers).cpu().numpy()
            if name in ADDITIVE:
                sel = ks[params.probe_min_k:]
                probe_x.append(resid[:, :, sel].reshape(L + 1, R * len(sel), -1).cpu().numpy().astype(np.float32))
                ys = np.array([[pb_y for pb_y in suite[name]["sweep"][i].ys] for i in rows])[:, sel].reshape(-1)
                xs = np.array([[v for v in suite[name]["sweep"][i].xs] for i in rows])[:, sel].reshape(-1)
                probe_y.append(np.stack([ys % 10, ys % 2, ys % 5, xs % 10], 1))
                probe_g.append(np.repeat(np.array(rows) + 10_000 * names.index(name), len(sel)))
        arrays[f"{name}.sweep.logp"] = logp.astype(np.float32)
        arrays[f"{name}.to_own_x"] = to_own_x.mean(0)  # [L, H]
        store_mean_ci(arrays, f"{name}.sweep.logp", logp, params.n_boot, params.seed)
        store_mean_ci(arrays, f"{name}.sweep.number_mass", mass, params.n_boot, params.seed)
        g: dict[str, Any] = {}
        for t in params.tasks:
            arrays[f"{name}.proj_on.{t}.mean"] = proj[t].mean(0)  # [L + 1, K]
            store_mean_ci(arrays, f"{name}.proj_on.{t}.at_tv", proj[t][:, tv_layer], params.n_boot, params.seed)
        if own_dir is not None:
            at = proj[name][:, tv_layer]  # [n, K]
            g["projection"] = growth.compare_shapes(ks, at, n_boot=params.n_boot // 2, seed=params.seed)
            g["log_odds"] = growth.compare_shapes(ks, log_odds(logp), n_boot=params.n_boot // 2, seed=params.seed)
            arrays[f"{name}.parts.head.mean"] = parts_head.mean(0)  # [tv_layer, H, K]
            arrays[f"{name}.parts.mlp.mean"] = parts_mlp.mean(0)  # [tv_layer, K]
            arrays[f"{name}.parts.embed.mean"] = parts_embed.mean(0)  # [K]
            # each head's growth: slope of a line over k >= 1 and the increment ratio, on the mean curve
            hm = parts_head.mean(0)
            slope = np.polyfit(ks[1:], hm[..., 1:].reshape(-1, K - 1).T, 1)[0].reshape(tv_layer, H)
            arrays[f"{name}.parts.head.slope"] = slope
            total_growth = at[:, -1].mean() - at[:, 1].mean()
            head_growth = hm[..., -1] - hm[..., 1]  # [tv_layer, H]
            order = np.argsort(-head_growth, axis=None)[:5]
            ratios = [growth.increment_ratio(hm.reshape(-1, K)[i, 1:]) for i in order]
            g["top_growing_heads"] = [[int(i // H), int(i % H), float(head_growth.flat[i]),
                                       r if np.isfinite(r) else None] for i, r in zip(order, ratios)]
            g["growth_1_to_max"] = float(total_growth)
            g["growth_heads_total"] = float(head_growth.sum())
            g["growth_mlps_total"] = float(parts_mlp.mean(0)[:, -1].sum() - parts_mlp.mean(0)[:, 1].sum())
        g["logp_first_last"] = [float(logp[:, 0].mean()), float(logp[:, -1].mean())]
        growth_out[name] = g

    # probes on the additive tasks, pooled --------------------------------------------------------
    probe_summary: dict[str, Any] = {}
    N = 0
    if probe_x:
        say("unit-digit probes at every layer")
        N = _probes(params, probe_x, probe_y, probe_g, L, arrays, probe_summary)

    data = {"model": model.spec.name, "n_layers": L, "n_heads": H, "k": params.k, "n_prompts": params.n_prompts, "k_sweep": params.k_sweep, "n_sweep": params.n_sweep,
            "tv_layer": tv_layer, "mean_recovered_at_tv": float(mean_rec[tv_layer]), "tasks": summary,
            "growth": growth_out, "probe": probe_summary, "probe_n": int(N), "probe_tasks": list(ADDITIVE),
            "lens_ks": lens_ks, "lens_layers": lens_layers, "control_of": params.control, "n_number_tokens": int(numbers.sum())}
    return arrays, data


def _probes(params: Params, probe_x: list[np.ndarray], probe_y: list[np.ndarray], probe_g: list[np.ndarray], L: int,
            arrays: dict[str, np.ndarray], probe_summary: dict[str, Any]) -> int:
    """Ridge probes per layer for the unit-digit targets, with a shuffled-label probe beside each."""
    X = np.concatenate(probe_x, 1)  # [L + 1, N, d]
    Y = np.concatenate(probe_y, 0)  # [N, 4]
    G = np.concatenate(probe_g, 0)
    rng = np.random.default_rng(params.seed)
    Y_shuf = Y[rng.permutation(len(Y))]
    labels = np.concatenate([Y, Y_shuf], 1)
    acc = np.stack([probes.ridge_probe_accuracy(X[layer], labels, G, params.n_folds, params.probe_lam)
                    for layer in range(L + 1)])  # [L + 1, 8]
    N = len(Y)
    half = 1.96 * np.sqrt(acc * (1 - acc) / N)
    targets = ["y_mod_10", "y_mod_2", "y_mod_5", "x_mod_10"]
    for j, t in enumerate(targets):
        arrays[f"probe.{t}.acc"], arrays[f"probe.{t}.lo"], arrays[f"probe.{t}.hi"] = acc[:, j], acc[:, j] - half[:, j], acc[:, j] + half[:, j]
        s_acc = acc[:, j + 4]
        arrays[f"probe.{t}.shuffled.acc"] = s_acc
        arrays[f"probe.{t}.shuffled.hi"] = s_acc + half[:, j + 4]
        above = (acc[:, j] - half[:, j]) > (s_acc + half[:, j + 4])
        arrays[f"probe.{t}.above"] = above
        best = int(np.argmax(acc[:, j]))
        majority = float(np.max(np.bincount(Y[:, j])) / N)
        probe_summary[t] = {"best_layer": best, "best_acc": [float(acc[best, j]), float(acc[best, j] - half[best, j]),
                                                             float(acc[best, j] + half[best, j])],
                            "shuffled_max": float(s_acc.max()), "n_layers_above": int(above.sum()),
                            "first_layer_above": int(np.argmax(above)) if above.any() else None,
                            "majority": majority, "chance": float(1 / len(np.unique(Y[:, j])))}
    return int(N)
