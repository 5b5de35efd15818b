"""``retrace order-check``: do the index maps over a raw corpus reproduce a published preshuffled stream?"""

from __future__ import annotations

import argparse

from retrace.data.preshuffle_check import DEFAULT_ITEMS
from retrace.pythia.constants import SEED, SEQ_LENGTH


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "order-check",
        help="check that GPT-NeoX's index maps over a raw corpus give a preshuffled stream, item for item",
        description=(
            "Build GPT-NeoX v1.0's index maps over the raw corpus (--num-samples, --seq-length, --seed), read "
            "dataset items [--start, --start + --items) through them (item j = sample shuffle_idx[j], "
            "seq_length+1 tokens) and compare each with item j of the preshuffled stream. On a match, write "
            "the summary to --out (written only then, so a workflow can gate on it) and exit 0; on the first "
            "mismatching item, print both token windows and exit 2. Nothing else is written."
        ),
    )
    p.add_argument("--raw", required=True, metavar="PREFIX", help="the tokenized corpus (.bin/.idx prefix)")
    p.add_argument("--preshuffled", required=True, metavar="PREFIX", help="the preshuffled stream's prefix")
    p.add_argument("--seq-length", type=int, default=SEQ_LENGTH, help=f"default: {SEQ_LENGTH}")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the index maps (default: {SEED})")
    p.add_argument("--num-samples", type=int, default=None,
                   help="GPT-NeoX's train num_samples of the maps (default: Pythia's 147164160)")
    p.add_argument("--items", type=int, default=DEFAULT_ITEMS, help=f"items compared (default: {DEFAULT_ITEMS})")
    p.add_argument("--start", type=int, default=0, help="first item compared (default: 0)")
    p.add_argument("--maps-dir", default=None, metavar="DIR",
                   help="use the GPT-NeoX-named maps cached in DIR when present (default: build in memory)")
    p.add_argument("--out", default=None, metavar="JSON", help="on a match, write the summary here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from retrace.data.preshuffle_check import check_order
    from retrace.errors import RetraceError
    from retrace.io import write_json

    result = check_order(raw=args.raw, preshuffled=args.preshuffled, seq_length=args.seq_length, seed=args.seed,
                         num_samples=args.num_samples, items=args.items, start=args.start,
                         maps_dir=args.maps_dir, log=lambda m: print(m, file=sys.stderr))
    if not result.ok:
        raise RetraceError(result.describe())
    if args.out:
        write_json(args.out, result.to_json())
    print(result.describe() + f" ({result.seconds:.1f}s)")
    return 0
