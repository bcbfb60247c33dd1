"""Benchmark: our restartable patching (icl.patching.fast_patch) against TransformerLens's own
``generic_activation_patch`` on the same layers x query-positions grid, in one run.

Run from the repository root:  python benchmarks/patching_speed.py [--pairs 16] [--task double-plus-3]

Both methods patch the same A activations (taken once through bridge hooks) into the same B runs, for
every layer and every query position and for each kind (resid_pre, attn_out, mlp_out); the script
prints the wall time of each, the ratio, and the largest absolute difference between the two grids of
log-probabilities. This is a benchmark, not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from icl import models, patching, tasks
from icl.config import Config
from icl.runner import LlamaStack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--task", default="double-plus-3")
    ap.add_argument("--kinds", default=",".join(patching.KINDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = models.load(Config.from_env(model=args.model))
    prompts = [p for p in tasks.make_prompts(args.task, 4 * args.pairs, args.k, seed=0) if p.xs[-1] >= 10]
    pairs = patching.make_pairs(loaded.tokenizer, prompts[: args.pairs])
    kinds = [k for k in args.kinds.split(",") if k]
    acts, _ = patching.a_activations(loaded.bridge, loaded.tokenizer, pairs, kinds)
    stack = LlamaStack(loaded.bridge)
    # warm up both paths once on a single cell
    patching.fast_patch(stack, pairs, acts, kinds[:1], layers=[0], positions=[0])
    patching.reference_patch(loaded.bridge, pairs, acts, kinds[0], layers=[0], positions=[0])

    t0 = time.perf_counter()
    ours = patching.fast_patch(stack, pairs, acts, kinds)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = {kind: patching.reference_patch(loaded.bridge, pairs, acts, kind) for kind in kinds}
    t_ref = time.perf_counter() - t0
    diff = max(float(np.abs(ours.logp[k] - ref[k]).max()) for k in kinds)
    cells = len(kinds) * stack.n_layers * pairs.q_len
    report = {
        "model": loaded.spec.name, "device": loaded.device, "threads": torch.get_num_threads(),
        "pairs": pairs.n, "cells": cells, "kinds": kinds,
        "transformer_lens_s": round(t_ref, 2), "ours_s": round(t_ours, 2),
        "speedup": round(t_ref / t_ours, 2), "max_abs_diff": diff, "equal_within_1e-4": diff <= 1e-4,
    }
    print(f"TransformerLens generic_activation_patch: {t_ref:.1f} s   ours: {t_ours:.1f} s   "
          f"ratio {t_ref / t_ours:.2f}x   max |diff| {diff:.2e} ({pairs.n} pairs, {cells} cells)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
