"""``retrace train``: resume a published Pythia run from its weights and train one cell as GPT-NeoX v1.0 did.

Its flags are ``retrace.spec.TrainConfig``'s fields; the workflow passes a cell's settings as one
``--spec JSON`` and adds ``--out`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(sub) -> None:
    from retrace.spec import TrainConfig, add_arguments

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
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrace.spec import TrainConfig, from_arguments
    from retrace.train import TrainingInterrupted, train

    cfg = from_arguments(TrainConfig, args)
    main_rank = os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"
    try:
        # a process of its own has run no torch op: a CPU cell's ranks may be forks of it (retrace.cli.main)
        result = train(cfg, fork_ranks=getattr(args, "own_process", False))
    except TrainingInterrupted as exc:
        if main_rank:
            print(f"retrace train: {exc}", file=sys.stderr)
        return exc.exit_code
    if main_rank:
        print(f"retrace train: step {result.final_step} reached; {len(result.saved_steps)} checkpoints, "
              f"manifest {result.manifest}", file=sys.stderr)
    return 0
