"""The report's "Versus other generations" section: the rows of retrace.compare.cross in the blog's shape.

``render_wide`` gives one row per step with θ Cos and L2 per other repo; ``to_markdown``/``to_html``
format it with its caption.
"""

from __future__ import annotations

import pandas as pd

from retrace.compare.cross import check_frame
from retrace.report import tables as T
from retrace.report.frames import fmt_cos, fmt_num


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
