"""One rank started by ``retrace.train.distributed.launch_local``: ``python -m retrace.train.worker CONFIG.json``."""

from __future__ import annotations

import json
import sys

from retrace.errors import RetraceError
from retrace.train.distributed import detect
from retrace.train.trainer import TrainConfig, Trainer, TrainingInterrupted


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        cfg = TrainConfig.from_dict(json.load(fh))
    try:
        Trainer(cfg, detect()).run()
    except TrainingInterrupted as exc:
        if detect() is None or detect().rank == 0:
            print(f"retrace train: {exc}", file=sys.stderr)
        return exc.exit_code
    except RetraceError as exc:
        print(f"retrace train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
