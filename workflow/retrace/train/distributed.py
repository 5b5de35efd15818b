"""Where the ranks come from: torchrun, srun (SLURM, through submitit's helper) or our own local launcher.

Order of precedence in ``detect()``:
  1. ``RANK`` and ``WORLD_SIZE`` already set (torchrun, or workers we spawned) → env:// as given.
  2. SLURM with more than one task in this step (``srun`` one process per GPU, possibly across nodes)
     → ``submitit.helpers.TorchDistributedEnvironment().export()``, which reads SLURM_PROCID,
     SLURM_NTASKS, SLURM_LOCALID, the node list (master = first host) and MASTER_PORT (or a port
     derived from the job id). ``SUBMITIT_EXECUTOR=slurm`` is set first when submitit did not
     launch the job itself (the Snakemake SLURM plugin case).
  3. Nothing: a single process — or, when more ranks are asked for, ``launch_local`` starts them
     (like ``torchrun --standalone``: N python processes, MASTER_ADDR=127.0.0.1 and a free port), each a
     fresh interpreter or, for CPU cells started from the command line, a fork of the launcher (``fork_ok``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # "env" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv | None:
    """The distributed environment this process runs in, or None when there is none."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)), source="env")
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        env.setdefault("SUBMITIT_EXECUTOR", "slurm")
        from submitit.helpers import TorchDistributedEnvironment

        tde = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return DistEnv(rank=tde.rank, world_size=tde.world_size, local_rank=tde.local_rank,
                       local_world_size=tde.local_world_size, source="slurm")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: how ``launch_local`` started this rank ("fork" or "spawn"), for the run's record
LOCAL_START_VAR = "RETRACE_LOCAL_START"

_FORWARD = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def fork_ok() -> bool:
    """Whether ranks may be forks of this process: no Python thread but this one, and no CUDA context.

    A fork shares the launcher's imports (``import torch`` alone is ~2 s of CPU per rank). The caller must
    also know that this process never ran a torch op on more than one thread: a child of a process whose
    libgomp pool exists hangs in its first parallel region (seen with torch 2.13's CPU wheel), and nothing
    in the process can tell. ``retrace train`` knows it (it runs no op before the ranks start); a library
    caller such as a test process does not, so ``train()`` forks only when asked.
    """
    torch = sys.modules.get("torch")
    cuda_started = torch is not None and torch.cuda.is_initialized()
    return threading.active_count() == 1 and not cuda_started


class _ForkedRank:
    """A forked rank with the part of ``subprocess.Popen``'s interface the launcher uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for a signal, as Popen
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork_rank(target: Callable[[], int], env: dict[str, str]) -> _ForkedRank:
    """Fork one rank: in the child, the rank's environment and a fresh interpreter's signal handlers, then
    ``target()``; its return value is the exit status and nothing of the launcher runs after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _ForkedRank(pid)
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(s, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - a rank's crash is reported as a fresh interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch_local(argv: list[str], nprocs: int, *, env: dict[str, str] | None = None, grace_s: float = 20.0,
                 fork_target: Callable[[], int] | None = None) -> int:
    """Run ``python argv…`` as ``nprocs`` local ranks; returns the first non-zero exit code (or 0).

    With ``fork_target`` (and ``fork_ok()``), each rank is instead a fork of this process that runs
    ``fork_target()`` with the rank's environment: the same program without a new interpreter's imports.

    Signals (SIGTERM, SIGUSR2, SIGINT) are forwarded to every rank, which then save their state at the
    end of the current step and exit non-zero. If a rank dies on its own, the others (who would wait
    forever in a collective) are terminated after ``grace_s`` seconds.
    """
    base = dict(os.environ if env is None else env)
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nprocs),
                 "LOCAL_WORLD_SIZE": str(nprocs)})
    fork = fork_target is not None and fork_ok()
    procs: list[subprocess.Popen | _ForkedRank] = []
    for r in range(nprocs):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r), **{LOCAL_START_VAR: "fork" if fork else "spawn"})
        procs.append(_fork_rank(fork_target, e) if fork else subprocess.Popen([sys.executable, *argv], env=e))

    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in _FORWARD}
    try:
        first_bad: int | None = None
        bad_since: float | None = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            for c in codes:
                if c not in (None, 0) and first_bad is None:
                    first_bad, bad_since = c, time.monotonic()
            if bad_since is not None and time.monotonic() - bad_since > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
        if first_bad is not None:
            return first_bad
        return next((c for c in codes if c != 0), 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
