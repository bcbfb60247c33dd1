"""Function-vector heads (Todd et al. 2024), the function vector they make, and integer-ness under
head ablation.

1. Mean head outputs. For each task, every head's ``z`` at the query position (the space after the last
   comma), averaged over ``n_clean`` prompts of ``k`` examples.
2. Causal indirect effect (CIE). Prompts whose demonstrations have shuffled answers (the query's
   answer stays right) hold the format but not the rule. Writing one head's mean ``z`` over its ``z`` at
   the query position of such a prompt, how much does the whole-answer log-probability of the correct
   answer rise? Each patch changes nothing before its layer and position, so it is a restart over the
   query position and the answer's positions (:func:`icl.taskvec.run_from`) from the unpatched run's
   cached keys and values: all heads of a layer and all prompts of a batch at once. Heads are ranked
   by the CIE averaged over tasks and prompts; a one-sided t-test per head over (task, prompt) pairs
   with Benjamini-Hochberg control at ``fdr`` across all heads says which are different from zero.
3. Function vector. Per task, the sum of the ``n_top`` top heads' mean outputs (``z_h W_O^h``), added to
   the residual stream at the query position of zero-shot prompts (the query line alone), at every
   layer; ``fv_layer`` (default: a third of the depth, as Todd et al.) is the layer declared in
   advance. The zero-shot prompts are the clean prompts' query lines, and each one's function vector
   is built from the mean outputs over the *other* clean prompts (leave one out). Baseline: the same sum over ``n_random`` sets of heads drawn at random from the layers of
   the top heads (one per top head, same layer, another head).
4. Integer-ness. Prompts of ``k_ablate + 1`` examples; at every example's prediction position, the
   probability the model's output puts on number tokens and the whole-answer log-probability, with
   heads zero-ablated at every position: the top function-vector heads, the heads the source post names
   (for llama-3-8b its own names; for another model mapped to the same relative depth,
   :func:`icl.taskvec.map_heads`), and ``n_random`` layer-matched random sets for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as sstats

from icl import ablation, models, tasks, taskvec
from icl.experiments import TASKS, between, reporter, with_threads
from icl.lens import number_token_mask
from icl.runner import LlamaStack
from icl.stats import benjamini_hochberg, bootstrap_mean_ci

NAME = "function_vectors"
VERSION = 1
CHAPTER = "report/07-task-vectors.qmd"
USES_MODEL = True
DESCRIPTION = "causal indirect effect of every head, function vectors, number-token mass under head ablation"
THREADS = 1
SOURCE_MODEL = "llama-3-8b"  # the model whose heads the source post names


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...] = ("plus-1", "plus-10", "identity", "double")
    k: int = 10
    n_clean: int = 24
    n_corrupt: int = 8
    n_top: int = 10
    fv_layer: int = -1  # -1: n_layers // 3
    n_random: int = 2
    ablate_tasks: tuple[str, ...] = ("plus-1", "double")
    k_ablate: int = 12
    n_ablate: int = 8
    fdr: float = 0.05
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 8

    def validate(self) -> None:
        for name in self.tasks:
            tasks.get_task(name)
        if self.k < 2:
            raise ValueError("k must be at least 2 (shuffling needs two demonstrations)")
        if not set(self.ablate_tasks) <= set(self.tasks):
            raise ValueError("ablate_tasks must be among tasks")
        if self.n_clean < 3:
            raise ValueError("n_clean must be at least 3 (leave-one-out means)")


LIMITS = {"tasks": TASKS, "ablate_tasks": TASKS, "k": between(2, 60), "n_clean": between(3, 1000),
          "n_corrupt": between(2, 1000), "n_top": between(1, 100), "fv_layer": between(-1, 200),
          "n_random": between(1, 20), "k_ablate": between(1, 60), "n_ablate": between(2, 1000),
          "fdr": between(0.001, 0.5), "n_boot": between(20, 10_000), "batch_size": between(1, 256)}


def prompts_for(params: Params) -> dict[str, dict[str, list[tasks.Prompt]]]:
    params.validate()
    out = {}
    for name in params.tasks:
        clean = tasks.make_prompts(name, params.n_clean, params.k, params.seed + 3)
        corrupt = tasks.shuffle_answers(tasks.make_prompts(name, params.n_corrupt, params.k, params.seed + 4),
                                        params.seed, keep_last=True)
        out[name] = {"clean": clean, "corrupt": corrupt,
                     "zero": [tasks.prompt_from(p.task, p.xs[-1:], p.ys[-1:]) for p in clean]}
        if name in params.ablate_tasks:
            out[name]["ablate"] = tasks.make_prompts(name, params.n_ablate, params.k_ablate + 1, params.seed + 5)
    return out


def content_digest(params: Params) -> str:
    return tasks.sets_digest(prompts_for(params))


def named_heads(model: Any, n_layers: int, n_heads: int) -> tuple[list[tuple[int, int]], bool]:
    """The source post's heads in this model: its own names on llama-3-8b, else mapped by depth."""
    names = models.REGISTRY[SOURCE_MODEL].named_heads
    if model.spec.name == SOURCE_MODEL:
        return [tuple(int(v) for v in n[1:].split("H")) for n in names], False  # type: ignore[misc]
    shape = models.LLAMA3_SHAPES["8b"]
    return taskvec.map_heads(names, int(shape["num_hidden_layers"]), int(shape["num_attention_heads"]),
                             n_layers, n_heads), True


