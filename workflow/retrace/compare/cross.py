"""One published model's checkpoints against other repos at the same steps (the blog's "versus gen 1/2").

``cross_compare(model, against, steps)`` compares ``model@step{N}`` with ``other@step{N}`` for every
other repo and step (``retrace.checkpoints.open_params`` + ``retrace.compare.similarity.compare_params``) and
returns one row per (other, step)::

    model, other, step, cos, one_minus_cos, l2, n_params, bitwise_equal_tensors, n_tensors, status

``status`` is ``"ok"``, or ``"missing: <why>"`` when either side has no such step (no branch on the Hub,
not in an offline hub cache, no such local path): the row is recorded with NaN figures rather than
ending the run, since generations were saved on different schedules (pythia-*-v0 has no step 0 and no
log-spaced steps). Any other failure (a corrupt download, parameter names or shapes that differ
without ``intersection=True``) is an error.

retrace.report.generations turns the rows into the blog's table shape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from retrace.errors import RetraceError
from retrace.pythia.schedule import hub_spec

COLUMNS = ("model", "other", "step", "cos", "one_minus_cos", "l2", "n_params", "bitwise_equal_tensors",
           "n_tensors", "status")
#: The file name in a study's tables directory that ``retrace report`` picks up.
TABLE_NAME = "cross_generation.parquet"

# What the checkpoint openers say when a revision or path is absent (retrace.checkpoints.hub/sources).
_MISSING_MARKS = ("has no revision", "not in the local Hub cache", "no such file or directory",
                  "repository not found")

#: ``progress(model_spec, other_spec, index, total)`` before each comparison.
Progress = Callable[[str, str, int, int], Any]


def _open_unless_missing(spec: str, cache_dir):
    """(reader, "") or, when that checkpoint does not exist, (None, "missing: …"); other errors raise."""
    from retrace.checkpoints import open_params  # torch: imported when a comparison runs

    try:
        return open_params(spec, cache_dir=cache_dir), ""
    except RetraceError as exc:
        if not _is_missing(exc):
            raise
        return None, f"missing: {exc}"


def _is_missing(exc: RetraceError) -> bool:
    text = str(exc)
    return any(mark in text for mark in _MISSING_MARKS)


def _row(model: str, other: str, step: int, status: str, result=None) -> dict[str, Any]:
    if result is None:
        return {"model": model, "other": other, "step": step, "cos": math.nan, "one_minus_cos": math.nan,
                "l2": math.nan, "n_params": 0, "bitwise_equal_tensors": 0, "n_tensors": 0, "status": status}
    return {"model": model, "other": other, "step": step, "cos": result.cos,
            "one_minus_cos": result.one_minus_cos, "l2": result.l2, "n_params": int(result.n_params),
            "bitwise_equal_tensors": int(result.n_bitwise_equal), "n_tensors": len(result.tensors),
            "status": status}


def cross_compare(
    model: str,
    against: Sequence[str],
    steps: Sequence[int],
    *,
    cache_dir: str | os.PathLike | None = None,
    intersection: bool = False,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """``model@step{N}`` vs ``other@step{N}`` for each other repo in ``against`` and each step (see the
    module doc). Rows in the order of ``against``, then ``steps``."""
    from retrace.compare.similarity import compare_params

    if not against:
        raise RetraceError("cross_compare: no repos to compare against")
    steps = sorted(dict.fromkeys(int(s) for s in steps))
    if not steps or any(s < 0 for s in steps):
        raise RetraceError(f"cross_compare: expected non-negative steps, got {steps}")
    rows, total, index = [], len(against) * len(steps), 0
    for other in against:
        for step in steps:
            a_spec, b_spec = hub_spec(model, step), hub_spec(other, step)
            if progress is not None:
                progress(a_spec, b_spec, index, total)
            index += 1
            ra, missing = _open_unless_missing(a_spec, cache_dir)
            if ra is None:
                rows.append(_row(model, other, step, missing))
                continue
            with ra:
                rb, missing = _open_unless_missing(b_spec, cache_dir)
                if rb is None:
                    rows.append(_row(model, other, step, missing))
                    continue
                with rb:
                    result = compare_params(ra, rb, intersection=intersection)
            rows.append(_row(model, other, step, "ok", result))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({"step": "int64", "n_params": "int64", "bitwise_equal_tensors": "int64",
                         "n_tensors": "int64", "cos": "float64", "one_minus_cos": "float64", "l2": "float64"})


def check_frame(frame: pd.DataFrame, where: str = "cross-generation table") -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise RetraceError(f"{where}: missing column(s) {', '.join(missing)}")
    return frame
