"""``python -m icl``: list what exists, fill the cache, check it, and build the book.

    python -m icl list [--params [NAME ...]]
    python -m icl run surprisal [--model M] [--device D] [--dtype T] [--seed S] [--force] [--set k=v ...]
    python -m icl run all
    python -m icl cache status | verify
    python -m icl book [--no-render] [--quiet]

Bad requests (unknown model, experiment or task, a parameter out of its range, a GPU that is not there,
a cache folder that cannot be written, a corrupt cache entry) print one line starting with ``error:``
and exit with status 2. Everything that can be checked without a model is checked before a model is
loaded or anything is computed, and nothing is written. Results of custom runs (any parameter or seed
other than the defaults) go to the user cache unless ``ICL_CACHE_DIR`` is set
(:meth:`icl.config.Config.results_dir`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from icl import experiments, models, tasks
from icl.cache import Cache
from icl.config import REPO_ROOT, Config
from icl.errors import CacheCorruptError, ConfigError, ICLError
from icl.quarto import BookError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``error:`` line (exit 2) like every other bad request."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="python -m icl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    lst = sub.add_parser("list", help="experiments, models and tasks; with --params, every parameter")
    lst.add_argument("--params", nargs="*", metavar="NAME", default=None,
                     help="list the parameters of these experiments (all if none named): default, allowed values")
    run = sub.add_parser("run", help="compute an experiment (or 'all') into the cache, unless cached",
                         epilog=_run_epilog(argv), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("experiment", help="experiment name, 'all', or a chapter's .qmd file (every experiment "
                                        "the chapter reads, and what those depend on)")
    run.add_argument("--model", help="registry name, Hugging Face id or local folder (ICL_MODEL)")
    run.add_argument("--device", help="cpu, cuda, cuda:N, mps (ICL_DEVICE)")
    run.add_argument("--dtype", help="float32, bfloat16, float16 (ICL_DTYPE)")
    run.add_argument("--seed", type=int, help="seed for prompts and resampling")
    run.add_argument("--force", action="store_true", help="recompute and replace the cached entry")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="compute up to N experiments at once, each in its own process with one torch thread "
                          "(CPU only; default 1)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override an experiment parameter (repeatable); see the list below or "
                          "python -m icl list --params")
    cache = sub.add_parser("cache", help="inspect the result cache")
    cache.add_argument("action", choices=["status", "verify"])
    book = sub.add_parser("book", help="fill missing cache entries, then render and check the book with Quarto")
    book.add_argument("--no-render", action="store_true",
                      help="fill the cache and check the chapters' sources; skip quarto render")
    book.add_argument("--quiet", action="store_true", help="do not echo Quarto's output (it is still checked)")
    book.add_argument("--jobs", type=int, default=1, metavar="N",
                      help="compute missing cache entries N at a time (see run --jobs)")
    return p


def _run_epilog(argv: list[str] | None) -> str:
    """For ``run NAME --help``: that experiment's parameters; otherwise where to find them."""
    args = sys.argv[1:] if argv is None else argv
    named = [a for a in args[1:] if a in experiments.REGISTRY] if args[:1] == ["run"] else []
    if not named:
        return "Each experiment's parameters, defaults and allowed values: python -m icl list --params"
    return "\n".join(_params_lines(named[0]))


def _params_lines(name: str) -> list[str]:
    module = experiments.get(name)
    rows = experiments.describe_params(module)
    width = max(len(r[0]) for r in rows)
    out = [f"parameters of {name} (--set KEY=VALUE, --seed S):"]
    for key, default, allowed in rows:
        out.append(f"  {key:<{width}}  default {default}")
        out.append(f"  {'':<{width}}  allowed: {allowed}")
    return out


