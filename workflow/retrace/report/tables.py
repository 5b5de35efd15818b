"""One table per factor, like the seeds' blog: rows = factor values, columns = θ Cos / L2 per data variant.

How the other axes are averaged. For a factor F (say ``gas``) of one model at one step, the cells are
split into *slices*: groups equal on every axis but F and ``data``. A slice is *complete* when it holds
every value of F with every data variant seen for that model at that step. Each table entry is the
mean over the complete slices, so every row of a table averages over exactly the same conditions:

* a factorial design makes every slice complete: the entry is the marginal mean over all the other
  axes' combinations;
* a one-at-a-time design (a baseline plus cells changing one axis each) has one complete slice for
  F, the baseline values of the other axes: the entry is the baseline's own value, as in the blog.

The parallel layout (gpus, pdbs, gas) is one axis of the grid stored as three columns: it is one factor,
``parallel``, whose rows are the layouts, sorted by gas. When no slice is complete (an irregular grid), the entry falls back to the mean over every cell with
that factor value and data variant, and the table is flagged ``balanced = False``.

θ Cos is shown as 1 − mean(1 − cos) (the same as mean(cos), without cancellation); L2 is the
arithmetic mean. ``n`` is the number of cells averaged into an entry.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from retrace.errors import RetraceError
from retrace.report.frames import DATA, MODEL, axis_columns, describe, fmt_cos, fmt_num, show, sorted_values

LONG_COLUMNS = ["model", "factor", "value", "data", "step", "n", "slices", "balanced", "cos", "one_minus_cos", "l2"]


def final_common_step(sub: pd.DataFrame) -> int:
    """The largest step every cell of ``sub`` has reached."""
    return int(sub.groupby("cell")["step"].max().min())


def default_steps(sim: pd.DataFrame) -> list[int]:
    """Each model's final common step."""
    return sorted({final_common_step(sub) for _, sub in sim.groupby(MODEL)})


def check_steps(sim: pd.DataFrame, steps: Iterable[int]) -> list[int]:
    """The chosen steps, sorted; a step no cell has is an error naming it."""
    steps = sorted({int(s) for s in steps})
    have = set(sim["step"].astype(int))
    missing = [s for s in steps if s not in have]
    if missing:
        near = sorted(have)
        raise RetraceError(
            f"--steps: no checkpoint at step(s) {', '.join(map(str, missing))}; steps present: "
            f"{', '.join(map(str, near[:12]))}{' ...' if len(near) > 12 else ''}"
        )
    return steps


#: The parallel layout is one axis of the grid stored as three columns (gpus·pdbs·gas is fixed, so they
#: move together): it is one factor, shown and sorted by gas, then pdbs, then gpus.
LAYOUT = ("gas", "pdbs", "gpus")


@dataclass(frozen=True)
class Factor:
    """One factor of the grid: a single axis column, or the parallel layout's columns together.

    Rows are sorted by the columns in order (each in natural order: numbers numerically).
    """

    name: str
    columns: tuple[str, ...]

    def label(self, values: Sequence[object]) -> str:
        return show(values[0]) if len(self.columns) == 1 else describe(values, self.columns)


def factors(sim: pd.DataFrame) -> list[Factor]:
    """The factors that take more than one value within some model (model and data never are factors)."""
    axes = [a for a in axis_columns(sim) if a not in (MODEL, DATA)]

    def varies(cols: list[str]) -> bool:
        return bool(cols) and bool((sim.groupby(MODEL)[cols].nunique(dropna=False).max(axis=1) > 1).any())

    out = []
    layout = [c for c in LAYOUT if c in axes]
    if varies(layout):
        out.append(Factor("parallel", tuple(layout)))
    for axis in axes:
        if axis not in LAYOUT and varies([axis]):
            out.append(Factor(axis, (axis,)))
    return out


def _keys(frame: pd.DataFrame, cols: Sequence[str]) -> list[tuple[str, ...]]:
    return list(frame[list(cols)].map(show).itertuples(index=False, name=None)) if cols else [()] * len(frame)


def balanced_slices(at: pd.DataFrame, factor: Factor) -> tuple[pd.DataFrame, int, bool]:
    """The rows of the complete slices for ``factor`` (see the module doc), their count, and whether any was."""
    others = [a for a in axis_columns(at) if a not in (MODEL, DATA, *factor.columns)]
    pairs = list(zip(_keys(at, factor.columns), at[DATA].map(show), strict=True))
    full = set(pairs)
    labels = _keys(at, others)
    seen: dict[tuple, set] = {}
    for label, pair in zip(labels, pairs, strict=True):
        seen.setdefault(label, set()).add(pair)
    complete = {label for label, got in seen.items() if got == full}
    if not complete:
        return at, 0, False
    return at[[label in complete for label in labels]], len(complete), True


