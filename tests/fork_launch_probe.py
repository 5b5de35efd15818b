"""The local launcher with forked ranks, run in a fresh interpreter as `retrace train` runs it.

A test process cannot host these checks: any thread an earlier test left behind (a tqdm monitor, a
pool) makes ``fork_ok()`` refuse, and the launcher then spawns ``python argv…`` instead. Here the
process has one thread and has run no torch op, and the argv program exits ``SPAWNED``, so a rank that
was spawned rather than forked can never pass for one.

Usage: python fork_launch_probe.py SCENARIO NPROCS OUT_DIR  → prints {"code": <launcher exit code>}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from retrace.train.distributed import LOCAL_START_VAR, fork_ok, launch_local

SPAWNED = 97  # what a spawned rank would exit with


def _rank() -> int:
    return int(os.environ["RANK"])


def ok() -> int:
    return 0


def rank2_fails() -> int:
    return 3 if _rank() == 2 else 0


def crash_or_wait() -> int:
    if _rank() == 1:
        raise ValueError("rank one broke")
    time.sleep(60)  # a rank waiting in a collective for the one that died
    return 0


def report_then_wait(out: Path) -> int:
    (out / f"rank{_rank()}.json").write_text(json.dumps(
        {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", LOCAL_START_VAR)}))
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    if _rank() == 1:  # both ranks ready: the launcher is sent SIGTERM, as SLURM or a user would
        while len(list(out.glob("rank*.json"))) < 2:
            time.sleep(0.01)
        time.sleep(0.5)  # the launcher installs its forwarding handler once every rank is started
        os.kill(os.getppid(), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    return 128 + got[0] if got else 0


def main(scenario: str, nprocs: int, out: Path) -> int:
    if not fork_ok():
        print("fork_ok() is False in a fresh interpreter", file=sys.stderr)
        return 2
    targets = {"ok": ok, "rank2_fails": rank2_fails, "crash_or_wait": crash_or_wait,
               "report_then_wait": lambda: report_then_wait(out)}
    code = launch_local(["-c", f"raise SystemExit({SPAWNED})"], nprocs, fork_target=targets[scenario], grace_s=0.5)
    print(json.dumps({"code": code}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
