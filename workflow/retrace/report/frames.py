"""What the report modules share: metric columns, axis columns, reading tables, naming and formatting."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from retrace.compare import METRICS
from retrace.errors import RetraceError

#: Columns of the aggregated similarity table that are not axes of the grid.
NON_AXIS = frozenset({"cell", "step", *METRICS})
#: The axes that never become a factor table: ``model`` splits everything, ``data`` is the columns.
MODEL, DATA = "model", "data"


def axis_columns(frame: pd.DataFrame) -> list[str]:
    """The grid axes carried by an aggregated table: every column but the cell id, step and metrics."""
    return [c for c in frame.columns if c not in NON_AXIS]


def read_parquet(path: str | Path, required: Iterable[str] = (), what: str = "table") -> pd.DataFrame:
    """Read a Parquet file; a missing file, an unreadable one or a missing column is a RetraceError."""
    path = Path(path)
    if not path.is_file():
        raise RetraceError(f"{path}: {what} not found")
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
        raise RetraceError(f"{path}: cannot read {what} as Parquet: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RetraceError(f"{path}: {what} lacks column(s) {', '.join(missing)}")
    return frame


def sorted_values(values: Iterable[Any]) -> list[Any]:
    """Distinct values in a natural order: numbers numerically, then everything else as text."""
    distinct = list(dict.fromkeys(v for v in values))

    def key(v: Any) -> tuple:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (2, 0.0, "")
        if isinstance(v, bool):
            return (1, 0.0, str(v))
        try:
            return (0, float(v), str(v))
        except (TypeError, ValueError):
            return (1, 0.0, str(v))

    return sorted(distinct, key=key)


def slug(text: Any) -> str:
    """A file-name-safe rendering of a model id or axis value (``EleutherAI/pythia-70m`` → ``EleutherAI_pythia-70m``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return out or "_"


def show(value: Any) -> str:
    """An axis value as a person reads it (integers without ``.0``, missing as ``–``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fmt_cos(one_minus_cos: float) -> str:
    """θ Cos with enough decimals that 1 − θ Cos keeps three significant digits."""
    if one_minus_cos is None or math.isnan(one_minus_cos):
        return "–"
    if one_minus_cos <= 0:
        return "1" if one_minus_cos == 0 else f"{1 - one_minus_cos:.12f}"
    decimals = min(16, max(4, 2 - math.floor(math.log10(one_minus_cos))))
    return f"{1 - one_minus_cos:.{decimals}f}"


def fmt_num(value: float, digits: int = 4) -> str:
    """A distance with ``digits`` significant digits."""
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.{digits}g}"


def describe(key: Sequence[Any], names: Sequence[str]) -> str:
    """``gas=2, attention=flash`` for a tuple of axis values."""
    return ", ".join(f"{n}={show(v)}" for n, v in zip(names, key, strict=True)) or "(no other axis)"
