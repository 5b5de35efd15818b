"""``retrace fetch-state``: one published GPT-NeoX training checkpoint (weights + ZeRO-1 state), staged."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch-state",
        help="stage a GPT-NeoX native checkpoint with its ZeRO-1 optimizer state (a segment's start)",
        description=(
            "Resolve SOURCE (org/repo@stepN of a GPT-NeoX native repo such as EleutherAI/neox-ckpt-pythia-*, "
            "fetched and sha256-checked, or read offline from $HF_HUB_CACHE with HF_HUB_OFFLINE=1; or a local "
            "GPT-NeoX directory) with its zero_pp_rank_*_optim_states.pt files, and lay it out at OUT as a "
            "GPT-NeoX save directory (latest + global_stepN/, hard links to the cache where possible, "
            "OUT/source.json recording what was checked), atomically "
            "(retrace.checkpoints.training_state). The workflow runs it once per (repo, step) into "
            "resources/training_states/<repo>/step<N> for the segments that start there."
        ),
    )
    p.add_argument("--source", required=True, help="org/repo@stepN, or a local GPT-NeoX directory (./path or /path)")
    p.add_argument("--out", required=True, help="the directory to stage it in")
    p.add_argument("--cache-dir", default=None, help="hub cache (default: $HF_HUB_CACHE / ~/.cache/huggingface/hub)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="use files no hash is recorded for, with a warning (as fetch-reference)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from retrace.checkpoints.training_state import read_source_record, stage_training_state

    out = stage_training_state(args.source, args.out, cache_dir=args.cache_dir,
                               verify="warn" if args.allow_unverified else None)
    rec = read_source_record(out)
    print(f"fetch-state: {args.source} -> {out} (commit {rec.get('commit', '-')}, verified: {rec['verified']})",
          file=sys.stderr)
    return 0
