"""Benchmark: every model experiment at its default parameters on a full-shape Meta-Llama-3-8B, on one
CUDA GPU held to a 24 GiB budget. It measures what ``benchmarks/llama3_memory.py`` projects from CPU runs.

Run from the repository root on a machine with a CUDA GPU (about 5 minutes on an H100 or H200):

    python benchmarks/llama3_gpu.py [--budget-gib 24] [--only patching,ablation] [--out FILE]

1. It writes a checkpoint with Meta-Llama-3-8B's exact config and random bf16 weights (32 layers,
   8.03B parameters, the real Llama-3 tokenizer; :func:`llama3_memory.write_checkpoint`, the weights
   drawn on the GPU) into a temporary folder, and loads it once through the project's own path
   (``ICL_MODEL=<folder>``, ``cuda``, ``bfloat16``), exactly as a downloaded folder is loaded.
2. The budget is enforced, not estimated: PyTorch's allocator is capped
   (``torch.cuda.set_per_process_memory_fraction``) at the budget less the CUDA context that this
   process already holds outside the allocator, so an experiment that would need more than a 24 GiB
   card gives it raises an out-of-memory error here, and the row says so.
3. Each experiment then runs at its default parameters into a temporary cache, in ``DEPENDS`` order
   (an experiment's upstream entries come from the runs before it, as in ``python -m icl run all``).
   Per experiment: the allocator's peak (``max_memory_allocated``, weights included) and its reserved
   peak, and the wall time. Two adjustments for random weights, both printed: ``induction_ablation``
   names induction heads by a prefix-matching threshold, which no head of a random model reaches, so
   its threshold is set to the fourth-largest score that ``induction_heads`` measured; ``ablation``'s
   procedure is data-driven and records how many steps it took, since its peak depends on reaching a
   re-patching step.
4. A run that outlives ``--deadline`` seconds from the start skips the experiments not yet begun.

Results: a JSON line per experiment (``--runs``, appended as they come) and a table (``--out``) that
Appendix B shows beside the CPU projections. ``--tiny --device cpu``: a quick check of the script at
width 64 on the CPU (no budget), used by the tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))
sys.path.insert(0, str(REPO / "benchmarks"))
GIB = 2**30

# Upstream experiments first, then roughly from cheap to dear, so that a deadline loses the least.
ORDER = ("logit_lens", "patching", "ablation", "surprisal", "icl_score", "induction_heads", "induction_ablation",
         "task_vectors", "function_vectors", "c2w_pretrained")


def scratch_dir(need_bytes: int) -> str:
    """A folder with room for the checkpoint: /dev/shm (memory) when it has the space, else TMPDIR."""
    for cand in ("/dev/shm", os.environ.get("TMPDIR", "/tmp")):
        if os.path.isdir(cand) and shutil.disk_usage(cand).free > need_bytes * 1.2:
            return cand
    return os.environ.get("TMPDIR", "/tmp")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory budget (GiB) the allocator is capped at")
    ap.add_argument("--only", default="", help="comma-separated experiments (default: every one that uses a model)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which no further experiment starts")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a check of the script)")
    ap.add_argument("--tiny", action="store_true", help="width 64 and 2 layers: a quick check of the script")
    ap.add_argument("--runs", default=None, help="JSON-lines file, one line per experiment as it finishes")
    ap.add_argument("--out", default=None, help="JSON file for the table (default: none with --tiny, "
                                                "else benchmarks/results/llama3_gpu.json)")
    args = ap.parse_args()
    import torch

    from icl import experiments, models
    from icl.config import Config
    from llama3_memory import write_checkpoint

    start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU; this benchmark measures GPU memory (use --tiny --device cpu "
              "to check the script)", file=sys.stderr)
        return 2
    known = [n for n in ORDER if experiments.get(n).USES_MODEL]
    missing = sorted(n for n in experiments.names() if experiments.get(n).USES_MODEL and n not in ORDER)
    if missing:
        print(f"error: {missing} use a model but are not in ORDER", file=sys.stderr)
        return 2
    names = [n for n in known if not args.only or n in args.only.split(",")]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(known))
    if unknown:
        print(f"error: not a model experiment: {', '.join(unknown)}", file=sys.stderr)
        return 2
    layers = 2 if args.tiny else int(models.LLAMA3_SHAPES["8b"]["num_hidden_layers"])
    machine = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        machine |= {"gpu": props.name, "gpu_total_gib": props.total_memory / GIB, "cuda": torch.version.cuda}
    rows: list[dict] = []
    runs_file = Path(args.runs) if args.runs else None
    with tempfile.TemporaryDirectory(prefix="llama3-gpu-", dir=scratch_dir(17 * 10**9 if not args.tiny else 10**9)) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        n_params = write_checkpoint(tmp / "ckpt", layers, args.tiny, device=args.device)
        write_s = time.perf_counter() - t0
        print(f"checkpoint: {layers} layers, {n_params:,} parameters, written in {write_s:.0f} s to {tmp}", flush=True)
        config = Config.from_env(model=str(tmp / "ckpt"), device=args.device, dtype="bfloat16",
                                 cache_mode="use", cache_dir=tmp / "cache")
        cap_gib = None
        if cuda:
            torch.cuda.init()
            torch.zeros(1, device=args.device)
            free, total = torch.cuda.mem_get_info()
            context = (total - free) - torch.cuda.memory_reserved()  # the CUDA context, outside the allocator
            cap_gib = args.budget_gib - context / GIB
            torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
            machine |= {"cuda_context_gib": context / GIB, "allocator_cap_gib": cap_gib}
            print(f"{machine['gpu']}: allocator capped at {cap_gib:.2f} GiB = {args.budget_gib:g} GiB budget less "
                  f"the CUDA context ({context / GIB:.2f} GiB)", flush=True)
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        load_status = "ok"
        try:
            loaded = models.load(config)
        except torch.OutOfMemoryError:  # loading itself needs more than the budget: say so, measure the rest
            load_status = "out of memory under the cap; loaded without it"
            gc.collect()
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
            loaded = models.load(config)
            torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / torch.cuda.mem_get_info()[1])
        if cuda:
            torch.cuda.synchronize()
            machine["load_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        load_s = time.perf_counter() - t0
        weights = sum(p.numel() * p.element_size() for p in loaded.bridge.original_model.parameters())
        after_load = torch.cuda.memory_allocated() if cuda else 0
        print(f"loaded in {load_s:.0f} s ({load_status}): weights {weights / GIB:.2f} GiB, allocated "
              f"{after_load / GIB:.2f} GiB", flush=True)
        for name in names:
            module = experiments.get(name)
            row: dict = {"experiment": name}
            if time.perf_counter() - start > args.deadline:
                row["status"] = "skipped (deadline)"
                rows.append(row)
                print(f"  {name:18s} skipped: past the deadline", flush=True)
                continue
            sets: dict[str, str] = {}
            if name == "induction_ablation" and "induction_heads" in names:
                ih = experiments.run("induction_heads", config.with_(cache_mode="readonly"))[0]
                scores = sorted(float(x) for x in ih.arrays["prefix_matching"].ravel())
                sets["threshold"] = repr(scores[-4])  # four heads count as "induction heads"
                sets["head"] = "L{}H{}".format(*divmod(int(ih.arrays["prefix_matching"].argmax()),
                                                       ih.arrays["prefix_matching"].shape[1]))
            params = experiments.make_params(module, sets)
            row["set"] = sets
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                entry, loaded = experiments.run(name, config, params, loaded=loaded)
                if cuda:
                    torch.cuda.synchronize()
                row["status"] = "ok"
                if name == "ablation":
                    row["procedure_steps"] = len(entry.data.get("procedure", []))
            except torch.OutOfMemoryError as exc:
                row["status"] = "out of memory"
                row["error"] = str(exc).splitlines()[0][:300]
            except Exception as exc:  # noqa: BLE001 -- one experiment's failure is a row, not the end
                row["status"] = "failed"
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            row["seconds"] = time.perf_counter() - t0
            if cuda:
                row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
                row["fits"] = row["status"] == "ok" and row["peak_reserved_gib"] <= cap_gib
            rows.append(row)
            if runs_file:
                with runs_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            mem = (f"peak {row['peak_allocated_gib']:6.2f} GiB allocated, {row['peak_reserved_gib']:6.2f} reserved"
                   if cuda else "")
            print(f"  {name:18s} {row['status']:14s} {row['seconds']:7.1f} s  {mem} {row.get('error', '')}", flush=True)
    result = {"measured": time.strftime("%Y-%m-%d"), "machine": machine, "tiny": args.tiny, "layers": layers,
              "n_params": n_params, "weights_gib": weights / GIB, "budget_gib": args.budget_gib,
              "allocator_cap_gib": cap_gib, "checkpoint_write_s": write_s, "load_s": load_s, "load_status": load_status,
              "total_s": time.perf_counter() - start, "rows": rows}
    out = args.out or (None if args.tiny else str(REPO / "benchmarks" / "results" / "llama3_gpu.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp_out = Path(out).with_suffix(".tmp")
        tmp_out.write_text(json.dumps(result, indent=1))
        tmp_out.replace(out)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
