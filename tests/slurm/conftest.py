"""A real single-node SLURM (slurmctld + slurmd + munge from Debian's slurm-wlm) for the tests here.

Brought up once per session; state, spool and logs live in a temporary directory. The configuration
goes to /etc/slurm/slurm.conf and gres.conf (any files there are put back afterwards): Snakemake's SLURM
jobstep strips every SLURM_* variable, SLURM_CONF included, before it calls srun inside a job, so srun
must find the configuration in its default place. Two fake GPUs of type a100 (GRES backed by /dev/null and /dev/zero) let
jobs ask for ``--gpus=a100:N``. Facts behind the settings: shared/reference/slurm-local.md.

Tests using ``slurm_cluster`` skip (with the reason) where slurmctld is not installed or we are not root.
``slurm_two_nodes`` is a second, independent cluster of two nodes (two_node.py); both can be up at once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemons import COMMON_CONF, ensure_munge, free_port, kill_pidfile, skip_unless_slurm_can_run
from two_node import TwoNodeCluster, skip_unless_namespaces_work, two_node_cluster

ROOT = Path(__file__).resolve().parents[2]
FAKE_GPUS = 2
NODE_CPUS = 8


@dataclass
class SlurmCluster:
    conf: Path
    host: str
    logdir: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), check=check, timeout=timeout, capture_output=True, text=True)

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()


def _slurm_conf(d: Path, host: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=retrace-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
{COMMON_CONF}StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory=16000 Gres=gpu:a100:{FAKE_GPUS} Feature=a100 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=500
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    skip_unless_slurm_can_run()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]

    started_munge = ensure_munge()

    for i, dev in enumerate(("/dev/null", "/dev/zero")[:FAKE_GPUS]):
        (d / f"fakegpu{i}").symlink_to(dev)
    etc = Path("/etc/slurm")
    etc.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("slurm.conf", "gres.conf"):
        if (etc / name).exists():
            saved[name] = d / f"saved-{name}"
            shutil.copy2(etc / name, saved[name])
    conf = etc / "slurm.conf"
    conf.write_text(_slurm_conf(d, host, free_port(), free_port()))
    (etc / "gres.conf").write_text(
        f"AutoDetect=off\nNodeName={host} Name=gpu Type=a100 File={d}/fakegpu[0-{FAKE_GPUS - 1}]\n")
    cluster = SlurmCluster(conf=conf, host=host, logdir=d / "log")
    env = cluster.env()
    try:
        subprocess.run(["slurmctld"], env=env, check=True, timeout=30)
        subprocess.run(["slurmd"], env=env, check=True, timeout=30)
        for _ in range(200):
            state = cluster.node_state()
            if state == "idle":
                break
            if state.startswith(("drain", "down")) and "*" not in state:
                cluster.run("scontrol", "update", f"nodename={host}", "state=resume", check=False)
            time.sleep(0.1)
        else:
            logs = "\n".join(p.read_text()[-2000:] for p in cluster.logdir.glob("*.log"))
            pytest.fail(f"SLURM node never became idle (state {cluster.node_state()!r}):\n{logs}")
        yield cluster
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=10)
        kill_pidfile(d / "slurmd.pid")
        kill_pidfile(d / "slurmctld.pid")
        if started_munge:
            kill_pidfile(Path("/run/munge/munged.pid"))
        for name in ("slurm.conf", "gres.conf"):
            if name in saved:
                shutil.copy2(saved[name], etc / name)
            else:
                (etc / name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory) -> TwoNodeCluster:
    """A real two-node cluster (tests/slurm/two_node.py): nodes rt-n1 and rt-n2, each in its own network
    namespace; skips where slurm-wlm, root or namespaces are missing."""
    skip_unless_slurm_can_run()
    skip_unless_namespaces_work(tmp_path_factory.mktemp("netns-probe"))
    with two_node_cluster(tmp_path_factory.mktemp("slurm-two")) as cluster:
        yield cluster
