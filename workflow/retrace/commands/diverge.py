"""``retrace diverge RUN_A RUN_B``: the first step at which two runs are no longer bit-identical."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diverge",
        help="the first step at which two runs are no longer bit-identical (from their fingerprints)",
        description=(
            "Read the per-step fingerprints of two runs' train logs (the weights' exact checksum and the "
            "batch hash, retrace.train.fingerprints) and print the first step after which their weights "
            "differ, and the first step whose batches differ. RUN is a run directory (results/runs/<cell>, "
            "resources/build/<model>/run) or its train_log.parquet."
        ),
    )
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.compare.diverge import diverge

    print(diverge(args.run_a, args.run_b).render())
    return 0
