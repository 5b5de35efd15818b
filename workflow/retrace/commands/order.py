"""``retrace order``: build (or check) the GPT-NeoX index maps of a data variant once, before training."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "order",
        help="build or check the GPT-NeoX index maps (doc/sample/shuffle idx) of a data variant",
        description=(
            "Open the data as `retrace train` will (same --kind, --seq-length, --seed, --num-samples, "
            "--shuffle-samples, --cache-dir), building and caching any missing maps under GPT-NeoX's file "
            "names in --cache-dir, or validating the cached ones. Maps are never read from or written "
            "beside the data. With --marker, write a JSON summary there last, so a workflow can wait on it; "
            "--cache-dir then defaults to the marker's directory. Raw data: "
            "<cache-dir>/<name>_train_0_indexmap_{ns}ns_{sl}sl_{seed}s_*_idx.npy."
        ),
    )
    p.add_argument("--data", required=True, metavar="PREFIX", help="the .bin/.idx prefix")
    p.add_argument("--kind", choices=("raw", "preshuffled"), default="raw", help="data kind (default: raw)")
    p.add_argument("--seq-length", type=int, default=2048, help="default: 2048")
    p.add_argument("--seed", type=int, default=1234, help="default: 1234")
    p.add_argument("--num-samples", type=int, default=None,
                   help="raw: GPT-NeoX's train num_samples (default: Pythia's 147164160)")
    p.add_argument("--shuffle-samples", action="store_true", help="preshuffled: permute items with the seed")
    p.add_argument("--cache-dir", default=None,
                   help="the directory the maps are cached in (default: the --marker's directory)")
    p.add_argument("--marker", default=None, metavar="JSON", help="write a summary here when done")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from retrace.data import open_training_data
    from retrace.errors import RetraceError
    from retrace.io import write_json

    cache_dir = args.cache_dir or (str(Path(args.marker).parent) if args.marker else None)
    if cache_dir is None:
        raise RetraceError("retrace order: give --cache-dir (or --marker, whose directory is then the cache)")
    t0 = time.perf_counter()
    data = open_training_data(args.data, kind=args.kind, seq_length=args.seq_length, seed=args.seed,
                              num_samples=args.num_samples, shuffle_samples=args.shuffle_samples,
                              cache_dir=cache_dir, log=lambda m: print(m, file=sys.stderr))
    summary = {**data.describe(), "seconds": round(time.perf_counter() - t0, 3)}
    if args.marker:
        write_json(args.marker, summary)
    print(f"{data.prefix} ({data.kind}): {len(data)} items of {data.seq_length + 1} tokens"
          + (f"; maps {', '.join(summary.get('index_maps', []))}" if summary.get("index_maps") else ""))
    return 0
