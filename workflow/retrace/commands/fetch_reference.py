"""``retrace fetch-reference``: one published checkpoint as a canonical, parameter-only safetensors file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch-reference",
        help="fetch one published checkpoint (org/repo@stepN) and keep only its parameters",
        description=(
            "Open SOURCE with retrace.checkpoints.open_params (a Hub spec org/repo@revision, fetched and "
            "sha256-checked through huggingface_hub, or read offline from $HF_HUB_CACHE with "
            "HF_HUB_OFFLINE=1; or a local file/directory) and write its parameters, in canonical names and "
            "without buffers, to OUT with save_params (atomically). The workflow runs it once per "
            "(repo, step) into resources/references/<repo>/step<N>.safetensors, shared by every cell."
        ),
    )
    p.add_argument("--source", required=True, help="org/repo@stepN, or a local checkpoint")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.add_argument("--cache-dir", default=None, help="hub cache (default: $HF_HUB_CACHE / ~/.cache/huggingface/hub)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from retrace.checkpoints import open_params, save_params

    t0 = time.perf_counter()
    print(f"fetch-reference: opening {args.source}", file=sys.stderr, flush=True)
    with open_params(args.source, cache_dir=args.cache_dir) as reader:
        n = len(reader.names())
        print(f"fetch-reference: {n} tensors from {reader.source}; writing {args.out}", file=sys.stderr, flush=True)
        save_params(reader, args.out, metadata={"source": str(reader.source)})
    print(f"fetch-reference: {args.out} ({n} tensors, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
