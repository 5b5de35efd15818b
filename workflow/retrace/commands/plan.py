"""``retrace plan``: a study's downloads, disk, per-GPU memory and GPU-hours, before anything runs."""

from __future__ import annotations

import argparse

from retrace.commands._study_args import add_study_arguments, study_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="what a study will cost: downloads, disk, per-GPU memory and GPU-hours per cell and in total",
        description=(
            "Validate the study and print its plan (retrace.plan): the Pile shards and published checkpoints "
            "it downloads, the disk its data, checkpoints, resume states and tables take, each cell's per-GPU "
            "memory against its GPU's, and the GPU-hours from the training FLOPs and each GPU's datasheet "
            "peak at an assumed (or, with --throughput, measured) utilisation. Every figure's source is printed."
        ),
    )
    add_study_arguments(p)
    p.add_argument("--throughput", metavar="JSON", help="measured MFU per GPU model (benchmarks/gpu_check.sh's "
                                                        "figures file) instead of the assumed one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from retrace.plan import read_mfu, render, study_plan

    study = study_from_args(args)
    plan = study_plan(study, mfu=read_mfu(args.throughput) if args.throughput else None)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan), end="" if not args.json else "\n")
    return 0
