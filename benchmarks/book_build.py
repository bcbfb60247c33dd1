"""Benchmark: how long `make book` takes when nothing is frozen (cold), when everything is (warm), and
the floor, in one run.

Run from the repository root, with the venv set up and `quarto` on PATH:

    python benchmarks/book_build.py [--skip-cold]

* cold: `_freeze/`, `.quarto/` and `_book/` are removed, then `make book`: Quarto executes every chapter
  (one Jupyter kernel each) and renders every page.
* warm: `make book` again with nothing changed: the cache is checked, every chapter is reused from
  `_freeze/`, and Quarto only runs pandoc over the pages.
* floor: the chapters' own code alone — every code cell and inline expression of every chapter, run in
  one fresh Python process per chapter (as Quarto's kernels are), figures drawn to PNG — with no Quarto,
  no pandoc and no cache check. The cells are taken from `quarto convert`'s notebook of each chapter.

It prints the wall time of each and the ratios warm/cold and cold/floor. Timings depend on the machine
and its load; this is a benchmark, not a test. The cache must be complete (`make book` once) so that no
experiment is computed while timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from icl import quarto  # noqa: E402

RUN_CHAPTER = r"""
import io, json, sys, time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.core.interactiveshell import InteractiveShell

cells, inline = json.load(open(sys.argv[1]))
shell = InteractiveShell.instance()
start = time.perf_counter()
for source in cells:
    result = shell.run_cell(source, silent=True)
    result.raise_error()
    for number in plt.get_fignums():
        plt.figure(number).savefig(io.BytesIO(), format="png")
    plt.close("all")
for expr in inline:
    shell.display_formatter.format(shell.ev(expr))
print(time.perf_counter() - start)
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}")
    return seconds


def floor(env: dict[str, str]) -> tuple[float, float]:
    """(wall time of all chapters' code in one process per chapter, of which inside the code)."""
    inline_re = re.compile(r"(?:^|[^`])`\{python\}[ \t]([^`]+)`", re.M)
    total = inside = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for chapter in quarto.book_files(ROOT):
            nb_path = Path(tmp) / (chapter.stem + ".ipynb")
            subprocess.run(["quarto", "convert", str(chapter), "--output", str(nb_path)], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            nb = json.loads(nb_path.read_text())
            cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
            text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
            job = Path(tmp) / (chapter.stem + ".json")
            job.write_text(json.dumps([cells, inline_re.findall(text)]))
            jobs.append(job)
        for job in jobs:
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", RUN_CHAPTER, str(job)], cwd=ROOT, env=env, check=True,
                                 capture_output=True, text=True)
            total += time.perf_counter() - start
            inside += float(out.stdout.strip().splitlines()[-1])
    return total, inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cold", action="store_true", help="time only warm and floor")
    args = ap.parse_args()
    if quarto.quarto_executable() is None:
        sys.exit("error: quarto is not on PATH")
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    rows = []
    if not args.skip_cold:
        for name in ("_freeze", ".quarto", "_book"):
            shutil.rmtree(ROOT / name, ignore_errors=True)
        rows.append(("cold make book (nothing frozen)", timed(["make", "book"], env)))
    else:
        timed(["make", "book"], env)  # make sure everything is frozen
    rows.append(("warm make book (everything frozen)", timed(["make", "book"], env)))
    read_env = {**env, "ICL_CACHE": "readonly"}
    total, inside = floor(read_env)
    rows.append(("floor: chapters' code alone, a process each", total))
    rows.append(("  of which inside the chapters' code", inside))
    width = max(len(r[0]) for r in rows)
    print(f"book build on {os.cpu_count()} CPUs, {len(quarto.book_files(ROOT))} pages, "
          f"quarto {subprocess.run(['quarto', '--version'], capture_output=True, text=True).stdout.strip()}")
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:7.1f} s")
    times = dict(rows)
    if "cold make book (nothing frozen)" in times:
        cold = times["cold make book (nothing frozen)"]
        print(f"  warm / cold  = {times['warm make book (everything frozen)'] / cold:.2f}")
        print(f"  cold / floor = {cold / total:.2f}")
    print(f"  warm target: at most 60 s -> {'met' if times['warm make book (everything frozen)'] <= 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
