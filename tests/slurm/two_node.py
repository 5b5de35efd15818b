"""A real two-node SLURM on one machine: two slurmd, each in its own network and UTS namespace.

Debian's slurmd is built without ``--enable-multiple-slurmd``, so two slurmds in one network namespace
clash (ports, node name). Here each node is a network namespace (``ip netns``) with its own hostname
(``unshare --uts``), joined to the root namespace by a veth pair on a bridge:

* the bridge ``rt-br0`` holds ``CONTROLLER_ADDR`` (slurmctld, in the root namespace); node *i* is
  ``10.77.0.i`` inside namespace ``rt-n<i>`` (hostname ``rt-n<i>``, the node's NodeName);
* each slurmd starts in a mount namespace of its own where the node's ``hosts`` and ``slurm/`` directory
  (under the cluster's temporary directory) are bind-mounted over /etc/hosts and /etc/slurm, and every
  process it starts inherits them: the hosts file makes the node names resolvable (gloo binds to the
  address its hostname resolves to, and the master is the first node's name), slurm.conf is what
  slurmd, the job's batch step and an srun inside the job (Snakemake's jobstep strips SLURM_CONF) read.
  The root /etc is never written: submissions from the root namespace use ``SLURM_CONF``. (Not
  ``ip netns exec``, which does such binds from /etc/netns/<name>/: it also remounts /sys, hiding the
  cgroup mounts slurmd 22.05 insists on finding — "Unable to initialize cgroup plugin".)
* munged runs once, in the root namespace; its socket is a file, seen from every namespace.

Its ClusterName, ports, state and paths differ from the single-node cluster of conftest.py, so both run
in one pytest session. Teardown: scancel, the daemons, every process left in the namespaces, the
namespaces and the bridge. A run killed before its teardown leaves them behind; the next bring-up removes
them first (its slurmctld is known by ``ORPHAN_MARK`` in its environment, the rest by namespace).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemons import COMMON_CONF, ensure_munge, free_port, kill_pid, kill_pidfile, kill_pids

NODES = ("rt-n1", "rt-n2")
BRIDGE = "rt-br0"
SUBNET = "10.77.0"
CONTROLLER_ADDR = f"{SUBNET}.254"
#: CPUs each node claims (SlurmdParameters=config_overrides): room for two ranks and the batch step.
NODE_CPUS = 4
#: In the environment of this cluster's daemons: how a later run finds those of a killed one.
ORPHAN_MARK = "RETRACE_TEST_CLUSTER=two-node"


@dataclass
class TwoNodeCluster:
    conf: Path
    nodes: tuple[str, ...]
    logdir: Path

    def env(self) -> dict[str, str]:
        mark, value = ORPHAN_MARK.split("=")
        return {**os.environ, "SLURM_CONF": str(self.conf), mark: value}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), check=check, timeout=timeout, capture_output=True, text=True)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logdir.glob("*")))


def _addr(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


def _conf(d: Path, ctld_port: int, slurmd_port: int) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr={_addr(i)} CPUs={NODE_CPUS} RealMemory=8000 State=UNKNOWN"
                      for i, n in enumerate(NODES))
    # %n: the node's name, so that the two slurmds keep apart their spool, pid and log files
    return f"""\
ClusterName=retrace-two
SlurmctldHost={socket.gethostname().split(".")[0]}({CONTROLLER_ADDR})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
{COMMON_CONF}StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
{nodes}
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=500
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _netns_exists(name: str) -> bool:
    return name in _ip("netns", "list", check=False).stdout.split()


