"""``retrace cross-compare MODEL --against REPO…``: one model's checkpoints vs other repos at the same steps.

Writes one row per (other repo, step) to ``--out`` (Parquet; columns of ``retrace.compare.cross.COLUMNS``)
and optionally the blog-shaped table (rows = steps, θ Cos and L2 per other repo) to ``--markdown``;
both atomically. A step that either side lacks is recorded with status ``missing: …``, not an error.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from retrace.commands import steps_arg

    p = sub.add_parser(
        "cross-compare",
        help="one model's checkpoints against other repos (other generations, reproductions) at the same steps",
        description=(
            "Compare MODEL@stepN with REPO@stepN for every REPO of --against and every step of --steps: θ Cos, "
            "1 − θ Cos and L2 over all parameters flattened, bitwise-equal tensors. MODEL and REPO are hub "
            "repos (org/name) or anything else `retrace compare` reads as SOURCE@stepN."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="the repo whose checkpoints are compared (org/name)")
    p.add_argument("--against", nargs="+", required=True, metavar="REPO", help="the other repos")
    p.add_argument("--steps", type=steps_arg, required=True,
                   help="comma-separated steps or Pythia-schedule ranges, e.g. 0,1,2,4,1000-3000")
    p.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE / ~/.cache)")
    p.add_argument(
        "--intersection",
        action="store_true",
        help="compare only the parameters present on both sides with the same shape (default: a mismatch is an error)",
    )
    p.add_argument("--out", required=True, metavar="PATH.parquet", help="the rows, as Parquet")
    p.add_argument("--markdown", metavar="PATH.md", help="also write the table (rows = steps) as Markdown")
    p.set_defaults(func=run)


def _progress(a: str, b: str, index: int, total: int) -> None:
    print(f"cross-compare: [{index + 1}/{total}] {a} vs {b}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from retrace.compare.cross import cross_compare
    from retrace.io import atomic_open, write_parquet
    from retrace.report.generations import to_markdown

    frame = cross_compare(args.model, args.against, args.steps, cache_dir=args.cache_dir,
                          intersection=args.intersection, progress=_progress)
    write_parquet(args.out, frame)
    if args.markdown:
        with atomic_open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(to_markdown(frame))
    ok = int((frame["status"] == "ok").sum())
    print(f"cross-compare: {ok}/{len(frame)} comparisons, {len(frame) - ok} missing; wrote {args.out}")
    return 0
