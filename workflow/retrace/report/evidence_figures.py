"""The figure "where the evidence is": per model, the data gap and the noise floor over steps.

Lines: the closest variant's median 1 − θ Cos, the nearest other variant's median, the floor
(within-variant spread of the closest variant) and ``FAR`` floors, the line above which the closest
variant does not reproduce the reference (``retrace.report.evidence``). Where the gap line stands far
above the floor the data axis is told apart; where they meet, it is not. Zeros (step 0, a
bit-identical reproduction) are left out of the log axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from retrace.report import evidence as E
from retrace.report.frames import DATA, show, sorted_values
from retrace.report.trajectories import _logify, _plain_text, _save


def _positive(xs: list[int], ys: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y is not None and y > 0]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


@_plain_text
def evidence_figure(model: str, closest: str, ev: E.Evidence, path: Path) -> Path:
    """Gap, floor, the two medians and FAR floors over steps, for one model's verdict."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    steps = [e.step for e in ev.per_step]
    rival = ev.per_step[-1].rival if ev.per_step else "other"
    series = [
        (f"gap ({rival} − {closest}, median over pairs)", [e.gap for e in ev.per_step], "-", "o"),
        (f"floor (spread of {closest}'s cells)", [e.floor for e in ev.per_step], "-", "s"),
        (f"{E.FAR:g} × floor", [E.FAR * e.floor for e in ev.per_step], ":", None),
        (f"{closest} median distance", [e.closest_median for e in ev.per_step], "--", "."),
        (f"{rival} median distance", [e.rival_median for e in ev.per_step], "--", "."),
    ]
    xs, ys = [], []
    for label, values, style, marker in series:
        x, y = _positive(steps, values)
        ax.plot(x, y, linestyle=style, marker=marker, label=label)
        xs.append(x)
        ys.append(y)
    p = ev.p_value if ev.p_value is not None else "–"
    return _finish(fig, ax, xs, ys, ylabel="1 − θ Cos",
                   title=f"{model}: where the evidence is (test: {ev.mode}, p = {p})", path=path)


@_plain_text
def anchored_figure(free: pd.DataFrame, anchored: pd.DataFrame, path: Path) -> Path:
    """Per data variant: median 1 − θ Cos over steps of the free-running cells (solid) and of the
    re-anchored ones (dashed, each point one segment), with a min–max band for each."""
    model = str(anchored["model"].iloc[0])
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    xs, ys = [], []
    for i, data in enumerate(sorted_values(pd.concat([free[DATA], anchored[DATA]]))):
        colour = f"C{i}"
        for frame, style, what in ((free, "-", "free-running"), (anchored, "--", "re-anchored")):
            g = frame[(frame[DATA] == data) & (frame["step"] > 0) & (frame["one_minus_cos"] > 0)]
            if g.empty:
                continue
            stats = g.groupby("step")["one_minus_cos"].agg(["median", "min", "max"]).sort_index()
            x = stats.index.to_numpy(dtype=float)
            n = frame.loc[frame[DATA] == data, "cell"].nunique()
            ax.plot(x, stats["median"], linestyle=style, marker=".", color=colour,
                    label=f"{show(data)}, {what} (n={n})")
            ax.fill_between(x, stats["min"], stats["max"], color=colour, alpha=0.12, linewidth=0)
            xs.append(x)
            ys.append(stats["median"].to_numpy())
    return _finish(fig, ax, xs, ys, ylabel="1 − θ Cos (zeros, i.e. bit-identical, not drawn)",
                   title=f"{model}: re-anchored segments vs free-running runs", path=path)


def _finish(fig: Figure, ax, xs: list, ys: list, *, ylabel: str, title: str, path: Path) -> Path:
    """The axes both figures share: log scales fitted to the drawn points, a step axis, grid and legend."""
    _logify(ax, xs, ys)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)
