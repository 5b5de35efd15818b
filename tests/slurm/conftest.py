"""A real single-node SLURM (slurmctld + slurmd + munge from Debian's slurm-wlm) for the tests here.

Brought up once per session; state, spool and logs live in a temporary directory. The configuration
goes to /etc/slurm/slurm.conf and gres.conf (any files there are put back afterwards): Snakemake's SLURM
jobstep strips every SLURM_* variable, SLURM_CONF included, before it calls srun inside a job, so srun
must find the configuration in its default place. Two fake GPUs of type a100 (GRES backed by /dev/null and /dev/zero) let
jobs ask for ``--gpus=a100:N``. Facts behind the settings: shared/reference/slurm-local.md.

Tests using ``slurm_cluster`` skip (with the reason) where slurmctld is not installed or we are not root.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _slurm_conf(d: Path, host: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=retrace-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
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
StateSaveLocation={d}/state
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
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None or shutil.which("munged") is None:
        pytest.skip("slurm-wlm is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("a local slurmctld/slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]

    started_munge = False
    if not _munge_works():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=10)
        started_munge = True
        for _ in range(50):
            if _munge_works():
                break
            time.sleep(0.1)
        else:
            pytest.skip("munged did not start (check /etc/munge/munge.key)")

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
    conf.write_text(_slurm_conf(d, host, _free_port(), _free_port()))
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
        _kill_pidfile(d / "slurmd.pid")
        _kill_pidfile(d / "slurmctld.pid")
        if started_munge:
            _kill_pidfile(Path("/run/munge/munged.pid"))
        for name in ("slurm.conf", "gres.conf"):
            if name in saved:
                shutil.copy2(saved[name], etc / name)
            else:
                (etc / name).unlink(missing_ok=True)
