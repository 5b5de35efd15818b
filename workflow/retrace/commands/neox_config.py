"""``retrace neox-config``: the GPT-NeoX v1.0 config of one cell, from the published Pythia config.

    retrace neox-config --size 70m --deduped --gpus 8 --pdbs 4 --gas 32 --attention flash \\
        --data /data/pile_deduped/pile_0.87_deduped_text_document --load CKPT --start-step 0 \\
        --steps 1000 --save RUN/neox/save --out RUN/neox/config.yml

Writes the config (atomically; JSON for a .json path or --format json) and prints the corrections of
the published config that were applied, then the notes. Without --out the config goes to stdout and
the corrections to stderr. --gpus counts data-parallel ranks (gpus × pdbs × gas = 1024); 6.9b and 12b
are model-parallel 2 and 4, so they need that many GPUs per rank. --load is written as given; if it
exists here, its `latest` must name global_step<start> (retrace.neox.runner.prepare_load makes such a
directory). Nothing is run: GPT-NeoX is launched by `python ./deepy.py train.py CONFIG` in its checkout.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "neox-config",
        help="write the GPT-NeoX v1.0 config of a cell from the published Pythia config",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", required=True, help="Pythia size or name: 70m, 1.4b, pythia-2.8b-deduped …")
    p.add_argument("--deduped", action="store_true", help="the deduped run's config")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel ranks")
    p.add_argument("--pdbs", type=int, required=True, help="train_micro_batch_size_per_gpu")
    p.add_argument("--gas", type=int, required=True, help="gradient_accumulation_steps")
    p.add_argument("--attention", choices=("flash", "global"), default="flash")
    p.add_argument("--data", required=True, metavar="PREFIX", help="raw tokenized corpus prefix (…_text_document)")
    p.add_argument("--load", default=None, metavar="DIR", help="GPT-NeoX checkpoint directory to start from")
    p.add_argument("--start-step", type=int, default=0, help="the step --load holds (default 0)")
    p.add_argument("--steps", type=int, required=True, help="the step to stop after")
    p.add_argument("--save", required=True, metavar="DIR", help="where GPT-NeoX saves its checkpoints")
    p.add_argument("--seed", type=int, default=1234, help="GPT-NeoX seed (also the index maps'; default 1234)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: the published one, corrected (bf16 for 1b)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--vocab-file", default=None, help="20B_tokenizer.json on this cluster")
    p.add_argument("--format", choices=("yaml", "json"), default=None,
                   help="default: json for a .json --out or launcher slurm, else yaml")
    p.add_argument("--out", default=None, metavar="FILE", help="default: stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from retrace.neox.config import neox_config, write_neox_config

    cfg = neox_config(
        args.size, deduped=args.deduped, gpus=args.gpus, pdbs=args.pdbs, gas=args.gas, attention=args.attention,
        data=args.data, load=args.load, start_step=args.start_step, steps=args.steps, save=args.save,
        seed=args.seed, precision=args.precision, launcher=args.launcher, vocab_file=args.vocab_file,
    )
    if args.load and Path(args.load).is_dir():
        _check_load(Path(args.load), args.start_step)
    fmt = args.format or ("json" if args.launcher == "slurm" or (args.out or "").endswith(".json") else "yaml")
    if args.out:
        write_neox_config(cfg, args.out, fmt)
        report = sys.stdout
    else:
        sys.stdout.write(cfg.text(fmt))
        report = sys.stderr
    print(f"{cfg.published.name}: {len(cfg.corrections)} correction(s) of the published config "
          f"({cfg.published.path} @ {cfg.published.commit[:8]})", file=report)
    for c in cfg.corrections:
        print(f"  correction {c.line()}", file=report)
    for n in cfg.notes:
        print(f"  note: {n}", file=report)
    shown = cfg.save_steps if len(cfg.save_steps) <= 14 else [*cfg.save_steps[:12], "…", cfg.save_steps[-1]]
    print(f"  layout: {cfg.data_parallel} data-parallel × model-parallel {cfg.model_parallel} = "
          f"{cfg.world_size} GPUs; saves {len(cfg.save_steps)} steps: {', '.join(map(str, shown))}", file=report)
    if args.out:
        print(f"  wrote {args.out}", file=report)
    return 0


def _check_load(load, start_step: int) -> None:
    from retrace.errors import RetraceError

    tag = f"global_step{start_step}"
    latest = load / "latest"
    if not (load / tag).is_dir():
        raise RetraceError(f"{load}: holds no {tag} directory (GPT-NeoX loads <load>/<tag named in latest>)")
    if not latest.is_file() or latest.read_text(encoding="utf-8").strip() != tag:
        raise RetraceError(
            f"{latest}: GPT-NeoX v1.0 loads the tag named there, which is not {tag}; point --load at a "
            "directory whose latest names it (retrace.neox.runner.prepare_load makes one)"
        )
