"""``retrace plan``: a study's downloads, disk, per-GPU memory and GPU-hours, before anything runs."""

from __future__ import annotations

import argparse


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
    p.add_argument("--configfile", default="config.yaml", help="the study config (default: config.yaml)")
    p.add_argument("--directory", "-d", default=".", help="the directory the workflow runs in (default: .)")
    p.add_argument("--throughput", metavar="JSON", help="measured MFU per GPU model (benchmarks/gpu_check.sh's "
                                                        "figures file) instead of the assumed one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from retrace.commands.cells import _workflow_root
    from retrace.grid import load_study
    from retrace.plan import read_mfu, render, study_plan

    workdir = Path(args.directory)
    config = Path(args.configfile)
    if not config.is_absolute() and not config.exists() and (workdir / config).exists():
        config = workdir / config
    study = load_study(config, root=_workflow_root(config, workdir))
    plan = study_plan(study, mfu=read_mfu(args.throughput) if args.throughput else None)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan), end="" if not args.json else "\n")
    return 0
