"""The study's provenance tables: where each cell first breaks bit-identity, and the flagged published steps.

``divergence_frame(study, root)``: one row per trained cell (``DIVERGENCE_COLUMNS``). Against its
baseline cell — the cell with every axis outside ``cross`` at its baseline value (the one-at-a-time
design's baseline for its model × data), so a row says what its ``factor`` (the axes it changes) does —
and against the reference run itself where that run's train log is here (a built reference,
``models.<name>.build``): the first step whose weights are not bit-identical and the first whose batch
differs (``retrace.compare.diverge``; None = identical at every common step). ``flagged_frame``: the
published steps the audit flags (``retrace.audit.gate``), which the comparisons leave out.

Both are written by the workflow (``jobs.write_provenance_tables``) into results/tables/ and shown by
the report's "Provenance" section (``html_fragment``). Torch-free.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from retrace.compare.diverge import diverge
from retrace.errors import RetraceError

if TYPE_CHECKING:
    from retrace.grid import Cell, Study

DIVERGENCE_TABLE = "divergence.parquet"
FLAGGED_TABLE = "flagged_steps.parquet"
DIVERGENCE_COLUMNS = ["cell", "model", "data", "factor", "value", "baseline", "last_step",
                      "diverges_from_baseline", "batches_differ_from_baseline",
                      "diverges_from_reference", "batches_differ_from_reference", "reference_last_step"]
FLAGGED_COLUMNS = ["model", "repo", "branch", "step", "findings", "accepted"]
_AXES = ("model", "data", "parallel", "gpu_type", "attention", "deps", "seed", "steps", "precision", "engine")


def baseline_of(study: Study, cell: Cell) -> Cell:
    """The cell with every axis but the crossed ones at its baseline value (itself for a baseline cell)."""
    from retrace.grid import Cell

    values = {a: getattr(cell, a) for a in _AXES}
    for axis in _AXES:
        if axis not in study.cross:
            values[axis] = study.baseline[axis]
    base = Cell(**values)
    try:
        return study.cell(base.id)
    except RetraceError:
        return base  # a factorial study need not hold it; its run is then simply absent


def _factor(cell: Cell, base: Cell) -> tuple[str, str]:
    """The axes (replica and reanchor included) on which ``cell`` differs from its baseline, and its values."""
    from retrace.grid import AXES

    changed = [a for a in AXES if getattr(cell, a) != getattr(base, a)]
    if not changed:
        return "baseline", ""
    value = ", ".join(cell.parallel.token if a == "parallel" else str(getattr(cell, a)) for a in changed)
    return "+".join(changed), value


def divergence_frame(study: Study, root: str | Path = ".") -> pd.DataFrame:
    from retrace import paths
    from retrace.rundir import RunDir

    root = Path(root)
    rows = []
    for cell in study.cells():
        run = root / paths.run_dir(cell.id)
        if not RunDir(run).train_log.is_file():
            continue
        base = baseline_of(study, cell)
        factor, value = _factor(cell, base)
        row = {"cell": cell.id, "model": cell.model.name, "data": cell.data.name, "factor": factor,
               "value": value, "baseline": base.id}
        base_run = root / paths.run_dir(base.id)
        vs_base = diverge(run, base_run) if RunDir(base_run).train_log.is_file() else None
        ref_run = root / paths.build_run_dir(cell.model.name) if cell.model.build is not None else None
        vs_ref = diverge(run, ref_run) if ref_run is not None and RunDir(ref_run).train_log.is_file() else None
        row["last_step"] = vs_base.last_common if vs_base else None  # None: no baseline log to compare
        row["diverges_from_baseline"] = vs_base.first_param if vs_base else None
        row["batches_differ_from_baseline"] = vs_base.first_batch if vs_base else None
        row["diverges_from_reference"] = vs_ref.first_param if vs_ref else None
        row["batches_differ_from_reference"] = vs_ref.first_batch if vs_ref else None
        row["reference_last_step"] = vs_ref.last_common if vs_ref else None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=DIVERGENCE_COLUMNS)
    for col in DIVERGENCE_COLUMNS[6:]:
        frame[col] = frame[col].astype("Int64")
    return frame


def flagged_frame(study: Study, root: str | Path = ".") -> pd.DataFrame:
    """Every flagged published step of the study's references (from their findings files)."""
    from retrace import paths
    from retrace.audit.gate import describe, read_findings
    from retrace.pythia.schedule import step_of

    rows = []
    for m in study.used_models():
        path = Path(root) / paths.findings(m.reference_key)
        if not path.is_file():
            continue
        for branch, found in read_findings(path)["flagged"].items():
            rows.append({"model": m.name, "repo": m.reference, "branch": branch, "step": step_of(branch),
                         "findings": describe(found), "accepted": branch in m.accept})
    frame = pd.DataFrame(rows, columns=FLAGGED_COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    return frame


def _show(x) -> str:
    return "never" if pd.isna(x) else str(int(x))


def factor_summary(div: pd.DataFrame) -> pd.DataFrame:
    """Factor × value rows, one column per model / data: the step each cell first leaves its baseline's
    weights (``never`` = bit-identical through the last step); the baseline rows give the step the
    baseline first leaves the reference's."""
    if div.empty:
        return pd.DataFrame()
    out = div.assign(where=div["model"] + " / " + div["data"])
    def first(r) -> str:
        if r.factor != "baseline":
            return "no baseline log" if pd.isna(r.last_step) else _show(r.diverges_from_baseline)
        return "no reference log" if pd.isna(r.reference_last_step) else _show(r.diverges_from_reference)

    out["first"] = [first(r) for r in out.itertuples()]
    out["value"] = out["value"].where(out["factor"] != "baseline", "vs the reference")
    wide = out.pivot_table(index=["factor", "value"], columns="where", values="first", aggfunc="first")
    return wide.reset_index().fillna("—")


def html_fragment(div: pd.DataFrame | None, flagged: pd.DataFrame | None) -> str:
    from retrace.report.tables import to_html

    parts = []
    if div is not None and not div.empty:
        parts.append("<p>First divergent step: the first step after which a cell's weights are no longer "
                     "bit-identical to its baseline cell's (per-step exact weight checksums in the train "
                     "logs, retrace diverge); for the baseline cells, to the reference run's own. "
                     "<i>never</i> = bit-identical through the last step.</p>")
        parts.append(to_html(factor_summary(div), caption="where in training each factor first breaks "
                                                          "bit-identity"))
        differ = div[div["batches_differ_from_baseline"].notna() & ~div["factor"].str.contains("data")]
        if len(differ):
            shown = ", ".join(f"{c} (step {int(s)})" for c, s in
                              zip(differ["cell"], differ["batches_differ_from_baseline"], strict=True))
            parts.append(f"<p><b>Batches differ from the baseline's</b> where they should not: {html.escape(shown)}</p>")
        else:
            parts.append("<p>Every cell trained on exactly its baseline cell's batches at every step "
                         "(per-step batch hashes).</p>")
    if flagged is not None:
        if flagged.empty:
            parts.append("<p>The audit flags no published step of the references.</p>")
        else:
            parts.append(to_html(flagged.astype(str), caption="published steps the audit flags: left out of "
                                                              "the comparisons unless accepted"))
    return "\n".join(parts)


def read_fragment(tables: str | Path) -> str | None:
    """The report's Provenance section from the tables in ``tables``, or None when neither is there."""
    tables = Path(tables)
    div_path, flagged_path = tables / DIVERGENCE_TABLE, tables / FLAGGED_TABLE
    if not div_path.is_file() and not flagged_path.is_file():
        return None
    div = pd.read_parquet(div_path) if div_path.is_file() else None
    flagged = pd.read_parquet(flagged_path) if flagged_path.is_file() else None
    return html_fragment(div, flagged)
