"""``retrace neox-run``: train one cell with GPT-NeoX v1.0 itself (``engine: neox``), from the published weights.

    retrace neox-run --reference EleutherAI/pythia-70m-deduped --start-step 0 --size 70m --deduped \\
        --data /data/pile_deduped/pile_0.87_deduped_text_document --data-kind raw \\
        --gpus 8 --pdbs 4 --gas 32 --attention flash --steps 1000 --seed 1234 \\
        --neox-path /opt/gpt-neox --neox-container /images/neox-v1.0.sif --out RUN

The cell flags are `retrace train`'s. Steps: the reference step is opened (``open_params``; org/repo
+ --start-step → org/repo@step{N}); unless it already is a GPT-NeoX native checkpoint, it is exported
with ``retrace.neox.export.export_neox_checkpoint`` to RUN/neox/load/global_step{N} (+ ``latest``);
``retrace.neox.runner.run_cell`` then writes RUN/neox/config.yml (the published config with the
cell's overrides), RUN/neox/hostfile and RUN/neox/plan.json, runs ``python ./deepy.py train.py
CONFIG`` in the gpt-neox checkout (relative --data/--vocab-file paths are made absolute first) (container or conda environment), and converts GPT-NeoX's
checkpoints to RUN/checkpoints/step{N}.safetensors with manifest.json written last. --dry-run does
everything up to the launch (load directory, config, hostfile, plan) and prints the command.

Only start step 0 works from Hugging Face weights (``finetune: true``, weights only, as the
published run began): a resume at N > 0 needs GPT-NeoX's ZeRO optimizer state, i.e. a native
checkpoint (EleutherAI/neox-ckpt-pythia-*) as --reference. GPT-NeoX runs the published recipe: the
global batch is 1024 and the schedule, sequence length and data order are the published config's
(the data must be the raw tokenized corpus; GPT-NeoX builds its own index maps from --seed).

Not run here (no GPU, no gpt-neox checkout): GPT-NeoX itself. Tested: the export, the dry run end to
end on a tiny local reference, and the errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from retrace.spec import NeoXRunConfig, add_arguments

    p = sub.add_parser(
        "neox-run",
        help="train one cell with GPT-NeoX v1.0 itself, from the published weights (engine neox)",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, NeoXRunConfig)
    p.set_defaults(func=run)


def neox_env(args):
    """``NeoXEnv`` from the --neox-* settings; one ``RetraceError`` naming the flag when one is wrong."""
    from retrace.errors import RetraceError
    from retrace.neox.runner import NeoXEnv

    if not args.neox_path:
        raise RetraceError("--neox-path: the gpt-neox v1.0 checkout (holding deepy.py and train.py) is required")
    try:
        return NeoXEnv.from_config(args.neox_env(), where="neox-run")
    except RetraceError as exc:
        raise RetraceError(str(exc).replace("neox-run.", "--neox-").replace("neox-run:", "--neox-*:")) from None


def resolve_size(args, source: str) -> str:
    """--size, else the Pythia size in --reference's name, else the one of its shape."""
    from retrace.errors import RetraceError
    from retrace.pythia.sizes import pythia_size

    if args.size:
        return pythia_size(args.size)
    try:
        return pythia_size(args.reference.split("@")[0])
    except RetraceError:
        pass
    from retrace.checkpoints import open_config
    from retrace.spec import infer_size

    return infer_size(open_config(source), args.reference)


def prepare(args) -> dict:
    """Everything before ``run_cell``: checks, the size, and the load directory (exported if needed)."""
    from retrace.checkpoints import open_config, open_params
    from retrace.checkpoints.neox import is_neox_dir
    from retrace.checkpoints.sources import start_source
    from retrace.errors import RetraceError
    from retrace.neox.export import export_neox_checkpoint
    from retrace.neox.published import published_config
    from retrace.pythia.sizes import config_from_hf, pythia_config

    env = neox_env(args)
    if not args.dry_run and not env.container and not (Path(env.path) / "deepy.py").is_file():
        raise RetraceError(f"--neox-path {env.path}: no deepy.py there (not a gpt-neox checkout)")
    if args.data_kind != "raw":
        raise RetraceError(f"--data-kind {args.data_kind}: GPT-NeoX v1.0 builds its own shuffled index maps, so "
                           "it needs the raw tokenized corpus (…_text_document), not a preshuffled stream")
    source = start_source(args.reference, args.start_step)
    size = resolve_size(args, source)
    deduped = bool(args.deduped or "-deduped" in args.reference.lower())
    out = Path(args.out).resolve()
    notes: list[str] = []
    local = Path(args.reference)
    if local.exists() and is_neox_dir(local):
        load = local  # already GPT-NeoX native: run_cell's prepare_load checks its step
        exported = None
    else:
        if args.start_step > 0:
            raise RetraceError(
                f"--start-step {args.start_step}: GPT-NeoX v1.0 resumes only with its ZeRO optimizer state, which "
                f"{source} (Hugging Face weights) does not have; give a GPT-NeoX native checkpoint "
                "(EleutherAI/neox-ckpt-pythia-*) as --reference, or start at 0")
        cfg = config_from_hf(open_config(source), gelu="tanh")
        want = pythia_config(size)
        shape, want_shape = ((cfg.n_layers, cfg.hidden, cfg.heads, cfg.vocab),
                             (want.n_layers, want.hidden, want.heads, want.vocab))
        if shape != want_shape:
            msg = (f"{source}: shape (layers, hidden, heads, vocab) {shape} is not pythia-{size}'s {want_shape}; "
                   "GPT-NeoX would refuse to load it")
            if not args.dry_run:
                raise RetraceError(msg)
            notes.append("warning: " + msg)
        pub = published_config(size, deduped).normalized()
        layout = "sequential" if int(pub.get("pipe_parallel_size", 1) or 0) == 0 else "pipeline"
        load = out / "neox" / "load"
        with open_params(source) as reader:
            exported = export_neox_checkpoint(reader, load, step=args.start_step, cfg=cfg, layout=layout)
    return {"env": env, "size": size, "deduped": deduped, "out": out, "load": load, "exported": exported,
            "source": source, "notes": notes}


def run(ns: argparse.Namespace) -> int:
    from retrace.neox.runner import run_cell
    from retrace.spec import NeoXRunConfig, from_arguments

    args = from_arguments(NeoXRunConfig, ns)
    p = prepare(args)
    summary = run_cell(size=p["size"], deduped=p["deduped"], gpus=args.gpus, pdbs=args.pdbs, gas=args.gas,
                       data=os.path.abspath(args.data), steps=args.steps, out=p["out"], neox=p["env"], attention=args.attention,
                       load=str(p["load"]), start_step=args.start_step, seed=args.seed, precision=args.precision,
                       launcher=args.launcher, gpus_per_node=args.gpus_per_node, vocab_file=os.path.abspath(args.vocab_file) if args.vocab_file else None,
                       reference=args.reference, dry_run=args.dry_run)
    for note in p["notes"]:
        print(f"retrace neox-run: {note}", file=sys.stderr)
    if args.dry_run:
        print(f"load: {p['exported'] or p['load']}" + (" (exported)" if p["exported"] else ""))
        print(f"config: {summary['config']}")
        for path in summary["plan"]["files"]:
            print(f"file: {path}")
        print(f"plan: {p['out'] / 'neox' / 'plan.json'}")
        print(f"command (not run): {summary['plan']['shell']}")
        return 0
    print(f"retrace neox-run: step {args.steps} reached; manifest {p['out'] / 'checkpoints' / 'manifest.json'}",
          file=sys.stderr)
    return 0