def _overrides(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key.strip() in out:
            raise ConfigError(f"--set {key.strip()} is given twice; give each parameter once")
        out[key.strip()] = value.strip()
    return out


def _show(path: Path) -> str:
    """A path as the user can use it: relative to the working directory if inside it, else absolute."""
    path = Path(path).absolute()
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def cmd_list(params: list[str] | None = None) -> int:
    if params is not None:
        for name in params or experiments.names():
            experiments.get(name)  # unknown names are an error before anything is printed
        for name in params or experiments.names():
            print("\n".join(_params_lines(name)))
        return 0
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
    a_max, b_max = tasks.AFFINE_LIMIT
    print(f"  {'affine:A,B':<14} y = A x + B, any integers |A| <= {a_max}, |B| <= {b_max}")
    print("parameters of each experiment: python -m icl list --params [NAME ...]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = Config.from_env(model=args.model, device=args.device, dtype=args.dtype)
    if args.force:
        config = config.with_(cache_mode="refresh")
    chapter = args.experiment.endswith(".qmd")
    if chapter:
        names = _chapter_experiments(args.experiment)
    else:
        names = experiments.names() if args.experiment == "all" else [args.experiment]
    overrides = _overrides(args.set)
    if (args.experiment == "all" or chapter) and (overrides or args.seed is not None):
        raise ConfigError(f"--set and --seed apply to one experiment, not {args.experiment!r}")
    # Validate everything before loading a model or writing anything.
    plan = []
    for name in names:
        module = experiments.get(name)
        params = experiments.make_params(module, overrides, seed=args.seed)
        experiments.check_content(module, params)
        plan.append((name, params))
    spec = models.resolve(config.model)
    models.resolve_device(spec, config.device)
    if config.cache_mode != "readonly":
        for name, params in plan:
            if config.cache_mode == "refresh" or not experiments.is_cached(name, config, params):
                experiments.check_writable(name, config, params)
    if _parallel(args.jobs, spec, config):
        from icl import schedule

        start = time.time()
        done = schedule.run_many(names, config, jobs=args.jobs, overrides={n: overrides for n in names},
                                 seed=args.seed, expected_s=schedule.committed_seconds(config))
        computed = sum(d.computed for d in done)
        print(f"{computed} computed, {len(done) - computed} already cached, in {time.time() - start:.0f} s "
              f"with {args.jobs} jobs")
        return 0
    loaded = None
    for name, params in plan:
        start = time.time()
        entry, loaded = experiments.run(name, config, params, progress=True, loaded=loaded)
        took = time.time() - start
        what = "computed" if (entry.path / "meta.json").stat().st_mtime >= start - 1 else "cached"
        print(f"{name}: {what} -> {_show(entry.path)} ({took:.1f} s)")
    return 0


def _chapter_experiments(arg: str) -> list[str]:
    """A chapter of the book, as a path (from here or from the repository root): what it reads and what
    that depends on, dependencies first. With ``--force`` all of them are recomputed, which is what
    reproducing the chapter from an empty cache takes."""
    from icl import quarto, schedule

    pages = {p.resolve() for p in quarto.book_files(REPO_ROOT)}
    path = next((c.resolve() for c in (Path(arg), REPO_ROOT / arg) if c.resolve() in pages), None)
    if path is None:
        raise ConfigError(f"{arg} is not a page of the book: pages are listed in _quarto.yml, e.g. "
                          "report/04-patching.qmd")
    names = quarto.chapter_experiments(path)
    if not names:
        raise ConfigError(f"{arg} reads no cached results: there is nothing to compute for it")
    return schedule.closure(names)


def _parallel(jobs: int, spec: models.ModelSpec, config: Config) -> bool:
    """Whether to use worker processes; ``--jobs`` above 1 is for the CPU (one model per worker)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and models.resolve_device(spec, config.device) != "cpu":
        raise ConfigError(f"--jobs {jobs} loads one model per worker; on {config.device or spec.default_device} "
                          "use --jobs 1")
    return jobs > 1


def cmd_cache(action: str) -> int:
    config = Config.from_env()
    roots = [config.cache_dir] + ([config.custom_cache_dir] if config.custom_cache_dir
                                  and config.custom_cache_dir != config.cache_dir
                                  and config.custom_cache_dir.is_dir() else [])
    bad = stale = 0
    rows: list[str] = []
    found: list[tuple[Cache, object]] = []
    for root in roots:
        cache = Cache(root)
        for removed in cache.clean():
            rows.append(f"removed a leftover of an interrupted write: {_show(removed)}")
        for path in cache.entries():
            try:
                found.append((cache, cache.read(path)))
            except FileNotFoundError:
                continue  # replaced by a concurrent write while we looked
            except CacheCorruptError as exc:
                bad += 1
                rows.append(f"{path.parent.name:<20} {path.name}  CORRUPT: {exc}")
    seen_models: list[dict] = []
    for _, entry in found:
        m = entry.key_inputs.get("model")
        if m and m not in seen_models:
            seen_models.append(m)
    for cache, entry in found:
        status = experiments.entry_status(entry, config, seen_models)  # models of every cache folder
        stale += not status.valid
        model = (entry.key_inputs.get("model") or {}).get("id", "-")
        where = "" if cache.root == config.cache_dir else "  [user cache]"
        rows.append(f"{entry.experiment:<20} {entry.path.name}  {model:<14} {status.describe()}{where}")
    missing, unknown = _missing(config)
    for row in rows:
        print(row)
    for root in roots:
        for left in Cache(root).leftover_info():
            print(f"leftover: {left.describe()}")
    if missing:
        print(f"missing for {config.model}: " + ", ".join(missing))
    if unknown:
        print(f"missing for {config.model}, keys not known yet: {', '.join(unknown)} ({unknown_reason(config)})")
    print(f"{len(found) + bad} entries ({stale} stale, {bad} corrupt), {len(missing) + len(unknown)} missing "
          f"for {config.model}, in {', '.join(_show(r) for r in roots)}")
    if action == "verify" and bad:
        return 1
    return 0


def _missing(config: Config) -> tuple[list[str], list[str]]:
    """Experiments whose default entry for the configured model is not in the cache, and those whose
    key cannot be known here (a hub model that has not been downloaded)."""
    from icl.cache import key_of

    missing, unknown = [], []
    cache = Cache(config.cache_dir)
    for name in experiments.names():
        module = experiments.get(name)
        try:
            key = key_of(experiments.key_inputs(module, experiments.make_params(module), config))
        except ICLError:
            unknown.append(name)
            continue
        path = cache.path_for(name, key)
        if not path.exists() and not cache.recover(path):
            missing.append(f"{name} (key {key[:16]})")
    return missing, unknown


def unknown_reason(config: Config) -> str:
    try:
        experiments.model_info(config)
    except ICLError as exc:
        return str(exc)
    return "their keys cannot be computed"


def cmd_book(args: argparse.Namespace) -> int:
    """Fill the cache, check the sources, ``quarto render`` (frozen chapters are reused), check the HTML."""
    from icl import quarto

    config = Config.from_env()
    print(f"[1/3] cache entries for {config.model} (computing any that are missing) ...", flush=True)
    if _parallel(args.jobs, models.resolve(config.model), config):
        from icl import schedule

        schedule.run_many(experiments.names(), config, jobs=args.jobs,
                          expected_s=schedule.committed_seconds(config))
    loaded = None
    for name in experiments.names():
        entry, loaded = experiments.run(name, config, progress=True, loaded=loaded)
        print(f"      {name}: {os.path.relpath(entry.path)}")
    del loaded
    problems = quarto.check_sources(REPO_ROOT)
    print(f"[2/3] chapter sources: {len(problems) or 'no'} problem(s)", flush=True)
    for problem in problems:
        print(f"      {problem}")
    if problems:
        print("error: the chapters' sources have problems (above)", file=sys.stderr)
        return 1
    if args.no_render:
        return 0
    if quarto.quarto_executable() is None:
        print("error: quarto is not on PATH; install Quarto from https://quarto.org/docs/get-started/ "
              "(the cache is filled and the sources checked)", file=sys.stderr)
        return 1
    print("[3/3] quarto render (chapters whose source and cache entries are unchanged are reused "
          "from _freeze/) ...", flush=True)
    start = time.time()
    log = quarto.render(REPO_ROOT, env={"ICL_CACHE": "readonly", "ICL_MODEL": config.model}, echo=not args.quiet)
    problems = quarto.log_problems(log) + quarto.check_html(REPO_ROOT / "_book")
    for problem in problems:
        print(f"      {problem}")
    if problems:
        print(f"error: the rendered book has {len(problems)} problem(s) (above)", file=sys.stderr)
        return 1
    print(f"      rendered in {time.time() - start:.0f} s with no warning: {REPO_ROOT / '_book' / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser(argv).parse_args(argv)
    try:
        try:
            if args.command == "list":
                return cmd_list(args.params)
            if args.command == "run":
                return cmd_run(args)
            if args.command == "cache":
                return cmd_cache(args.action)
            if args.command == "book":
                return cmd_book(args)
        finally:
            sys.stdout.flush()
    except ICLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (python -m icl list | head): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
