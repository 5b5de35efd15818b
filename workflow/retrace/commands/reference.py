"""``retrace reference``: make a local "published" run for an offline study (the embedded default study).

    retrace reference init --n-layers 2 --hidden 64 --heads 4 --vocab 512 --seq-len 128 --seed 1234 --out DIR
        DIR/config.json + DIR/model.safetensors: a Pythia-shaped network initialised as GPT-NeoX v1.0
        does (retrace.model.init_weights), stored in fp16 like the published step-0 checkpoints.
    retrace reference publish --run RUN --config DIR/config.json --hub-cache CACHE --repo org/name
        every checkpoint listed in RUN/checkpoints/manifest.json (a `retrace train` run) becomes branch
        step<N> of org/name in a Hugging Face hub cache (retrace.checkpoints.publish_to_hub_cache), so the
        study reads it exactly as it reads a downloaded Pythia repo. The manifest of what was published is
        written last (--record).
        With --format neox each step is published as a GPT-NeoX training checkpoint instead, as the
        NeoX-native repos (EleutherAI/neox-ckpt-pythia-*) hold them: global_step<N>/ with the layer files,
        mp_rank_00_model_states.pt and, where the run kept its resume state of that step (--keep-states),
        DeeperSpeed's ZeRO-1 optimizer files for --dp ranks (retrace.neox.zero_export), plus `latest`.
        A step without a kept state (the start step) is published with its weights only.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reference",
        help="make a local published run (init a step 0; publish a run's checkpoints into a hub cache)",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="a v1.0-initialised Pythia-shaped network as an HF directory")
    init.add_argument("--n-layers", type=int, required=True)
    init.add_argument("--hidden", type=int, required=True)
    init.add_argument("--heads", type=int, required=True)
    init.add_argument("--vocab", type=int, required=True, help="padded vocabulary (embedding rows)")
    init.add_argument("--seq-len", type=int, required=True)
    init.add_argument("--seed", type=int, default=1234, help="initialisation seed (default: 1234)")
    init.add_argument("--out", required=True, metavar="DIR")
    init.set_defaults(func=run_init)

    pub = actions.add_parser("publish", help="a run's checkpoints as step<N> branches of a hub-cache repo")
    pub.add_argument("--run", required=True, help="a `retrace train` output directory")
    pub.add_argument("--config", required=True, help="the config.json published beside every checkpoint")
    pub.add_argument("--hub-cache", required=True, help="the hub cache directory (HF_HUB_CACHE layout)")
    pub.add_argument("--repo", required=True, help="org/name")
    pub.add_argument("--record", default=None, help="JSON written last: the steps published and their commits")
    pub.add_argument("--format", choices=("hf", "neox"), default="hf",
                     help="hf: model.safetensors per branch (default); neox: a GPT-NeoX training checkpoint")
    pub.add_argument("--dp", type=int, default=1, help="--format neox: data-parallel ranks the ZeRO-1 state "
                     "is partitioned over (default 1)")
    pub.add_argument("--max-elements-per-comm", type=int, default=500_000_000,
                     help="--format neox: DeeperSpeed's comm interval (the config's reduce_bucket_size; "
                     "default Pythia's 5e8)")
    pub.set_defaults(func=run_publish)


def run_init(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from retrace.checkpoints import save_params
    from retrace.io import atomic_open
    from retrace.model import GPTNeoX, ModelConfig, config_to_hf, init_weights

    cfg = ModelConfig(n_layers=args.n_layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                      seq_len=args.seq_len)
    model = init_weights(GPTNeoX(cfg), args.seed)
    out = Path(args.out)
    save_params({k: v.half() for k, v in model.state_dict().items()}, out / "model.safetensors",
                metadata={"source": f"retrace reference init seed {args.seed}"})
    with atomic_open(out / "config.json", "w", encoding="utf-8") as fh:
        json.dump(config_to_hf(cfg, dtype="float16", hidden_act="gelu"), fh, indent=2)
    print(f"reference init: {cfg.n_params:,} parameters, seed {args.seed} -> {out}", file=sys.stderr)
    return 0


def run_publish(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from retrace.checkpoints import publish_to_hub_cache
    from retrace.errors import RetraceError
    from retrace.io import write_json

    manifest_path = Path(args.run) / "checkpoints" / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetraceError(f"{manifest_path}: cannot read the run's manifest ({exc})") from exc
    config = Path(args.config)
    if not config.is_file():
        raise RetraceError(f"{config}: config.json not found")
    published = {}
    for step in manifest["steps"]:
        ckpt = manifest_path.parent / f"step{step}.safetensors"
        if args.format == "neox":
            snapshot = _publish_neox_step(args, step, config)
        else:
            snapshot = publish_to_hub_cache(args.hub_cache, args.repo, f"step{step}",
                                            {"config.json": config, "model.safetensors": ckpt})
        published[f"step{step}"] = snapshot.name
        print(f"reference publish: {args.repo}@step{step} <- {ckpt}", file=sys.stderr, flush=True)
    if args.record:
        write_json(args.record, {"repo": args.repo, "hub_cache": str(args.hub_cache), "run": str(args.run),
                                 "commits": published})
    print(f"reference publish: {len(published)} steps of {args.repo} in {args.hub_cache}", file=sys.stderr)
    return 0


def _publish_neox_step(args: argparse.Namespace, step: int, config) -> object:
    """One step of the run as a GPT-NeoX training checkpoint in branch step<N> (see the module doc)."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from retrace.checkpoints import publish_to_hub_cache
    from retrace.model import config_from_hf
    from retrace.neox.export import export_neox_checkpoint
    from retrace.neox.zero_export import export_training_checkpoint
    from retrace.train import state as st

    cfg = config_from_hf(json.loads(Path(config).read_text(encoding="utf-8")))
    run = Path(args.run)
    with tempfile.TemporaryDirectory(prefix="retrace-neox-publish-") as tmp:
        if (st.state_dir(run / "state", step) / st.STATE_JSON).is_file():
            step_dir = export_training_checkpoint(run, step, tmp, cfg=cfg, dp=args.dp,
                                                  max_elements_per_comm=args.max_elements_per_comm)
        else:
            step_dir = export_neox_checkpoint(load_file(str(run / "checkpoints" / f"step{step}.safetensors")),
                                              tmp, step=step, cfg=cfg)
        files = {f"{step_dir.name}/{p.name}": p for p in sorted(step_dir.iterdir()) if p.is_file()}
        files[f"{step_dir.name}/config.json"] = Path(config)
        files["config.json"] = Path(config)
        files["latest"] = Path(tmp) / "latest"
        return publish_to_hub_cache(args.hub_cache, args.repo, f"step{step}", files)
