"""``retrace aggregate``: join every cell's similarity and train-log Parquet with its axes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="join every cell's similarity and train log with its axes into results/tables/",
        description=(
            "Read results/cells.parquet and, for every cell, results/runs/<cell>/{similarity,"
            "similarity_tensors,train_log}.parquet; write the same three tables for the whole study, each "
            "row prefixed with the cell id and every axis column."
        ),
    )
    p.add_argument("--cells", required=True, help="the cells table (results/cells.parquet)")
    p.add_argument("--runs", required=True, help="directory holding one directory per cell (results/runs)")
    p.add_argument("--out", required=True, help="output directory (results/tables/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.report.aggregate import aggregate

    aggregate(args.cells, args.runs, args.out)
    return 0