def matched_random(heads: list[tuple[int, int]], n_heads: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One random other head in the same layer for each head (distinct, never one of ``heads``)."""
    out: list[tuple[int, int]] = []
    for layer, _ in heads:
        taken = set(heads) | set(out)
        free = [h for h in range(n_heads) if (layer, h) not in taken]
        if free:
            out.append((layer, int(rng.choice(free))))
    return out


def _ci(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    return [float(v) for v in np.ravel(np.stack(bootstrap_mean_ci(np.asarray(values)[:, None], n_boot, seed=seed)))]


@torch.inference_mode()
def cie(stack: LlamaStack, pb: taskvec.PromptBatch, mean_z: torch.Tensor, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-answer log-probability of the query's answer in each prompt ``[n]`` and with each head's
    ``z`` at the query position replaced by ``mean_z`` ``[n_layers, n_heads, d_head]``: ``[n, n_layers,
    n_heads]``. Each patch is a restart over the suffix (:func:`icl.taskvec.restart`), all heads of a
    layer and all prompts of a batch at once."""
    L, H = stack.n_layers, stack.n_heads
    base = np.zeros(pb.n)
    out = np.zeros((pb.n, L, H))
    dev = stack.device
    for run in taskvec.suffix_runs(stack, pb, bs):
        R = len(run.rows)
        base[run.rows] = run.base
        prompt = torch.arange(R).repeat(H)  # restart rows: (head, prompt)
        head = torch.arange(H).repeat_interleave(R)
        rows_dev, head_dev = torch.arange(H * R, device=dev), head.to(dev)
        for layer in range(L):
            repl = mean_z[layer][head].to(dev, stack.dtype)  # [H * R, d_head]

            def edit(at: int, z: torch.Tensor, layer=layer, repl=repl):
                if at != layer:
                    return z
                z = z.clone()
                z[rows_dev, 0, head_dev] = repl
                return z

            lp = taskvec.restart(stack, run, layer, run.resid[layer][prompt], prompt, edit)
            out[run.rows, layer] = lp.reshape(H, R).T
    return base, out


@torch.inference_mode()
@with_threads
def compute(params: Params, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    say = reporter(NAME, progress)
    stack = LlamaStack(model.bridge)
    tok = model.tokenizer
    L, H = stack.n_layers, stack.n_heads
    bs = params.batch_size
    suite = prompts_for(params)
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {}
    fv_layer = L // 3 if params.fv_layer < 0 else min(params.fv_layer, L - 1)

    # 1-2. mean head outputs and the CIE of every head ---------------------------------------------
    mean_z: dict[str, torch.Tensor] = {}
    clean_z: dict[str, torch.Tensor] = {}
    clean_runs: dict[str, list[taskvec.SuffixRun]] = {}
    effects = []
    for t, name in enumerate(params.tasks, 1):
        say(f"task {t}/{len(params.tasks)} {name}: mean head outputs over {params.n_clean} prompts, then the "
            f"indirect effect of {L * H} heads on {params.n_corrupt} shuffled-label prompts")
        clean_runs[name] = taskvec.suffix_runs(stack, taskvec.encode_prompts(tok, suite[name]["clean"]), bs)
        clean_z[name] = torch.cat([run.z[:, :, 0].float().cpu() for run in clean_runs[name]], 1)  # [L, n, H, dh]
        mean_z[name] = clean_z[name].mean(1)
        base, patched = cie(stack, taskvec.encode_prompts(tok, suite[name]["corrupt"]), mean_z[name], bs)
        effect = patched - base[:, None, None]  # [n, L, H]
        effects.append(effect)
        arrays[f"{name}.cie.mean"] = effect.mean(0)
        arrays[f"{name}.logp_corrupt"] = base.astype(np.float32)
        summary[name] = {"logp_corrupt": _ci(base, params.n_boot, params.seed), "rule": tasks.get_task(name).rule}
    pooled = np.concatenate(effects, 0)  # [(task, prompt), L, H]
    m, lo, hi = bootstrap_mean_ci(pooled, n_boot=params.n_boot, seed=params.seed)
    arrays["cie.mean"], arrays["cie.lo"], arrays["cie.hi"] = m, lo, hi
    sd = pooled.std(0, ddof=1)
    tstat = m / np.maximum(sd / np.sqrt(len(pooled)), 1e-12)
    p_values = sstats.t.sf(tstat, df=len(pooled) - 1)
    rejected, adjusted = benjamini_hochberg(p_values, params.fdr)
    arrays["cie.p"], arrays["cie.p_adjusted"], arrays["cie.significant"] = p_values, adjusted, rejected
    order = np.argsort(-m, axis=None)
    top = [(int(i // H), int(i % H)) for i in order[: params.n_top]]
    ranked = [[int(i // H), int(i % H), float(m.flat[i]), float(lo.flat[i]), float(hi.flat[i]), float(adjusted.flat[i])]
              for i in order[: max(params.n_top, 10)]]

    # 3. function vectors into zero-shot prompts ---------------------------------------------------
    random_sets = [matched_random(top, H, rng) for _ in range(params.n_random)]
    fv_out: dict[str, Any] = {}
    for name in params.tasks:
        say(f"function vector of {name}: added at every layer of {params.n_clean} zero-shot prompts")
        loo = (clean_z[name].sum(1, keepdim=True) - clean_z[name]) / (clean_z[name].shape[1] - 1)  # [L, n, H, dh]

        def vector(heads: list[tuple[int, int]], loo=loo) -> torch.Tensor:
            """Per prompt, the sum of the heads' mean outputs over the other prompts: ``[n, d_model]``."""
            v = torch.zeros(loo.shape[1], stack.d_model)
            for layer, h in heads:
                v += taskvec.head_out(stack, layer, loo[layer][:, h][:, None])[:, 0].cpu()
            return v

        zero = taskvec.encode_prompts(tok, suite[name]["zero"])
        zero_runs = taskvec.suffix_runs(stack, zero, 4 * bs)
        logp0 = np.concatenate([run.base for run in zero_runs])
        logpk = np.concatenate([run.base for run in clean_runs[name]])
        fv = vector(top)
        sweep = taskvec.layer_sweep(stack, zero, fv[None].expand(L, -1, -1), mode="add", runs=zero_runs)  # [n, L]
        rand = np.concatenate([taskvec.layer_sweep(stack, zero, vector(hs)[None].expand(L, -1, -1), mode="add",
                                                   layers=[fv_layer], runs=zero_runs) for hs in random_sets], 1)
        gain = sweep - logp0[:, None]
        gm, glo, ghi = bootstrap_mean_ci(gain, n_boot=params.n_boot, seed=params.seed)
        arrays[f"{name}.fv_gain.mean"], arrays[f"{name}.fv_gain.lo"], arrays[f"{name}.fv_gain.hi"] = gm, glo, ghi
        arrays[f"{name}.fv_random_gain"] = (rand - logp0[:, None]).mean(0)
        arrays[f"{name}.logp_zero"], arrays[f"{name}.logp_kshot"] = logp0.astype(np.float32), logpk.astype(np.float32)
        k_adv = float(logpk.mean() - logp0.mean())
        fv_out[name] = {"gain_at_fv_layer": [float(gm[fv_layer]), float(glo[fv_layer]), float(ghi[fv_layer])],
                        "random_gain_at_fv_layer": [float(v) for v in (rand - logp0[:, None]).mean(0)],
                        "kshot_advantage": k_adv, "best_layer": int(np.argmax(gm)), "best_gain": float(gm.max()),
                        "fraction_at_fv_layer": float(gm[fv_layer] / k_adv) if k_adv else None,
                        "logp_zero": _ci(logp0, params.n_boot, params.seed),
                        "logp_kshot": _ci(logpk, params.n_boot, params.seed)}

    # 4. number-token mass with heads ablated -------------------------------------------------------
    named, mapped = named_heads(model, L, H)
    conditions: dict[str, list[tuple[int, int]]] = {"none": [], "fv_heads": top, "named_heads": named}
    for i in range(params.n_random):
        conditions[f"random_fv.{i}"] = matched_random(top, H, rng)
        conditions[f"random_named.{i}"] = matched_random(named, H, rng)
    numbers = number_token_mask(tok, stack.W_U.shape[0]).to(stack.device)
    K = params.k_ablate + 1
    ablate_out: dict[str, Any] = {}
    for name in params.ablate_tasks:
        say(f"integer-ness of {name}: {len(conditions)} ablation conditions on {params.n_ablate} prompts")
        pb = taskvec.encode_prompts(tok, suite[name]["ablate"])
        res = {}
        for cond, heads in conditions.items():
            mass = np.zeros((pb.n, K))
            logp = np.zeros((pb.n, K))
            edit = ablation.zero_heads_edit(heads) if heads else None
            for start in range(0, pb.n, bs):
                rows = list(range(start, min(pb.n, start + bs)))
                pos, tgt, valid = taskvec.answer_index(pb, rows, list(range(K)))
                final = taskvec.forward_final(stack, taskvec.padded(pb, rows), pos, z_edit=edit)  # [R, K, S, d]
                logp[rows] = taskvec.whole_answer_logp(stack, final, tgt, valid).numpy()
                mass[rows] = taskvec.number_mass(stack, final[:, :, 0], numbers).cpu().numpy()
            res[cond] = (mass, logp)
            arrays[f"{name}.ablate.{cond}.number_mass"] = mass.mean(0)
            arrays[f"{name}.ablate.{cond}.logp"] = logp.mean(0)
        base_mass, base_logp = res["none"]
        s = {}
        for cond in conditions:
            if cond == "none":
                continue
            dm = (res[cond][0] - base_mass)[:, 1:].mean(1)  # per prompt, examples with context
            dl = (res[cond][1] - base_logp)[:, 1:].mean(1)
            s[cond] = {"d_number_mass": _ci(dm, params.n_boot, params.seed), "d_logp": _ci(dl, params.n_boot, params.seed),
                       "d_number_mass_k0": float((res[cond][0] - base_mass)[:, 0].mean())}
        s["none"] = {"number_mass": _ci(base_mass[:, 1:].mean(1), params.n_boot, params.seed),
                     "number_mass_k0": float(base_mass[:, 0].mean()),
                     "logp": _ci(base_logp[:, 1:].mean(1), params.n_boot, params.seed)}
        ablate_out[name] = s

    data = {"model": model.spec.name, "n_layers": L, "n_heads": H, "k": params.k, "n_clean": params.n_clean,
            "n_corrupt": params.n_corrupt, "ablate_tasks": list(params.ablate_tasks), "n_top": params.n_top, "fv_layer": fv_layer,
            "fdr": params.fdr, "top_heads": ranked, "n_significant": int(rejected.sum()),
            "random_sets": [[list(h) for h in hs] for hs in random_sets], "tasks": summary, "fv": fv_out,
            "named_heads": [list(h) for h in named], "named_heads_mapped": mapped,
            "source_heads": list(models.REGISTRY[SOURCE_MODEL].named_heads),
            "conditions": {c: [list(h) for h in hs] for c, hs in conditions.items()}, "ablate": ablate_out,
            "k_ablate": params.k_ablate, "n_ablate": params.n_ablate}
    return arrays, data
