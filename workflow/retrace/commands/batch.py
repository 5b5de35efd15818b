"""``retrace batch``: the token ids of one training batch, in GPT-NeoX order (Pythia's batch_viewer)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="print or export the token ids of one training batch (any data variant)",
        description=(
            "Open a data variant the way the trainer does and show the batch of a 0-based step: the whole "
            "global batch (items B*step .. B*step+B-1), or with --pdbs/--gpus the part data-parallel rank "
            "--rank reads at micro-step --micro (items B*step + micro*pdbs*gpus + rank*pdbs + [0, pdbs)). "
            "Checkpoint stepN has trained on the batches of steps 0..N-1. Each row is seq_length+1 tokens "
            "(inputs = row[:-1], labels = row[1:]). Give the data as --data PREFIX (with --kind, "
            "--seq-length, --seed, --num-samples) or as --variant DATA --manifest PATH for `retrace synth` output. "
            "Pythia's batch_viewer (utils/batch_viewer.py of EleutherAI/pythia) reads the same items: its "
            "batch of step s is items [1024*s, 1024*(s+1)) of the preshuffled stream, i.e. --kind preshuffled "
            "--step s (global batch 1024). --hash prints the batch's fingerprint as the train log records it "
            "(batch_hash: sha256 of per-sample blake2b-128 digests of the int64 token ids, in item order; "
            "retrace.data.batch_hash), the same for every gpus x pdbs x gas layout."
        ),
    )
    src = p.add_argument_group("data")
    src.add_argument("--data", metavar="PREFIX", help="the .bin/.idx prefix (a path ending in .bin/.idx is accepted)")
    src.add_argument("--variant", metavar="DATA", help="with --manifest: standard or deduped")
    src.add_argument("--manifest", metavar="PATH", help="a `retrace synth` manifest.json (or its directory)")
    src.add_argument("--kind", choices=("raw", "preshuffled"), default="raw", help="data kind (default: raw)")
    src.add_argument("--seq-length", type=int, default=None, help="tokens per sample minus one (default: 2048, "
                     "or the manifest's)")
    src.add_argument("--seed", type=int, default=None, help="index-map / shuffle seed (default: 1234, or the manifest's)")
    src.add_argument("--num-samples", type=int, default=None,
                     help="raw: GPT-NeoX's train num_samples the order was built for (default: Pythia's "
                          "147164160, or the manifest's); preshuffled: optional cap")
    src.add_argument("--shuffle-samples", action="store_true", help="preshuffled: permute items with the seed")
    src.add_argument("--cache-dir", default=None, help="the directory index maps are cached in, e.g. resources/order/<variant> "
                     "(default: none, built in memory; never beside the data)")
    pos = p.add_argument_group("position")
    pos.add_argument("--step", type=int, required=True, help="0-based training step")
    pos.add_argument("--global-batch", type=int, default=1024, help="samples per step (default: 1024)")
    pos.add_argument("--pdbs", type=int, default=None, help="micro batch per rank (default: the whole step)")
    pos.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (default: 1)")
    pos.add_argument("--rank", type=int, default=0, help="data-parallel rank (default: 0)")
    pos.add_argument("--micro", type=int, default=0, help="micro-step within the step (default: 0)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--npy", metavar="PATH", help="write the [n, seq_length+1] int64 token ids as .npy")
    out.add_argument("--parquet", metavar="PATH", help="write one row per sample (step, item, position, token_ids)")
    out.add_argument("--ids-only", action="store_true", help="print only the item ids")
    out.add_argument("--hash", action="store_true",
                     help="print the batch hash of the whole step: the train log's batch_hash in the row of "
                          "step+1 (the update that made checkpoint step{step+1})")
    p.set_defaults(func=run)


def open_from_args(args: argparse.Namespace):
    from retrace.data import open_training_data
    from retrace.data.synthetic import open_variant
    from retrace.errors import RetraceError

    kw = {"shuffle_samples": args.shuffle_samples, "cache_dir": args.cache_dir}
    for name in ("seq_length", "seed", "num_samples"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.manifest or args.variant:
        if args.data or not (args.manifest and args.variant):
            raise RetraceError("give either --data PREFIX, or both --variant and --manifest")
        return open_variant(args.manifest, args.variant, args.kind, **kw)
    if not args.data:
        raise RetraceError("give --data PREFIX (or --variant with --manifest)")
    return open_training_data(args.data, kind=args.kind, **kw)


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    data = open_from_args(args)
    if args.hash:
        from retrace.data.batch_hash import batch_hash

        if args.pdbs is not None:
            from retrace.errors import RetraceError

            raise RetraceError("--hash fingerprints the whole step's global batch; drop --pdbs")
        whole = data.batch_items(args.step, global_batch=args.global_batch)
        print(f"step {args.step} items {int(whole[0])}..{int(whole[-1])} batch_hash "
              f"{batch_hash(data.samples(whole))}")
        return 0
    ids = data.batch_items(args.step, micro=args.micro, rank=args.rank, pdbs=args.pdbs, gpus=args.gpus,
                           global_batch=args.global_batch)
    if args.ids_only:
        print(" ".join(str(int(i)) for i in ids))
        return 0
    tokens = data.samples(ids)
    where = f"step {args.step}" + (f" rank {args.rank} micro {args.micro}" if args.pdbs is not None else "")
    if args.npy:
        from retrace.io import atomic_path

        with atomic_path(args.npy, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, tokens)
        print(f"{where}: {tokens.shape[0]} samples x {tokens.shape[1]} tokens -> {args.npy}", file=sys.stderr)
        return 0
    if args.parquet:
        import pandas as pd

        from retrace.io import write_parquet

        frame = pd.DataFrame({
            "step": np.full(len(ids), args.step, dtype=np.int64),
            "rank": np.full(len(ids), args.rank if args.pdbs is not None else -1, dtype=np.int64),
            "micro": np.full(len(ids), args.micro if args.pdbs is not None else -1, dtype=np.int64),
            "position": np.arange(len(ids), dtype=np.int64),
            "item": ids.astype(np.int64),
            "token_ids": list(tokens),
        })
        write_parquet(args.parquet, frame)
        print(f"{where}: {tokens.shape[0]} samples x {tokens.shape[1]} tokens -> {args.parquet}", file=sys.stderr)
        return 0
    out = sys.stdout
    print(f"# {data.prefix} ({data.kind}), {where}: {len(ids)} samples of {tokens.shape[1]} tokens", file=out)
    for item, row in zip(ids, tokens, strict=True):
        out.write(f"{int(item)}\t{' '.join(map(str, row.tolist()))}\n")
    return 0
