"""``retrace compare-run``: one cell's checkpoints against the published checkpoints, step by step."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare-run",
        help="θ Cos and L2 of every checkpoint of a run against the published checkpoint of the same step",
        description=(
            "For every checkpoint in RUN/checkpoints/manifest.json, compare the parameters with the published "
            "checkpoint of the same step (float64, streamed). Writes one row per step (--out) and one row per "
            "step and tensor (--tensors-out), atomically."
        ),
    )
    p.add_argument("--run", required=True, help="the cell's run directory (results/runs/<cell>)")
    p.add_argument("--reference", required=True, help="the published run: a hub repo id or a local reference")
    p.add_argument(
        "--reference-dir",
        default=None,
        help="directory holding the fetched published steps as step{N}.safetensors "
        "(resources/references/<repo>); without it each step is opened as REFERENCE@step{N}",
    )
    p.add_argument("--out", required=True, help="per-step table (results/runs/<cell>/similarity.parquet)")
    p.add_argument(
        "--tensors-out",
        default=None,
        help="per-tensor table (default: similarity_tensors.parquet beside --out)",
    )
    p.add_argument(
        "--findings",
        default=None,
        help="the reference's audit findings (resources/audit/<repo>/findings.json, retrace.audit.gate): "
        "flagged published steps are left out",
    )
    p.add_argument(
        "--accept",
        action="append",
        default=[],
        metavar="BRANCH",
        help="a flagged branch compared anyway (the study's models.<name>.accept); repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.compare.run import write_compare_run

    skip = None
    if args.findings:
        from retrace.audit.gate import describe, flagged_steps, read_findings

        found = flagged_steps(read_findings(args.findings), args.accept)
        skip = {step: describe(f) for step, f in found.items()}
    tensors_out = args.tensors_out or Path(args.out).with_name("similarity_tensors.parquet")
    write_compare_run(args.run, args.reference, args.out, tensors_out, args.reference_dir, skip=skip)
    return 0
