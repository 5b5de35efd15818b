"""``retrace train``: resume a published Pythia run from its weights and train one cell as GPT-NeoX v1.0 did."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one cell (published start step, data, layout, precision, engine) on the Pythia recipe",
        description=(
            "Resume from the published weights (and, from a GPT-NeoX native checkpoint, its ZeRO optimizer "
            "state) and train with the Pythia recipe until --steps. Writes OUT/checkpoints/step{N}.safetensors "
            "on the Pythia schedule, OUT/state/ (resume), OUT/train_log.parquet, OUT/run.json and, last, "
            "OUT/checkpoints/manifest.json. Rerunning the same command resumes from the newest state. With "
            "--gpus N > 1 outside torchrun/srun, N local ranks are started. SIGTERM/SIGUSR2 save the state at "
            "the end of the current step and exit with 128+signal."
        ),
    )
    p.add_argument("--reference", required=True, metavar="SRC",
                   help="start weights: a local path, or org/repo (the start step selects org/repo@step{N}), "
                        "or org/repo@rev")
    p.add_argument("--start-step", type=int, default=0, help="published step to resume from (default 0)")
    p.add_argument("--data", required=True, metavar="PREFIX", help="tokenized data prefix (PREFIX.bin/.idx)")
    p.add_argument("--data-kind", choices=("raw", "preshuffled"), default="preshuffled")
    p.add_argument("--shuffle-samples", action="store_true", help="permute preshuffled items with --order-seed")
    p.add_argument("--order-seed", type=int, default=1234, help="seed of the data order (GPT-NeoX: 1234)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--pdbs", type=int, default=None, help="micro batch per rank (default: the recipe's)")
    p.add_argument("--gas", type=int, default=None, help="gradient accumulation steps (default: the recipe's)")
    p.add_argument("--global-batch", type=int, default=None, help="override the recipe's 1024")
    p.add_argument("--seq-length", type=int, default=None, help="override the recipe's 2048")
    p.add_argument("--attention", choices=("flash", "global"), default="flash")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: the recipe's (fp16; bf16 for 1b)")
    p.add_argument("--engine", choices=("builtin", "deepspeed"), default="builtin")
    p.add_argument("--steps", type=int, required=True, help="the step the run ends at (absolute step number)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--recipe", default=None, metavar="SIZE",
                   help="Pythia size whose recipe to use (default: inferred from the reference's shape)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup-iters", type=int, default=None, help="W (default: 0.01·train_iters)")
    p.add_argument("--train-iters", type=int, default=None, help="E, the original run's length (143000)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores / local ranks); fix it for bit-reproducible runs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute layers in backward")
    p.add_argument("--rotary-angles", choices=("neox", "fp32"), default="neox",
                   help="neox: half-precision rotary angles as GPT-NeoX v1.0 under DeepSpeed (default)")
    p.add_argument("--save-steps", default=None,
                   help="comma-separated steps to save instead of the Pythia schedule (start and end always)")
    p.add_argument("--simulate-ranks", action="store_true",
                   help="run the --gpus ranks one after another in this process (builtin engine): the same "
                        "fp16 accumulation and rank-ordered gradient sum, without starting processes")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from retrace.errors import RetraceError
    from retrace.train import TrainConfig

    save_steps = None
    if args.save_steps:
        try:
            save_steps = [int(s) for s in args.save_steps.split(",") if s.strip()]
        except ValueError as exc:
            raise RetraceError(f"--save-steps: {exc}") from exc
    return TrainConfig(
        reference=args.reference, data=args.data, out=args.out, steps=args.steps, start_step=args.start_step,
        data_kind=args.data_kind, shuffle_samples=args.shuffle_samples, order_seed=args.order_seed,
        gpus=args.gpus, pdbs=args.pdbs, gas=args.gas, global_batch=args.global_batch, seq_length=args.seq_length,
        attention=args.attention, precision=args.precision, engine=args.engine, seed=args.seed, recipe=args.recipe,
        lr=args.lr, min_lr=args.min_lr, warmup_iters=args.warmup_iters, train_iters=args.train_iters,
        threads=args.threads, device=args.device, checkpoint_activations=args.checkpoint_activations,
        rotary_angles=args.rotary_angles, save_steps=save_steps, progress=not args.no_progress,
        simulate_ranks=args.simulate_ranks,
    )


def run(args: argparse.Namespace) -> int:
    from retrace.train import TrainingInterrupted, train

    cfg = config_from_args(args)
    main_rank = os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"
    try:
        result = train(cfg)
    except TrainingInterrupted as exc:
        if main_rank:
            print(f"retrace train: {exc}", file=sys.stderr)
        return exc.exit_code
    if main_rank:
        print(f"retrace train: step {result.final_step} reached; {len(result.saved_steps)} checkpoints, "
              f"manifest {result.manifest}", file=sys.stderr)
    return 0
