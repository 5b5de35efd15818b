"""``retrace compare A B``: θ Cos, 1 − θ Cos and L2 between two checkpoints, and per tensor.

Output formats:

* default: a table on stdout — the totals, then one row per tensor (all of them in A's order, or the
  ``--top N`` most different by ``--sort``);
* ``--json``: one JSON object on stdout instead of the table: the totals (``cos``, ``one_minus_cos``,
  ``l2``, ``n_params``, ``norm_a``, ``norm_b``, ``max_abs_diff``, ...), ``tensors`` (one object per
  tensor, every column of the table) and ``skipped``; NaN (undefined cos of a zero tensor) is ``null``;
* ``--parquet PATH``: the per-tensor rows (columns of ``SimilarityResult.tensor_frame()``), written
  atomically. The totals are stored in the file's metadata rather than as a fake tensor row:
  ``pandas.read_parquet(PATH).attrs["similarity"]`` (pandas keeps ``DataFrame.attrs`` as JSON under the
  ``PANDAS_ATTRS`` key of the Parquet schema metadata, readable with pyarrow too).
"""

from __future__ import annotations

import argparse
import math
import sys

SORT_KEYS = ("one_minus_cos", "l2", "max_abs_diff")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="θ Cos, 1 − θ Cos and L2 between two checkpoints (all parameters, and per tensor)",
        description=(
            "Compare the parameters of two checkpoints, streamed tensor by tensor in float64: θ Cos, 1 − θ Cos "
            "and L2 over all parameters flattened (buffers such as rotary inv_freq are not parameters), and "
            "per tensor cos, L2, max |Δ|, bitwise equality and std ratio (std_b / std_a). A and B are anything "
            "retrace reads: a .safetensors/.bin file, a Hugging Face or GPT-NeoX directory, org/repo@stepN."
        ),
    )
    p.add_argument("a", metavar="A", help="first checkpoint")
    p.add_argument("b", metavar="B", help="second checkpoint")
    p.add_argument(
        "--intersection",
        action="store_true",
        help="compare only the parameters present in both with the same shape, and list the rest "
        "(default: any difference in names or shapes is an error)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    out.add_argument("--quiet", action="store_true", help="print nothing (use with --parquet)")
    p.add_argument("--parquet", metavar="PATH", help="also write the per-tensor rows as Parquet (totals in its metadata)")
    p.add_argument(
        "--forensics",
        action="store_true",
        help="also read the per-tensor rows as a step-0 investigation: bitwise-identical tensors by kind, "
        "std ratios by layer type, and whether B looks like the same init scheme with another RNG",
    )
    p.add_argument("--top", type=int, metavar="N", help="show only the N most different tensors (see --sort)")
    p.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default="one_minus_cos",
        help="what 'most different' means for --top (default: one_minus_cos; undefined values last)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from retrace.compare.similarity import compare_sources
    from retrace.errors import RetraceError

    if args.top is not None and args.top < 0:
        raise RetraceError(f"--top must be >= 0, got {args.top}")
    progress = _progress_line if sys.stderr.isatty() and not args.quiet else None
    result = compare_sources(args.a, args.b, intersection=args.intersection, progress=progress)
    if progress is not None:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.parquet:
        from retrace.io import write_parquet

        write_parquet(args.parquet, result.tensor_frame())
    report = None
    if args.forensics:
        from retrace.forensics import read_similarity

        report = read_similarity(result)
    if args.json:
        payload = result.to_dict()
        if report is not None:
            payload["forensics"] = report.to_dict()
        print(json.dumps(payload, indent=2, allow_nan=False))
    elif not args.quiet:
        print(format_table(result, top=args.top, sort=args.sort))
        if report is not None:
            print()
            print(report.render())
    return 0


def _progress_line(name: str, done: int, total: int) -> None:
    print(f"\r\033[Kcompare: {100 * done / max(total, 1):5.1f}%  {name}", end="", file=sys.stderr, flush=True)


def _num(x: float, fmt: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _sort_key(key: str):
    def k(t):
        v = getattr(t, key)
        return (math.isnan(v), -v if not math.isnan(v) else 0.0)

    return k


def format_table(result, *, top: int | None = None, sort: str = "one_minus_cos") -> str:
    """The human-readable report: totals, skipped names, then the per-tensor rows."""
    lines = [
        f"A            {result.source_a}",
        f"B            {result.source_b}",
        f"θ Cos        {_num(result.cos, '.15f')}",
        f"1 − θ Cos    {_num(result.one_minus_cos, '.6e')}",
        f"L2           {_num(result.l2, '.6e')}",
        f"max |Δ|      {_num(result.max_abs_diff, '.6e')}",
        f"‖A‖, ‖B‖     {_num(result.norm_a, '.6e')}, {_num(result.norm_b, '.6e')}",
        f"n_params     {result.n_params:,} in {len(result.tensors)} tensors "
        f"({result.n_bitwise_equal} bitwise equal)",
    ]
    for label, names in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
        if names:
            lines.append(f"skipped, {label} ({len(names)}): {', '.join(names)}")
    if result.shape_mismatch:
        items = [f"{k} {list(sa)} vs {list(sb)}" for k, (sa, sb) in result.shape_mismatch.items()]
        lines.append(f"skipped, shape mismatch ({len(items)}): {', '.join(items)}")

    rows = list(result.tensors)
    if top is not None:
        rows = sorted(rows, key=_sort_key(sort))[:top]
        lines += ["", f"{len(rows)} most different tensors by {sort}:"]
    else:
        lines.append("")
    header = ("tensor", "numel", "1 − cos", "L2", "max |Δ|", "bitwise", "std A", "std B", "std B/A")
    table = [header] + [
        (
            t.name,
            f"{t.numel:,}",
            _num(t.one_minus_cos, ".3e"),
            _num(t.l2, ".3e"),
            _num(t.max_abs_diff, ".3e"),
            "yes" if t.bitwise_equal else "no",
            _num(t.std_a, ".4g"),
            _num(t.std_b, ".4g"),
            _num(t.std_ratio, ".4f"),
        )
        for t in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
