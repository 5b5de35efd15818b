"""Log-axis tick labels of the report's figures are plain text, readable with math text off."""

from __future__ import annotations

import re
import warnings

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retrace.report.trajectories import PLAIN_TEXT, _logify


def drawn_ytick_labels(lo: float, hi: float) -> list[str]:
    """The y tick labels a figure draws for distances from ``lo`` to ``hi`` (as the report sets it up)."""
    with matplotlib.rc_context(PLAIN_TEXT), warnings.catch_warnings():
        warnings.simplefilter("error")  # a glyph missing from the font fails the test
        fig = Figure(figsize=(5, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        x, y = np.array([1.0, 2.0, 4.0, 8.0]), np.geomspace(lo, hi, 4)
        ax.plot(x, y)
        _logify(ax, [x], [y])
        fig.canvas.draw()
        ticks = ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
        return [t.get_text() for t in ticks if t.get_text()]


def test_decades_are_written_as_powers_of_ten_without_math_text():
    labels = drawn_ytick_labels(1e-9, 1e-3)
    assert labels and not any("$" in s or "mathdefault" in s for s in labels)
    assert {"10⁻⁸", "10⁻⁶", "10⁻⁴"} <= set(labels)


def test_an_axis_within_one_decade_labels_its_minor_ticks():
    labels = drawn_ytick_labels(2.1e-3, 7.9e-3)
    assert not any("$" in s for s in labels)
    between = [s for s in labels if re.fullmatch(r"[2-9]×10⁻³", s)]  # matplotlib picks which of 2…9
    assert len(between) >= 2, labels
