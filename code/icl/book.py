"""What a chapter imports in its one hidden setup cell.

Chapters only load and plot. :func:`setup` fixes the plotting style and returns a :class:`Book`, whose
:meth:`Book.load` fetches an experiment's result from the cache in ``readonly`` mode: a render never
loads a model or computes anything, and a missing result stops the render with the command that
produces it. The model is the configured one (``ICL_MODEL``), so pointing the book at llama-3-8b is
``ICL_MODEL=llama-3-8b python -m icl run all`` followed by a render with the same variable set.

The formatting helpers turn cached numbers into the inline values of the prose, so no number in the
text is typed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from icl import experiments, models
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
        return entry

    @property
    def model(self) -> models.ModelSpec:
        return models.resolve(self.config.model)

    def model_line(self, entry: Entry) -> str:
        """One sentence on which model and settings produced ``entry``."""
        model = entry.key_inputs.get("model") or {}
        spec = models.resolve(self.config.model)
        return (f"{spec.name} ({model.get('dtype', '?')}, on {entry.meta.get('device', '?')}), "
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
    return Book(Config.from_env().with_(cache_mode="readonly"))


def ci(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``[mean, low, high]`` as ``"4.49 nats (95% CI 4.21–4.80)"``."""
    mean, low, high = values
    u = f" {unit}" if unit else ""
    sep = "–" if low >= 0 else " to "  # an en dash next to a minus sign reads badly
    return f"{mean:.{digits}f}{u} (95% CI {low:.{digits}f}{sep}{high:.{digits}f})"


def num(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def band(ax: Any, x: Any, entry: Entry, prefix: str, label: str | None = None, color: str | None = None,
         scale: float = 1.0, **kw: Any) -> None:
    """Plot a cached mean curve with its bootstrap interval as a shaded band."""
    mean, lo, hi = (entry.arrays[f"{prefix}.{s}"] * scale for s in ("mean", "lo", "hi"))
    (line,) = ax.plot(x, mean, label=label, color=color, **kw)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
