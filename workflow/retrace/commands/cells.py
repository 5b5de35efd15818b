"""``retrace cells``: list a study's cells and the state of each, read from disk."""

from __future__ import annotations

import argparse

from retrace.commands._study_args import add_study_arguments, study_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cells",
        help="list the study's cells and their state (done / failed / running / pending)",
        description=(
            "Validate the study config, expand it into cells and print one line per cell: its state read "
            "from the files under the working directory, its id and a detail. done = checkpoints/manifest.json "
            "and similarity.parquet exist; failed = its train or compare log ends with the workflow's failure "
            "line, or a job of it was interrupted (a Snakemake incomplete marker, no Snakemake running, nothing "
            "changed for --recent seconds); running = an incomplete marker while Snakemake holds its lock or "
            "the cell's files changed within --recent seconds; pending = the rest (not started, partly "
            "trained, or trained and not yet compared). See retrace.cell_state."
        ),
    )
    add_study_arguments(p)
    p.add_argument("--recent", type=float, default=None, metavar="SECONDS",
                   help="an incomplete cell whose files changed this recently counts as running, not "
                        "interrupted (default: 600)")
    p.add_argument("--state", choices=("done", "failed", "running", "pending"), action="append",
                   help="only list cells in this state (repeatable)")
    p.add_argument("--axes", action="store_true", help="also print every axis value")
    p.add_argument("--no-diverge", action="store_true",
                   help="do not read the train logs for each cell's first divergent step against its baseline "
                        "cell (retrace diverge; shown for every cell whose and whose baseline's train log exist)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from retrace.cell_state import RECENT_SECONDS, cell_state
    from retrace.launch import start_fetch_logs

    workdir = Path(args.directory)
    study = study_from_args(args)
    recent = RECENT_SECONDS if args.recent is None else args.recent
    counts: Counter[str] = Counter()
    divergence = {} if args.no_diverge else _divergence(study, workdir)
    for cell in study.cells():
        st = cell_state(cell.id, workdir, recent=recent, upstream=start_fetch_logs(cell))
        counts[st.state] += 1
        if args.state and st.state not in args.state:
            continue
        line = f"{st.state:<8} {cell.id}"
        if args.axes:
            line += "  " + " ".join(f"{k}={v}" for k, v in cell.row().items() if k != "cell")
        print(f"{line}  ({st.detail})" + (f"  [{divergence[cell.id]}]" if cell.id in divergence else ""))
    summary = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "pending"))
    print(f"# study {study.name}: {len(study.cells())} cells: {summary}")
    return 0


def _divergence(study, workdir) -> dict[str, str]:
    """cell id → where it first leaves its baseline cell's weights (cells with both train logs)."""
    import pandas as pd

    from retrace.report.provenance import divergence_frame

    out = {}
    for row in divergence_frame(study, workdir).itertuples():
        if row.factor == "baseline":
            if not pd.isna(row.diverges_from_reference):
                out[row.cell] = f"baseline; diverges from the reference at step {int(row.diverges_from_reference)}"
            elif not pd.isna(row.reference_last_step):
                out[row.cell] = f"baseline; bit-identical to the reference through step {int(row.reference_last_step)}"
            continue
        if pd.isna(row.last_step):
            continue
        first = row.diverges_from_baseline
        out[row.cell] = (f"diverges from the baseline at step {int(first)}" if not pd.isna(first)
                         else f"bit-identical to the baseline through step {int(row.last_step)}")
    return out
