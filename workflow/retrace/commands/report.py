"""``retrace report``: factor tables, trajectory figures, the verdict and index.html."""

from __future__ import annotations

import argparse

from retrace.commands import steps_arg
from retrace.errors import RetraceError


def parse_documented(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        model, sep, variant = item.partition("=")
        if not sep or not model or not variant:
            raise RetraceError(f"--documented: expected MODEL=VARIANT, got {item!r}")
        out[model] = variant
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="factor tables, trajectory figures and the data-variant verdict from results/tables/",
        description=(
            "Write OUT/index.html, OUT/verdict.{json,txt}, OUT/tables/factor_<axis>.{csv,md,html} and "
            "OUT/figures/*.png from the aggregated tables. The directory is replaced as a whole."
        ),
    )
    p.add_argument("--tables", required=True, help="directory written by `retrace aggregate` (results/tables)")
    p.add_argument("--out", required=True, help="report directory (results/report/)")
    p.add_argument(
        "--steps",
        type=steps_arg,
        default=None,
        help="comma-separated steps for the tables and per-step counts (default: each model's final common step)",
    )
    p.add_argument(
        "--documented",
        action="append",
        default=[],
        metavar="MODEL=VARIANT",
        help="the data variant a model is published as; the verdict says whether it agrees (repeatable)",
    )
    p.add_argument(
        "--references",
        action="append",
        default=None,
        metavar="PATH",
        help="fetched reference files or directories (resources/references/<repo>): the report lists each "
        "one's repo, step, commit and whether it was verified (repeatable)",
    )
    p.add_argument(
        "--primary-step",
        type=int,
        default=None,
        help="the one step the combined verdict tests, declared by the study before it ran (default: Holm over all steps)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.report.build import build_report

    build_report(args.tables, args.out, args.steps, parse_documented(args.documented), references=args.references,
                 primary_step=args.primary_step)
    return 0
