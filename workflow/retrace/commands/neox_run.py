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
    p = sub.add_parser(
        "neox-run",
        help="train one cell with GPT-NeoX v1.0 itself, from the published weights (engine neox)",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reference", required=True, metavar="SRC",
                   help="start weights: a local path, org/repo (with --start-step: org/repo@step{N}) or org/repo@rev")
    p.add_argument("--start-step", type=int, default=0, help="published step to start from (default 0)")
    p.add_argument("--data", required=True, metavar="PREFIX", help="raw tokenized corpus prefix (…_text_document)")
    p.add_argument("--data-kind", choices=("raw", "preshuffled"), default="raw",
                   help="must be raw: GPT-NeoX v1.0 builds and shuffles its own index maps")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--pdbs", type=int, required=True, help="micro batch per rank")
    p.add_argument("--gas", type=int, required=True, help="gradient accumulation steps")
    p.add_argument("--attention", choices=("flash", "global"), default="flash")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: the published one (bf16 for 1b)")
    p.add_argument("--steps", type=int, required=True, help="the step the run ends at (absolute step number)")
    p.add_argument("--seed", type=int, default=1234, help="GPT-NeoX seed (init, and the index maps)")
    p.add_argument("--size", default=None,
                   help="Pythia size of the published config (default: from --reference's name or shape)")
    p.add_argument("--deduped", action="store_true", help="the deduped run's published config")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--gpus-per-node", type=int, default=None, help="needed for --launcher slurm")
    p.add_argument("--vocab-file", default=None, help="the GPT-NeoX tokenizer file on this machine")
    p.add_argument("--neox-path", default=None, metavar="DIR", help="the gpt-neox v1.0 checkout (deepy.py)")
    p.add_argument("--neox-container", default=None, help="Apptainer/Singularity or Docker image")
    p.add_argument("--neox-runtime", choices=("apptainer", "singularity", "docker"), default="apptainer")
    p.add_argument("--neox-conda-env", default=None, help="conda environment (instead of a container)")
    p.add_argument("--neox-python", default="python", help="python inside the environment (default python)")
    p.add_argument("--neox-bind", action="append", default=[], metavar="PATH",
                   help="extra path the container must see (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="accepted for the train rule's command line; GPT-NeoX sets its own threads")
    p.add_argument("--dry-run", action="store_true", help="write the load directory and config, print the command, "
                                                          "run nothing")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=run)


def neox_env(args: argparse.Namespace):
    """``NeoXEnv`` from the --neox-* flags; one ``RetraceError`` naming the flag when one is wrong."""
    from retrace.errors import RetraceError
    from retrace.neox.runner import NeoXEnv

    if not args.neox_path:
        raise RetraceError("--neox-path: the gpt-neox v1.0 checkout (holding deepy.py and train.py) is required")
    spec = {"path": args.neox_path, "runtime": args.neox_runtime, "python": args.neox_python,
            "binds": list(args.neox_bind)}
    if args.neox_container:
        spec["container"] = args.neox_container
    if args.neox_conda_env:
        spec["conda_env"] = args.neox_conda_env
    try:
        return NeoXEnv.from_config(spec, where="neox-run")
    except RetraceError as exc:
        raise RetraceError(str(exc).replace("neox-run.", "--neox-").replace("neox-run:", "--neox-*:")) from None


def resolve_size(args: argparse.Namespace, source: str) -> str:
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
    from retrace.train.trainer import infer_size

    return infer_size(open_config(source), args.reference)


def prepare(args: argparse.Namespace) -> dict:
    """Everything before ``run_cell``: checks, the size, and the load directory (exported if needed)."""
    from retrace.checkpoints import open_config, open_params
    from retrace.checkpoints.neox import is_neox_dir
    from retrace.errors import RetraceError
    from retrace.neox.export import export_neox_checkpoint
    from retrace.neox.published import published_config
    from retrace.pythia.sizes import config_from_hf, pythia_config
    from retrace.train.trainer import resolve_source

    env = neox_env(args)
    if not args.dry_run and not env.container and not (Path(env.path) / "deepy.py").is_file():
        raise RetraceError(f"--neox-path {env.path}: no deepy.py there (not a gpt-neox checkout)")
    if args.data_kind != "raw":
        raise RetraceError(f"--data-kind {args.data_kind}: GPT-NeoX v1.0 builds its own shuffled index maps, so "
                           "it needs the raw tokenized corpus (…_text_document), not a preshuffled stream")
    source = resolve_source(args.reference, args.start_step)
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


def run(args: argparse.Namespace) -> int:
    from retrace.neox.runner import run_cell

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
