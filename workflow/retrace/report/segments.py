"""The per-segment reading of a study with ``models.<name>.segments``: one row per segment and data variant.

A segment model is named ``<published>-from<N>`` (``retrace.grid``) and its cells start at step N. For
each segment the table gives, per data variant, the distance at the segment's end step (the mean over
its cells when other axes vary, with their number), how many of those cells landed on the published
checkpoint bit for bit (L2 of the difference exactly 0), and the verdict's closest variant for that
segment (``retrace.report.verdict``; "none" when it is undecided or no variant was compared). Rows of
models that are not segments are left out; a study without segments has no table.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import pandas as pd

from retrace.report.frames import DATA, MODEL, fmt_num

SEGMENT_NAME = re.compile(r"^(?P<base>.+)-from(?P<start>\d+)$")
COLUMNS = ("segment", "published", "start", "end", "data", "cells", "one_minus_cos", "l2", "bitwise", "closest")


def segment_table(sim: pd.DataFrame, verdicts: Iterable = ()) -> pd.DataFrame:
    """The long table (``COLUMNS``), sorted by published run, start step and data variant."""
    winner = {v.model: (v.winner or "none") for v in verdicts}
    rows = []
    for model, sub in sim.groupby(MODEL, sort=False):
        m = SEGMENT_NAME.match(str(model))
        if m is None or int(sub["step"].min()) != int(m.group("start")):
            continue
        end = int(sub.groupby("cell")["step"].max().min())
        at = sub[sub["step"] == end]
        for variant, g in at.groupby(DATA, sort=True):
            rows.append({"segment": str(model), "published": m.group("base"), "start": int(m.group("start")),
                         "end": end, "data": str(variant), "cells": int(g["cell"].nunique()),
                         "one_minus_cos": float(g["one_minus_cos"].mean()), "l2": float(g["l2"].mean()),
                         "bitwise": int((g["l2"] == 0).sum()),
                         "closest": winner.get(str(model), "none")})
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values(["published", "start", "data"]).reset_index(drop=True)


def to_markdown(frame: pd.DataFrame) -> str:
    head = "| segment | steps | data | cells | 1 − θ Cos | L2 | bit for bit | closest |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.segment} | {r.start}→{r.end} | {r.data} | {r.cells} | {fmt_num(r.one_minus_cos)} | {fmt_num(r.l2)} "
        f"| {r.bitwise}/{r.cells} | {r.closest} |\n" for r in frame.itertuples())
    return head + body


def to_html(frame: pd.DataFrame) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r.segment)}</td><td>{r.start}→{r.end}</td><td>{esc(r.data)}</td><td>{r.cells}</td>"
        f"<td>{esc(fmt_num(r.one_minus_cos))}</td><td>{esc(fmt_num(r.l2))}</td><td>{r.bitwise}/{r.cells}</td>"
        f"<td>{esc(r.closest)}</td></tr>" for r in frame.itertuples())
    return ("<table><thead><tr><th>segment</th><th>steps</th><th>data</th><th>cells</th><th>1 − θ Cos</th>"
            f"<th>L2</th><th>bit for bit</th><th>closest</th></tr></thead><tbody>{rows}</tbody>"
            "<caption>Each segment at its end step: the mean over its cells per data variant; bit for bit = "
            "cells whose checkpoint equals the published one exactly; closest = that segment's verdict."
            "</caption></table>")
