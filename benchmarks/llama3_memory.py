"""Benchmark: memory and compute of every model experiment at Meta-Llama-3-8B's shape, against one 24 GB GPU.

Run from the repository root (about 20 minutes and 12 GB of RAM on 2 cores; ``--tiny``: a minute):

    python benchmarks/llama3_memory.py [--layers 2,4] [--tiny] [--out benchmarks/results/llama3_memory.json]

1. It writes a random checkpoint with Meta-Llama-3-8B's config (width 4,096, 32 query / 8 KV heads,
   d_mlp 14,336, vocabulary 128,256, rope base 500,000, untied embeddings; bf16 safetensors shards and
   the real Llama-3 tokenizer) into a temporary folder: parameters are created on the meta device and
   materialised one shard at a time, so writing never holds more than a shard. It loads through the
   project's own path (``ICL_MODEL=<folder>``, ``cpu``, ``bfloat16``), exactly as a downloaded folder.
   Depth is the one thing cut: the checkpoint has ``--layers`` layers (default 2 and 4; ``--layers 32``
   is the full model and needs about 24 GB of RAM), because 16 GB of weights do not leave room for the
   experiments on a 23 GB machine shared with other work.
2. Each experiment runs in its own subprocess with small parameters that keep the shape of one batch of
   the default run (its ``k``, batch size, window) and cut only the number of batches; the cache goes to
   a temporary folder. The subprocess loads the model, records its resident memory, resets the kernel's
   peak-RSS counter (``/proc/self/clear_refs``), runs the experiment and reads the peak (``VmHWM``;
   the memory-mapped weights are read once before, so that all of them count as resident):
   *activations* = peak - resident after loading, everything the experiment adds to the weights. It
   counts the floating-point operations that were executed (``torch.utils.flop_counter``, matmuls and
   attention, forward and backward).
3. Projection to the full model at default parameters, from the measurements only: activations and
   FLOPs are fitted as ``a + b * layers`` over the depths run (a per-layer part and a part for the
   embedding and the 128,256-wide readout) and evaluated at 32 layers. Where the default run holds
   more in memory at once than one small batch (``patching`` and ``ablation`` batch all their pairs
   together), the experiment also runs with twice the pairs and the per-pair increase is scaled to the
   default number of pairs. FLOPs scale with the number of batches (``units``). GPU need = the 32-layer
   model's bf16 weights (from its parameter count) + projected activations; ``c2w_pretrained`` trains
   one MLP here (the default band's two need layers 14 and 15) and its projection replaces that MLP's
   measured state by :func:`icl.experiments.c2w_pretrained.llama3_8b_memory` for the default band.
   GPU time = projected FLOPs / (peak bf16 rate x utilisation), both stated below; it ignores the
   memory-bandwidth floor of small batches (each forward pass reads all 16 GB of weights).

This is a benchmark, not a test: it prints a table and writes it as JSON for Appendix B.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
BUDGET_GIB = 24.0
GPU = {"name": "NVIDIA A10 (24 GB)", "peak_bf16_tflops": 125.0, "utilisation": 0.3}

# Small parameters per experiment ("--set" strings) and the number of work units (batches, steps) that
# the default run does per unit done here. "pairs": the parameter whose value is doubled to measure the
# per-pair memory of experiments that batch all pairs at once, and its default.
SMALL: dict[str, dict] = {
    # c2w_pretrained: the default run takes 560 fine-tuning steps (selection sweep, then the chosen settings
    # and the control on the report set); this one 10 (2 selection steps, 2 x 2 report and 2 x 2 control)
    "c2w_pretrained": {"set": {"ks": "2", "lrs": "0.0003", "n_contexts": "3", "n_select": "1", "n_query": "12",
                               "steps": "2", "record": "2", "layers": "-1"}, "units": 560 / 10},
    "patching": {"set": {"tasks": "plus-1", "n_pairs": "2", "n_boot": "20"}, "units": 2 * 50 / 2,
                 "pairs": ("n_pairs", 50)},
    "logit_lens": {"set": {"tasks": "plus-1", "n_prompts": "8", "n_boot": "20"}, "units": 3 * 60 / 8},
    # ablation runs its per-head restarts 8 prompts at a time (ablation.a_runs' batch): measured at 8 and
    # 16 pairs, the per-pair increase is what really grows with the pairs (caches, the patching grid), not
    # a batch that stops growing at 8
    "ablation": {"set": {"tasks": "plus-1", "n_pairs": "8", "iterations": "1", "n_boot": "20"},
                 "units": 2 * 50 * 2 / 8, "pairs": ("n_pairs", 50)},
    "surprisal": {"set": {"tasks": "plus-1", "n_prompts": "8", "n_boot": "20"}, "units": 6 * 100 / 8},
    "induction_heads": {"set": {"n_seqs": "8", "tasks": "plus-1", "n_prompts": "8", "n_boot": "20"},
                        "units": (50 + 3 * 50) / (8 + 8)},
    "icl_score": {"set": {"n_windows": "4", "n_boot": "20"}, "units": 128 / 4},
    # batch_size stays at its default (8), so one batch has the default run's shape
    "task_vectors": {"set": {"tasks": "plus-1,identity", "control": "plus-1", "n_prompts": "8", "n_sweep": "8",
                             "n_cross": "8", "n_boot": "20"}, "units": 4 * (40 + 24 + 16) / (2 * (8 + 8 + 8))},
    "function_vectors": {"set": {"tasks": "plus-1,double", "n_clean": "8", "n_corrupt": "8", "n_random": "1",
                                 "n_ablate": "8", "n_boot": "20"},
                         "units": (4 * (24 + 8) + 2 * 8 * 3) / (2 * (8 + 8) + 2 * 8 * 2)},
}
# Model experiments this script does not project, and why; benchmarks/llama3_gpu.py measures them.
NOT_PROJECTED = {
    "induction_ablation": "it reads induction_heads' default entry (itself a full run here) and needs heads "
                          "above its prefix-matching threshold, which a random model lacks",
}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2)


def write_checkpoint(folder: Path, layers: int, tiny: bool, shard_bytes: int = 2 * GIB, device: str = "cpu") -> int:
    """Meta-Llama-3-8B's config with ``layers`` layers, random bf16 weights, one shard at a time
    (drawn on ``device``: a GPU draws 8 billion normals in a second, a CPU in about a minute)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from icl import models

    tok = models.llama3_tokenizer()
    dims = dict(models.LLAMA3_SHAPES["8b"]) | (TINY_SHAPE if tiny else {}) | {"num_hidden_layers": layers}
    config = LlamaConfig(**dims, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    shards, current, size, index, total = [], {}, 0, {}, 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            index.update({k: name for k in current})
            current, size = {}, 0

    for name, p in meta.named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        current[name] = t
        size += t.numel() * 2
        total += t.numel()
        if size >= shard_bytes:
            flush()
    flush()
    n = len(shards)
    renamed = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": {k: renamed[v] for k, v in index.items()}}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(name: str, folder: str, sets: list[str]) -> None:
    """Run one experiment on the checkpoint and print a JSON line of its measurements."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from icl import experiments, models
    from icl.config import Config

    config = Config.from_env(model=folder, device="cpu", dtype="bfloat16", cache_mode="refresh")
    t0 = time.perf_counter()
    loaded = models.load(config)
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # safetensors are memory-mapped: read every weight once so that all are resident
        for p in loaded.bridge.original_model.parameters():
            p.sum()
    resident = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    module = experiments.get(name)
    params = experiments.make_params(module, dict(s.split("=", 1) for s in sets))
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        experiments.run(name, config, params, loaded=loaded)
    print("RESULT " + json.dumps({
        "resident": resident, "peak": _status("VmHWM"), "flops": counter.get_total_flops(),
        "seconds": time.perf_counter() - t0, "load_seconds": load_s,
        "n_params": sum(p.numel() for p in loaded.bridge.original_model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in loaded.bridge.original_model.parameters()),
        "torch_threads": torch.get_num_threads()}), flush=True)


def measure(name: str, folder: Path, sets: dict[str, str], cache: Path) -> dict:
    env = dict(os.environ, ICL_CACHE_DIR=str(cache), PYTHONPATH=str(REPO / "code"))
    args = [sys.executable, __file__, "--child", name, str(folder)] + [f"{k}={v}" for k, v in sets.items()]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """Value at ``at`` of the line through (xs, ys) (least squares; one point: constant)."""
    if len(set(xs)) == 1:
        return sum(ys) / len(ys)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + b * (at - mx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4", help="depths of the checkpoints run (comma-separated)")
    ap.add_argument("--tiny", action="store_true", help="width 64 instead of 4,096: a quick check of the script")
    ap.add_argument("--only", default="", help="comma-separated experiments (default: all that use a model)")
    ap.add_argument("--runs", default=None, help="JSON-lines file of measurements, appended as they come and "
                                                  "reused on a rerun (default: a temporary file)")
    ap.add_argument("--project-only", action="store_true", help="measure nothing; project from --runs")
    ap.add_argument("--out", default=None, help="JSON file for the table (default: none with --tiny, "
                                                 "else benchmarks/results/llama3_memory.json)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2:])
    import torch

    from icl import experiments, models
    from icl.experiments import c2w_pretrained as cp

    names = [n for n in (args.only.split(",") if args.only else SMALL) if n]
    missing = sorted(n for n in experiments.REGISTRY
                     if experiments.get(n).USES_MODEL and n not in SMALL and n not in NOT_PROJECTED)
    if missing:
        raise SystemExit(f"no small parameters for {missing}: add them to SMALL")
    depths = [int(x) for x in args.layers.split(",")]
    full = cp.llama3_8b_memory(cp.Params())
    n8 = full["n_params"]
    weights32 = n8 * 2
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="llama3-memory-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        tmp = Path(tmp)
        runs_file = Path(args.runs) if args.runs else tmp / "runs.jsonl"
        done = [json.loads(ln) for ln in runs_file.read_text().splitlines()] if runs_file.exists() else []
        done = [r for r in done if r["tiny"] == args.tiny and r["layers"] in depths]
        for r in done:
            runs.setdefault(r["name"], []).append(r)
        folders: dict[int, Path] = {}
        for name in [] if args.project_only else names:
            spec = SMALL[name]
            points = [dict(spec["set"])]
            if "pairs" in spec:
                key = spec["pairs"][0]
                points.append(dict(spec["set"]) | {key: str(2 * int(spec["set"][key]))})
            for L in depths:
                for i, sets in enumerate(points):
                    if any(r["name"] == name and r["layers"] == L and r["double"] == bool(i) for r in done):
                        continue
                    if L not in folders:
                        folders[L] = tmp / f"ckpt-{L}"
                        t0 = time.perf_counter()
                        n = write_checkpoint(folders[L], L, args.tiny)
                        print(f"checkpoint: {L} layers, {n / 1e9:.2f}B parameters, written in "
                              f"{time.perf_counter() - t0:.0f} s", flush=True)
                    r = {"name": name, "layers": L, "double": bool(i), "tiny": args.tiny} | \
                        measure(name, folders[L], sets, tmp / "cache")
                    runs.setdefault(name, []).append(r)
                    with runs_file.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"  {name:16s} L={L} {'2x pairs' if i else '':8s} resident {r['resident'] / GIB:6.2f} GiB  "
                          f"peak {r['peak'] / GIB:6.2f} GiB  {r['flops'] / 1e12:8.2f} TFLOP  {r['seconds']:6.0f} s",
                          flush=True)
    names = [n for n in names if len({r["layers"] for r in runs.get(n, [])}) == len(depths)
             and ("pairs" not in SMALL[n] or len(runs[n]) == 2 * len(depths))]
    n_layers = int(models.LLAMA3_SHAPES["8b"]["num_hidden_layers"])
    tflops = GPU["peak_bf16_tflops"] * GPU["utilisation"]
    for name in names:
        spec, rs = SMALL[name], runs[name]
        base = [r for r in rs if not r["double"]]
        act = fit([r["layers"] for r in base], [r["peak"] - r["resident"] for r in base], n_layers)
        flops = fit([r["layers"] for r in base], [r["flops"] for r in base], n_layers) * spec["units"]
        if "pairs" in spec:
            key, default = spec["pairs"]
            small = int(spec["set"][key])
            dbl = [r for r in rs if r["double"]]
            per_pair = (fit([r["layers"] for r in dbl], [r["peak"] - r["resident"] for r in dbl], n_layers) - act) / small
            act += max(per_pair, 0.0) * (default - small)
        if name == "c2w_pretrained":
            # one MLP of m parameters was trained here: +16 bytes each on the CPU (fp32 upcast +2, grad 4,
            # Adam 8, bf16 snapshot 2); the default band on a GPU: its trained state, less its bf16 copy
            dims = TINY_SHAPE if args.tiny else models.LLAMA3_SHAPES["8b"]
            m = 3 * int(dims["hidden_size"]) * int(dims["intermediate_size"])
            act += full["trained_state"] - 2 * full["n_trained"] - 16 * m
        need = weights32 + act
        rows.append({"experiment": name, "peak_cpu_gib": max(r["peak"] for r in rs) / GIB,
                     "activations_gib": act / GIB, "gpu_need_gib": need / GIB, "fits_24gb": need / GIB <= BUDGET_GIB,
                     "tflop": flops / 1e12, "gpu_minutes": flops / (tflops * 1e12) / 60,
                     "cpu_seconds_measured": sum(r["seconds"] for r in rs)})
    print(f"\nMeta-Llama-3-8B at default parameters, bf16: weights {weights32 / GIB:.2f} GiB "
          f"({n8:,} parameters); budget {BUDGET_GIB:g} GiB; GPU time at {GPU['utilisation']:.0%} of "
          f"{GPU['peak_bf16_tflops']:g} TFLOP/s ({GPU['name']})")
    print(f"{'experiment':16s} {'CPU peak':>9s} {'activ.':>8s} {'GPU need':>9s} {'fits':>5s} {'TFLOP':>9s} {'GPU min':>8s}")
    for r in rows:
        print(f"{r['experiment']:16s} {r['peak_cpu_gib']:8.2f}G {r['activations_gib']:7.2f}G {r['gpu_need_gib']:8.2f}G "
              f"{'yes' if r['fits_24gb'] else 'NO':>5s} {r['tflop']:9.1f} {r['gpu_minutes']:8.2f}")
    out = args.out or (None if args.tiny else str(REPO / "benchmarks" / "results" / "llama3_memory.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({
            "measured": time.strftime("%Y-%m-%d"), "machine": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}",
            "depths": depths, "tiny": args.tiny, "n_params": n8, "weights_gib": weights32 / GIB,
            "budget_gib": BUDGET_GIB, "gpu": GPU, "small": {k: SMALL[k] for k in names},
            "rows": rows, "runs": runs}, indent=1))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
