"""``retrace audit REPO [REPO…]``: clones, missing revisions and format changes in published checkpoint repos.

From Hub metadata alone (per-revision file lists with LFS sha256; no weights downloaded), or offline
from a local huggingface_hub cache (``--offline``). ``--weights`` also reads the weights: θ Cos between
consecutive steps (checkpoints that do not move or move backwards) and safetensors vs .bin in revisions
that hold both. Writes the summary (incidents grouped by kind) to stdout and ``--summary``, and one row
per repo × revision × weight file to ``--parquet``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="find cloned, missing and inconsistent checkpoints in published repos (Hub metadata)",
        description=(
            "Audit published checkpoint repos (org/name): revisions whose weights are byte-identical to "
            "another revision or repo (by LFS sha256), revisions missing from the Pythia schedule (step0, "
            "1, 2, 4 … 512, 1000 … 143000), weight formats that change between revisions or coexist in one. "
            "Online through huggingface_hub's API (no weight download), or --offline from the local hub "
            "cache. --weights reads the weights too (θ Cos step to step; safetensors vs .bin)."
        ),
    )
    p.add_argument("repos", nargs="+", metavar="REPO", help="Hub repo id, e.g. EleutherAI/pythia-2.8b")
    p.add_argument(
        "--cache-dir", default=None, help="hub cache (default: $HF_HUB_CACHE / ~/.cache/huggingface/hub)"
    )
    p.add_argument(
        "--offline", action="store_true", help="read the local hub cache only (also: HF_HUB_OFFLINE=1)"
    )
    p.add_argument(
        "--weights",
        action="store_true",
        help="also read the weights: step-to-step θ Cos (not moving / moving backwards), safetensors vs .bin",
    )
    p.add_argument(
        "--steps",
        action="append",
        metavar="LIST",
        help="only these steps, e.g. 0,1,2,1000-5000 (ranges follow the Pythia schedule; main is always kept)",
    )
    p.add_argument(
        "--max-step",
        type=int,
        default=None,
        help="the last expected step (default 143000): shorter runs are not reported as missing the rest",
    )
    p.add_argument(
        "--schedule",
        choices=("pythia", "none"),
        default="pythia",
        help="expected revisions: the Pythia schedule, or none (no missing/unexpected checks)",
    )
    p.add_argument(
        "--still-threshold",
        type=float,
        default=0.0,
        metavar="X",
        help="with --weights: also call a checkpoint 'not moving' when 1 − θ Cos to the previous is ≤ X "
        "(default 0: only identical parameters)",
    )
    p.add_argument("--workers", type=int, default=8, help="parallel Hub metadata requests (default 8)")
    p.add_argument("--parquet", metavar="PATH", help="write one row per repo × revision × weight file")
    p.add_argument("--summary", metavar="PATH", help="write the readable summary (also printed)")
    p.add_argument("--json", metavar="PATH", help="write the incidents as JSON")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.add_argument(
        "--fail-on-incident", action="store_true", help="exit with status 1 if any incident is found"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from retrace.audit import FINAL_STEP, audit, make_source, parse_steps
    from retrace.errors import RetraceError
    from retrace.io import atomic_open, write_json, write_parquet

    if args.workers < 1:
        raise RetraceError(f"--workers must be ≥ 1, got {args.workers}")
    max_step = FINAL_STEP if args.max_step is None else args.max_step
    if max_step < 0:
        raise RetraceError(f"--max-step must be ≥ 0, got {max_step}")
    report = audit(
        args.repos,
        make_source(offline=args.offline, cache_dir=args.cache_dir),
        steps=parse_steps(args.steps),
        max_step=max_step,
        schedule=args.schedule,
        weights=args.weights,
        still_threshold=args.still_threshold,
        workers=args.workers,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    text = report.render()
    if args.parquet:
        write_parquet(args.parquet, report.frame())
    if args.summary:
        with atomic_open(args.summary, "w", encoding="utf-8") as fh:
            fh.write(text)
    if args.json:
        write_json(args.json, report.to_dict())
    if not args.quiet:
        sys.stdout.write(text)
    return 1 if args.fail_on_incident and report.incidents else 0
