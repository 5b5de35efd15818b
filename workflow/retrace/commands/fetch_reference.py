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
            "HF_HUB_OFFLINE=1 and checked against the cache's recorded hashes; or a local file/directory "
            "written ./path or /path) and write its parameters, in canonical names and without buffers, to "
            "OUT with save_params (atomically). OUT's metadata records the source, the resolved commit, "
            "whether every file was verified and against what, the hashes checked and the config.json "
            "(retrace.checkpoints.record). The workflow runs it once per (repo, step) into "
            "resources/references/<repo>/step<N>.safetensors, shared by every cell."
        ),
    )
    p.add_argument("--source", required=True, help="org/repo@stepN, or a local checkpoint (./path or /path)")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.add_argument("--cache-dir", default=None, help="hub cache (default: $HF_HUB_CACHE / ~/.cache/huggingface/hub)")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="use files no hash is recorded for (offline caches without metadata) with a warning, "
        "recorded as verified=false; a hash that differs from its record is still refused "
        "(same as RETRACE_ALLOW_UNVERIFIED=1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from retrace.checkpoints import open_config, open_params, save_params
    from retrace.checkpoints.record import reference_metadata
    from retrace.errors import RetraceError

    verify = "warn" if args.allow_unverified else None
    t0 = time.perf_counter()
    print(f"fetch-reference: opening {args.source}", file=sys.stderr, flush=True)
    with open_params(args.source, cache_dir=args.cache_dir, verify=verify) as reader:
        n = len(reader.names())
        snap = getattr(reader, "hub", None)
        try:  # a Hub revision's config.json was fetched and verified with the weights
            config = open_config(args.source, cache_dir=args.cache_dir, verify=verify)
        except RetraceError as exc:
            if snap is not None:
                raise
            # a local source's weights alone are still a reference; only starting a run needs the config
            print(f"fetch-reference: no config stored ({exc})", file=sys.stderr, flush=True)
            config = None
        meta = reference_metadata(reader, config)
        how = (f"commit {snap.commit}, verified against {snap.verified_against or 'nothing'}"
               if snap is not None else "local source, not verified")
        print(f"fetch-reference: {n} tensors from {reader.source} ({how}); writing {args.out}",
              file=sys.stderr, flush=True)
        save_params(reader, args.out, metadata=meta, seal=True)  # compare-run checks the seal
    print(f"fetch-reference: {args.out} ({n} tensors, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
