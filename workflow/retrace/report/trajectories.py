"""Figures of 1 − θ Cos and L2 over training steps (matplotlib, Agg canvas, no pyplot state).

* ``trajectory_<model>.png``: per model, one line per data variant: the mean over that variant's
  cells at each step, with a band from the smallest to the largest cell (the spread over the other
  axes: layout, attention, seed, ...).
* ``factor_<axis>_<model>.png``: per model and factor, one panel per data variant and distance, one
  line per factor value: the mean over the complete slices (see ``retrace.report.tables``), the same
  averaging as the factor tables, at every step.

Both axes are logarithmic where the values allow it: steps follow the Pythia schedule (1, 2, 4, ...,
512, 1000, 2000, ...) and distances grow over orders of magnitude. Step 0 and exact zeros (a
reproduction identical to its reference) cannot be drawn on a log axis and are left out; an axis
with nothing positive stays linear.

Labels come from the study (model names, data variants, axis values): math text is off
(``text.parse_math``), so a ``$`` in a name is drawn as a dollar sign instead of being parsed as TeX
(``$\\foo$`` would otherwise stop the report with a parse error). For the same reason a log axis's
ticks are written as plain text (``10⁻³``, ``2×10⁻³``): matplotlib's default log formatter writes
math text (``$\\mathdefault{10^{-3}}$``), which would otherwise be drawn as it is written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

from retrace.io import atomic_path
from retrace.report.frames import DATA, MODEL, show, slug, sorted_values
from retrace.report.tables import Factor, balanced_slices

DISTANCES = (("one_minus_cos", "1 − θ Cos"), ("l2", "L2"))
#: Every text of a figure as plain text: labels are data, not TeX.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}

_F = TypeVar("_F", bound=Callable)
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class PlainLogFormatter(LogFormatter):
    """Log-axis ticks as plain text: ``10⁻³`` at a decade, ``2×10⁻³`` between (math text is off).

    The base class decides which ticks get a label (every decade; the minor ticks only when the axis
    spans few decades); this class only writes the label it chose.
    """

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not super().__call__(x, pos) or x <= 0:
            return ""
        exponent = int(np.floor(np.log10(x) + 1e-9))
        mantissa = round(x / 10.0**exponent, 6)
        power = f"10{str(exponent).translate(_SUPERSCRIPT)}"
        return power if mantissa == 1 else f"{mantissa:g}×{power}"


def _plain_text(fn: _F) -> _F:
    """Build and save the figure with math text parsing off (Text objects read it when created)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(PLAIN_TEXT):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _logify(ax, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
    if any(len(x) for x in xs) and all((x > 0).all() for x in xs):
        ax.set_xscale("log")
        steps = np.unique(np.concatenate(xs))
        if len(steps) <= 12:  # few checkpoints: tick each one
            ax.set_xticks(steps)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # steps as 1, 10, 1000
        ax.xaxis.set_minor_formatter(NullFormatter())
    if any(len(y) and (y > 0).any() for y in ys):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _positive(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame[(frame["step"] > 0) & (frame[column] > 0)]


@_plain_text
def trajectory_figure(sub: pd.DataFrame, path: Path) -> Path:
    """Per data variant: mean and min–max band of each distance over steps, for one model."""
    model = str(sub[MODEL].iloc[0])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (column, label) in zip(axes, DISTANCES, strict=True):
        xs, ys = [], []
        for data in sorted_values(sub[DATA]):
            g = _positive(sub[sub[DATA] == data], column)
            stats = g.groupby("step")[column].agg(["mean", "min", "max"]).sort_index()
            x = stats.index.to_numpy(dtype=float)
            n = sub.loc[sub[DATA] == data, "cell"].nunique()
            (line,) = ax.plot(x, stats["mean"], marker=".", label=f"{show(data)} (n={n} cells)")
            ax.fill_between(x, stats["min"], stats["max"], color=line.get_color(), alpha=0.2, linewidth=0)
            xs.append(x)
            ys.append(stats["mean"].to_numpy())
        _logify(ax, xs, ys)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="data (mean, band = min–max over other axes)", fontsize="small", title_fontsize="small")
    fig.suptitle(f"{model}: distance to the published checkpoints")
    return _save(fig, path)


@_plain_text
def factor_figure(sub: pd.DataFrame, factor: Factor, path: Path) -> Path:
    """Per data variant and distance: one line per value of ``factor``, balanced as in the factor tables."""
    model = str(sub[MODEL].iloc[0])
    variants = sorted_values(sub[DATA])
    balanced = pd.concat([balanced_slices(at, factor)[0] for _, at in sub.groupby("step", sort=True)])
    cols = list(factor.columns)
    values = balanced[cols].drop_duplicates()
    values = values.sort_values(cols, key=lambda s: s.map({v: i for i, v in enumerate(sorted_values(s))}))
    fig = Figure(figsize=(5.2 * len(variants), 7.5), layout="constrained")
    grid = np.asarray(fig.subplots(2, len(variants), squeeze=False, sharey="row"))
    for col, data in enumerate(variants):
        for row, (column, label) in enumerate(DISTANCES):
            ax = grid[row, col]
            xs, ys = [], []
            for key in values.itertuples(index=False, name=None):
                mask = balanced[DATA] == data
                for c, v in zip(cols, key, strict=True):
                    mask &= balanced[c].map(show) == show(v)
                mean = _positive(balanced[mask], column).groupby("step")[column].mean().sort_index()
                x = mean.index.to_numpy(dtype=float)
                ax.plot(x, mean.to_numpy(), marker=".", label=factor.label(key))
                xs.append(x)
                ys.append(mean.to_numpy())
            _logify(ax, xs, ys)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"data = {show(data)}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(title=factor.name, fontsize="small", title_fontsize="small")
    fig.suptitle(f"{model}: distance to the published checkpoints by {factor.name}")
    return _save(fig, path)


def figure_name(kind: str, model: str, factor: str | None = None) -> str:
    return f"{kind}_{slug(factor) + '_' if factor else ''}{slug(model)}.png"