def _kill_orphan_controllers() -> None:
    """The slurmctld of an earlier run that was killed before its teardown (marked by ``ORPHAN_MARK``)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "slurmctld":
                continue
            marked = ORPHAN_MARK.encode() in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marked:
            kill_pid(int(proc.name))


def _teardown_network() -> None:
    """Every process left in the node namespaces, the namespaces and the bridge; idempotent."""
    for name in NODES:
        if _netns_exists(name):
            kill_pids([int(pid) for pid in _ip("netns", "pids", name, check=False).stdout.split()], wait_s=2)
            _ip("netns", "del", name, check=False)  # takes the veth pair with it, once the namespace is gone
        if _ip("link", "show", f"{name}h", check=False).returncode == 0:  # a namespace that outlived its processes
            _ip("link", "del", f"{name}h", check=False)
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "del", BRIDGE, check=False)


def _network() -> None:
    """The bridge in the root namespace and one namespace per node on it (module doc)."""
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{CONTROLLER_ADDR}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for i, name in enumerate(NODES):
        host_end, node_end = f"{name}h", f"{name}c"
        _ip("netns", "add", name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _ip("link", "set", node_end, "netns", name)
        _ip("link", "set", host_end, "master", BRIDGE)
        _ip("link", "set", host_end, "up")
        for args in (("addr", "add", f"{_addr(i)}/24", "dev", node_end), ("link", "set", node_end, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", name, "ip", *args)


def _node_etc(d: Path, conf_text: str) -> dict[str, Path]:
    """Each node's hosts file and slurm/ directory, which its processes see as /etc's (module doc)."""
    hosts = "127.0.0.1 localhost\n" + "".join(f"{_addr(i)} {n}\n" for i, n in enumerate(NODES))
    out = {}
    for name in NODES:
        etc = d / "nodes" / name
        (etc / "slurm").mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)
        (etc / "slurm" / "slurm.conf").write_text(conf_text)
        out[name] = etc
    return out


def on_node(name: str, etc: Path, command: str) -> list[str]:
    """argv running the shell ``command`` as node ``name``: its network namespace, its hostname, its /etc."""
    return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-ec",
            f"mount --bind {etc}/hosts /etc/hosts; mount --bind {etc}/slurm /etc/slurm; hostname {name}; "
            f"exec nsenter --net=/run/netns/{name} {command}"]


def skip_unless_namespaces_work(tmp: Path) -> None:
    """Skip (with the reason) where the tools are missing or namespaces cannot be made here."""
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"the two-node SLURM test needs `{tool}` (iproute2, util-linux)")
    for target in (Path("/etc/slurm"), Path("/etc/hosts")):
        if not target.exists():
            pytest.skip(f"{target} is missing: nothing to bind-mount a node's own onto")
    probe = "rt-probe"
    made = _ip("netns", "add", probe, check=False)
    try:
        if made.returncode != 0:
            pytest.skip(f"network namespaces are not available here (ip netns add: {made.stderr.strip()})")
        etc = tmp / "probe"
        (etc / "slurm").mkdir(parents=True)
        (etc / "hosts").write_text("10.77.0.9 rt-probe\n")
        argv = on_node(probe, etc, "sh -c 'hostname; getent hosts rt-probe'")
        seen = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if seen.returncode != 0 or seen.stdout.split()[:2] != ["rt-probe", "10.77.0.9"]:
            pytest.skip(f"mount and UTS namespaces cannot be made here ({seen.stderr.strip() or seen.stdout})")
    finally:
        if made.returncode == 0:
            _ip("netns", "del", probe, check=False)


@contextmanager
def two_node_cluster(d: Path) -> Iterator[TwoNodeCluster]:
    """Bring up the cluster with its files under ``d``; everything is stopped and removed on exit."""
    for sub in ("state", "spool", "log", *(f"spool/{n}" for n in NODES)):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "slurm.conf"
    conf.write_text(_conf(d, free_port(), free_port()))
    cluster = TwoNodeCluster(conf=conf, nodes=NODES, logdir=d / "log")
    _kill_orphan_controllers()  # leftovers of an earlier run that was killed before its teardown
    _teardown_network()
    started_munge = False
    try:
        _network()
        etcs = _node_etc(d, conf.read_text())
        started_munge = ensure_munge()
        subprocess.run(["slurmctld"], env=cluster.env(), check=True, timeout=30)
        node_env = {k: v for k, v in cluster.env().items() if k != "SLURM_CONF"}
        for name in NODES:  # slurmd reads the node's /etc/slurm/slurm.conf and takes its NodeName from hostname
            subprocess.run(on_node(name, etcs[name], "slurmd"), env=node_env, check=True, timeout=30)
        for _ in range(300):
            states = cluster.node_states()
            if len(states) == len(NODES) and set(states.values()) == {"idle"}:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the two SLURM nodes never became idle ({cluster.node_states()}):\n{cluster.logs()}")
        yield cluster
    finally:
        if (d / "slurmctld.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["scancel", "--user=root"], env=cluster.env(), capture_output=True, timeout=10)
        kill_pidfile(*(d / f"slurmd-{name}.pid" for name in NODES))
        kill_pidfile(d / "slurmctld.pid")
        _teardown_network()
        if started_munge:
            kill_pidfile(Path("/run/munge/munged.pid"))
