"""One published model's checkpoints against other repos at the same steps (the blog's "versus gen 1/2").

``cross_compare(model, against, steps)`` compares ``model@step{N}`` with ``other@step{N}`` for every
other repo and step (``retrace.checkpoints.open_params`` + ``retrace.similarity.compare_params``) and
returns one row per (other, step)::

    model, other, step, cos, one_minus_cos, l2, n_params, bitwise_equal_tensors, n_tensors, status

``status`` is ``"ok"``, or ``"missing: <why>"`` when either side has no such step (no branch on the Hub,
not in an offline hub cache, no such local path): the row is recorded with NaN figures rather than
ending the run, since generations were saved on different schedules (pythia-*-v0 has no step 0 and no
log-spaced steps). Any other failure (a corrupt download, parameter names or shapes that differ
without ``intersection=True``) is an error.

``render_wide`` turns the rows into the blog's table shape: one row per step, θ Cos and L2 per other
repo; ``to_markdown``/``to_html`` format it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from retrace.errors import RetraceError
from retrace.report import tables as T
from retrace.report.frames import fmt_cos, fmt_num

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


def _spec(repo: str, step: int) -> str:
    return f"{repo}@step{step}"


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
    from retrace.similarity import compare_params

    if not against:
        raise RetraceError("cross_compare: no repos to compare against")
    steps = sorted(dict.fromkeys(int(s) for s in steps))
    if not steps or any(s < 0 for s in steps):
        raise RetraceError(f"cross_compare: expected non-negative steps, got {steps}")
    rows, total, index = [], len(against) * len(steps), 0
    for other in against:
        for step in steps:
            a_spec, b_spec = _spec(model, step), _spec(other, step)
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


def _cell(row: pd.Series | None, what: str) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return "missing"
    if what == "cos":
        return fmt_cos(float(row["one_minus_cos"]))
    return fmt_num(float(row["l2"]))


def render_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows = steps, columns = θ Cos and L2 per other repo (one block per model when there are several),
    formatted for people: θ Cos to enough decimals, L2 to 4 significant digits, ``missing`` where a side
    lacks the step."""
    check_frame(frame)
    models = list(dict.fromkeys(frame["model"].astype(str)))
    out_rows = []
    columns = ["model", "step"] if len(models) > 1 else ["step"]
    others_all: list[str] = []
    for model in models:
        for o in frame.loc[frame["model"] == model, "other"].astype(str):
            if o not in others_all:
                others_all.append(o)
    for other in others_all:
        columns += [f"θ Cos vs {other}", f"L2 vs {other}"]
    for model in models:
        sub = frame[frame["model"] == model]
        by_key = {(str(r["other"]), int(r["step"])): r for _, r in sub.iterrows()}
        for step in sorted(sub["step"].astype(int).unique()):
            row = [model, int(step)] if len(models) > 1 else [int(step)]
            for other in others_all:
                r = by_key.get((other, int(step)))
                row += [_cell(r, "cos"), _cell(r, "l2")]
            out_rows.append(row)
    return pd.DataFrame(out_rows, columns=columns)


def caption(frame: pd.DataFrame) -> str:
    models = ", ".join(dict.fromkeys(frame["model"].astype(str)))
    n_missing = int((frame["status"] != "ok").sum())
    text = (f"{models} at each step against the same step of each other repo: θ Cos and L2 over all "
            "parameters flattened (float64).")
    if n_missing:
        text += f" {n_missing} comparison(s) missing: a side has no checkpoint at that step."
    return text


def to_markdown(frame: pd.DataFrame) -> str:
    """The wide table as GitHub Markdown, with its caption."""
    wide = render_wide(frame)
    labels = 2 if "model" in wide.columns else 1
    return f"{T.to_markdown(wide, labels)}\n{caption(frame)}\n"


def to_html(frame: pd.DataFrame) -> str:
    """The wide table as an HTML fragment, with its caption."""
    return T.to_html(render_wide(frame), caption=caption(frame))