def factor_table(sim: pd.DataFrame, factor: Factor, steps: Sequence[int]) -> pd.DataFrame:
    """The long (tidy) factor table: one row per model × factor value × data variant × step."""
    cols = list(factor.columns)
    rows = []
    for model, sub in sim.groupby(MODEL, sort=True):
        if len(sub.drop_duplicates(cols)) < 2:
            continue
        for step in steps:
            at = sub[sub["step"] == step]
            if at.empty:
                continue
            chosen, n_slices, balanced = balanced_slices(at, factor)
            for key, g in chosen.groupby([*cols, DATA], dropna=False, sort=False):
                omc = float(g["one_minus_cos"].mean())
                rows.append(
                    {
                        "model": model, "factor": factor.name, "value": factor.label(key[:-1]),
                        **dict(zip(cols, key[:-1], strict=True)), "data": key[-1], "step": int(step),
                        "n": len(g), "slices": n_slices, "balanced": balanced,
                        "cos": 1.0 - omc, "one_minus_cos": omc, "l2": float(g["l2"].mean()),
                    }
                )
    long = pd.DataFrame(rows, columns=[*LONG_COLUMNS[:3], *cols, *LONG_COLUMNS[3:]])
    if long.empty:
        return long
    ranks = [f"_{c}" for c in (*cols, DATA)]
    for c, r in zip((*cols, DATA), ranks, strict=True):
        rank = {show(v): i for i, v in enumerate(sorted_values(long[c]))}
        long[r] = long[c].map(show).map(rank)
    order = ["model", *ranks[:-1], "step", ranks[-1]]
    return long.sort_values(order).drop(columns=ranks).reset_index(drop=True)


def _wide(long: pd.DataFrame, factor: Factor, formatted: bool) -> pd.DataFrame:
    cols = list(factor.columns)
    variants = sorted_values(long["data"])
    steps = sorted(long["step"].unique())
    out = []
    for _, g in long.groupby(["model", "value"], sort=False, dropna=False):
        first = g.iloc[0]
        row: dict = {"model": first["model"], **{c: show(first[c]) if formatted else first[c] for c in cols}}
        ns = sorted(set(g["n"]))
        row["n"] = ", ".join(map(str, ns)) if formatted else (ns[0] if len(ns) == 1 else None)
        for step in steps:
            for data in variants:
                hit = g[(g["step"] == step) & (g["data"] == data)]
                tag = f"{show(data)} {{}} @ {step}"
                if formatted:
                    row[tag.format("θ Cos")] = fmt_cos(hit["one_minus_cos"].iloc[0]) if len(hit) else "–"
                    row[tag.format("L2")] = fmt_num(hit["l2"].iloc[0]) if len(hit) else "–"
                else:
                    row[tag.format("cos")] = hit["cos"].iloc[0] if len(hit) else None
                    row[tag.format("1-cos")] = hit["one_minus_cos"].iloc[0] if len(hit) else None
                    row[tag.format("L2")] = hit["l2"].iloc[0] if len(hit) else None
        out.append(row)
    return pd.DataFrame(out)


def wide_numeric(long: pd.DataFrame, factor: Factor) -> pd.DataFrame:
    """The factor table for CSV: one row per model × factor value, full-precision numbers."""
    return _wide(long, factor, formatted=False)


def wide_display(long: pd.DataFrame, factor: Factor) -> pd.DataFrame:
    """The factor table for people: θ Cos to enough decimals to see 1 − θ Cos, L2 to 4 digits."""
    return _wide(long, factor, formatted=True)


def averaging_note(long: pd.DataFrame) -> str:
    """One paragraph saying how the entries of this table were averaged."""
    factor = str(long["factor"].iloc[0])
    groups: dict[int, list[str]] = {}
    for (model, step), g in long.groupby(["model", "step"], sort=False):
        groups.setdefault(int(g["slices"].iloc[0]) if bool(g["balanced"].iloc[0]) else 0, []).append(
            f"{model} @ {step}"
        )
    parts = []
    for slices, where in sorted(groups.items()):
        if slices:
            parts.append(f"{', '.join(where)}: mean over the {slices} combination(s) of the other axes that were "
                         f"run with every value of {factor} and every data variant")
        else:
            parts.append(f"{', '.join(where)}: UNBALANCED (no combination of the other axes was run with every "
                         f"value of {factor} and every data variant), mean over all cells of each entry")
    return (f"Rows: values of {factor}; columns: θ Cos (= 1 − mean(1 − cos)) and mean L2 per data variant at "
            f"each step; n = cells per entry. " + "; ".join(parts) + ".")


def to_markdown(frame: pd.DataFrame, labels: int = 1) -> str:
    """A GitHub-flavoured Markdown table (no dependency on tabulate); the first ``labels`` columns left-aligned."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" if i < labels else "---:" for i in range(len(frame.columns))) + "|"
    body = ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def to_html(frame: pd.DataFrame, caption: str = "") -> str:
    """An HTML ``<table>`` fragment, escaped, with an optional caption."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>\n"
        for row in frame.itertuples(index=False)
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="factor">{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n'
