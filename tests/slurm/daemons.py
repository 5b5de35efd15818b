"""What both test clusters share: munge, the slurm.conf settings that mattered here, and stopping daemons.

The facts behind the settings: shared/reference/slurm-local.md. Each cluster adds its own ClusterName,
controller address, ports, paths and nodes (conftest.py: one node; two_node.py: two network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

#: slurm.conf settings of both test clusters (no systemd, no cgroups, no accounting database).
COMMON_CONF = """\
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
"""


def skip_unless_slurm_can_run() -> None:
    """Skip (with the reason) where slurm-wlm is not installed or we are not root."""
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None or shutil.which("munged") is None:
        pytest.skip("slurm-wlm is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("a local slurmctld/slurmd needs root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_pids(pids: list[int], *, wait_s: float = 5) -> None:
    """SIGTERM every pid at once and wait for them to go; SIGKILL those left after ``wait_s``."""
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
    deadline = time.monotonic() + wait_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def kill_pid(pid: int, *, wait_s: float = 5) -> None:
    kill_pids([pid], wait_s=wait_s)


def kill_pidfile(*paths: Path) -> None:
    """Stop the daemons whose pid files are ``paths`` (all at once; missing files are skipped)."""
    pids = []
    for path in paths:
        try:
            pids.append(int(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    kill_pids(pids)


def munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_munge() -> bool:
    """Start munged unless one already answers; True when this call started it (the caller stops it)."""
    if munge_works():
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=10)
    for _ in range(50):
        if munge_works():
            return True
        time.sleep(0.1)
    kill_pidfile(Path("/run/munge/munged.pid"))
    pytest.skip("munged did not start (check /etc/munge/munge.key)")
