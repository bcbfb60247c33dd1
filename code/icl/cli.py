"""``python -m icl``: list what exists, fill the cache, check it, and build the book.

    python -m icl list
    python -m icl run surprisal [--model M] [--device D] [--dtype T] [--seed S] [--force] [--set k=v ...]
    python -m icl run all
    python -m icl cache status | verify
    python -m icl book [--no-render]

Bad requests (unknown model, experiment or task, a GPU that is not there, a corrupt cache entry) print
one line starting with ``error:`` and exit with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from icl import experiments, models, tasks
from icl.cache import Cache
from icl.config import REPO_ROOT, Config
from icl.errors import CacheCorruptError, ConfigError, ICLError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m icl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="experiments, models and tasks")
    run = sub.add_parser("run", help="compute an experiment (or 'all') into the cache, unless cached")
    run.add_argument("experiment", help="experiment name or 'all'")
    run.add_argument("--model", help="registry name, Hugging Face id or local folder (ICL_MODEL)")
    run.add_argument("--device", help="cpu, cuda, cuda:N, mps (ICL_DEVICE)")
    run.add_argument("--dtype", help="float32, bfloat16, float16 (ICL_DTYPE)")
    run.add_argument("--seed", type=int, help="seed for prompts and resampling")
    run.add_argument("--force", action="store_true", help="recompute and replace the cached entry")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override an experiment parameter (repeatable)")
    cache = sub.add_parser("cache", help="inspect the result cache")
    cache.add_argument("action", choices=["status", "verify"])
    book = sub.add_parser("book", help="fill missing cache entries, execute every chapter, render with Quarto")
    book.add_argument("--no-render", action="store_true", help="execute and check, skip quarto render")
    book.add_argument("--notebooks", default=str(REPO_ROOT / "_build" / "notebooks"),
                      help="where the executed notebooks are kept")
    return p


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def cmd_list() -> int:
    print("experiments:")
    for name in experiments.names():
        mod = experiments.get(name)
        print(f"  {name:<14} {mod.DESCRIPTION}  [{mod.CHAPTER}]")
    print("models:")
    for name, spec in models.REGISTRY.items():
        default = " (default)" if name == Config().model else ""
        print(f"  {name:<14} {spec.description}{default}")
    print("tasks:")
    for name, task in tasks.SUITE.items():
        print(f"  {name:<14} {task.rule}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = Config.from_env(model=args.model, device=args.device, dtype=args.dtype)
    if args.force:
        config = config.with_(cache_mode="refresh")
    names = experiments.names() if args.experiment == "all" else [args.experiment]
    overrides = _overrides(args.set)
    if args.experiment == "all" and overrides:
        raise ConfigError("--set applies to one experiment, not 'all'")
    # Validate everything before loading a model or writing anything.
    plan = []
    for name in names:
        module = experiments.get(name)
        params = experiments.make_params(module, overrides, seed=args.seed)
        experiments.check_content(module, params)
        plan.append((name, params))
    spec = models.resolve(config.model)
    models.resolve_device(spec, config.device)
    loaded = None
    for name, params in plan:
        start = time.time()
        entry, loaded = experiments.run(name, config, params, progress=True, loaded=loaded)
        took = time.time() - start
        what = "computed" if (entry.path / "meta.json").stat().st_mtime >= start - 1 else "cached"
        print(f"{name}: {what} -> {entry.path.relative_to(config.cache_dir.parent) if entry.path.is_relative_to(config.cache_dir.parent) else entry.path} ({took:.1f} s)")
    return 0


def cmd_cache(action: str) -> int:
    config = Config.from_env()
    cache = Cache(config.cache_dir)
    bad = 0
    current = _current_keys(config)
    rows = []
    for path in cache.entries():
        try:
            entry = cache.read(path)
            state = "ok" if entry.key in current else "stale (no current experiment/config produces this key)"
            model = (entry.key_inputs.get("model") or {}).get("id", "-")
            rows.append(f"{entry.experiment:<20} {path.name}  {model:<14} {state}")
        except CacheCorruptError as exc:
            bad += 1
            rows.append(f"{path.parent.name:<20} {path.name}  CORRUPT: {exc}")
    missing = [f"{name} (key {key[:16]})" for key, name in current.items()
               if not cache.path_for(name, key).exists()]
    for row in rows:
        print(row)
    for left in cache.leftovers():
        print(f"leftover temporary folder (safe to delete): {left}")
    if missing:
        print("missing for the current configuration: " + ", ".join(missing))
    print(f"{len(rows)} entries, {bad} corrupt, {len(missing)} missing, in {cache.root}")
    if action == "verify" and bad:
        return 1
    return 0


def _current_keys(config: Config) -> dict[str, str]:
    from icl.cache import key_of

    out = {}
    for name in experiments.names():
        module = experiments.get(name)
        try:
            out[key_of(experiments.key_inputs(module, experiments.make_params(module), config))] = name
        except ICLError:
            pass
    return out


def cmd_book(args: argparse.Namespace) -> int:
    from icl import quarto

    config = Config.from_env()
    print(f"[1/3] filling missing cache entries for {config.model} ...")
    loaded = None
    for name in experiments.names():
        entry, loaded = experiments.run(name, config, progress=True, loaded=loaded)
        print(f"      {name}: {entry.path}")
    del loaded
    chapters = quarto.book_files(REPO_ROOT)
    out_dir = Path(args.notebooks)
    env = {"ICL_CACHE": "readonly", "ICL_MODEL": config.model}
    print(f"[2/3] executing {len(chapters)} chapters through a Jupyter kernel ...")
    for path in chapters:
        start = time.time()
        rel = path.relative_to(REPO_ROOT)
        quarto.execute_qmd(path, REPO_ROOT, env=env, save_to=out_dir / rel.with_suffix(".ipynb"))
        print(f"      {rel} ({time.time() - start:.1f} s)")
    problems = quarto.check_structure(REPO_ROOT)
    for problem in problems:
        print(f"      structure: {problem}")
    if problems:
        print("error: the book's structure has problems (above)", file=sys.stderr)
        return 1
    print(f"      executed notebooks are in {out_dir}")
    if args.no_render:
        return 0
    exe = quarto.quarto_executable()
    if exe is None:
        print(
            "[3/3] Quarto is not installed, so the book was executed and checked but not rendered.\n"
            "      Install it with `pip install quarto-cli` (it downloads the Quarto binary, so it needs\n"
            "      network access to GitHub) or from https://quarto.org/docs/get-started/, then rerun.",
            file=sys.stderr,
        )
        return 1
    print("[3/3] quarto render ...")
    os.environ.update({"QUARTO_PYTHON": sys.executable, **env})
    quarto.render(REPO_ROOT)
    print(f"      the book is at {REPO_ROOT / '_book' / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "run":
            return cmd_run(args)
        if args.command == "cache":
            return cmd_cache(args.action)
        if args.command == "book":
            return cmd_book(args)
    except ICLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
