"""The placement's known limits: GPU cells under a local GPU limit, one rank per node, CPU cells across nodes.

* Snakemake caps a job's GPU request at ``--resources gpu=N`` instead of holding the job back: the workflow
  must stop with a message naming the cell, never start it on fewer GPUs (profiles/local sets gpu=0).
* ``cluster.gpus_per_node: 1`` (or ``cpu_ranks_per_node: 1``) with a multi-node cell: the resources must
  be ones the real SLURM plugin turns into an sbatch command (it refuses an mpi job's ``tasks_per_node``
  of 1), asking for one task (and one GPU) on each node.
* A CPU cell of more ranks than ``cluster.cpu_ranks_per_node``: srun tasks on whole nodes, no GPU asked."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml

from retrace.placement import place
from snakemake_runner import ROOT, snakemake
from study_factory import synthetic_study


class _Resources(dict):
    """The resource view the plugin reads (``job.resources.get(name)`` and ``job.resources.name``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sbatch_of(placement, threads: int) -> str:
    """The sbatch command snakemake-executor-plugin-slurm builds from a placement's resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    res = {name: placement.resource(name, threads) for name in
           ("gpu", "gpu_model", "constraint", "nodes", "tasks_per_node", "tasks", "mpi", "cpus_per_task",
            "slurm_extra")}
    job = SimpleNamespace(resources=_Resources({k: v for k, v in res.items() if v is not None}, runtime=60,
                                               mem_mb=1000), threads=threads)
    validate_slurm_extra(job)
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": "/tmp"}
    return get_submit_command(job, params)


CLUSTER = {"threads_per_rank": 2, "gpu_models": {}, "gpu_constraints": {}}


@pytest.mark.parametrize("per_node, gpus", [(1, 2), (1, 4), (4, 8)])
def test_multi_node_cells_give_valid_sbatch_resources(per_node, gpus):
    p = place(gpus=gpus, gpu_type="a100", cluster={**CLUSTER, "gpus_per_node": per_node}, rank_tasks=True,
              stop_signal_s=600)
    nodes = gpus // per_node
    cmd = sbatch_of(p, p.threads)
    assert f"--nodes={nodes}" in cmd
    # one task per GPU on every node: either --ntasks-per-node directly or --ntasks=nodes with one per node
    per_node_flag = re.search(r"--ntasks-per-node=(\d+)", cmd)
    assert per_node_flag and int(per_node_flag.group(1)) == per_node, cmd
    total = re.search(r"--ntasks=(\d+)", cmd)
    assert total is None or int(total.group(1)) == gpus, cmd
    assert f"--gpus-per-node=a100:{per_node}" in cmd and "--cpus-per-task=2" in cmd and "--signal=USR2@600" in cmd
    assert p.launcher == f"srun --nodes={nodes} --ntasks-per-node={per_node} --cpus-per-task=2 --kill-on-bad-exit=1"


@pytest.mark.parametrize("per_node, ranks", [(1, 2), (2, 4), (4, 8)])
def test_cpu_cells_across_nodes_give_valid_sbatch_resources(per_node, ranks):
    p = place(gpus=ranks, gpu_type="cpu", cluster={**CLUSTER, "gpus_per_node": 8, "cpu_ranks_per_node": per_node},
              rank_tasks=True, stop_signal_s=300)
    nodes = ranks // per_node
    cmd = sbatch_of(p, p.threads)
    assert f"--nodes={nodes}" in cmd and "--cpus-per-task=2" in cmd and "--signal=USR2@300" in cmd, cmd
    per_node_flag = re.search(r"--ntasks-per-node=(\d+)", cmd)
    assert per_node_flag and int(per_node_flag.group(1)) == per_node, cmd
    total = re.search(r"--ntasks=(\d+)", cmd)
    assert total is None or int(total.group(1)) == ranks, cmd
    assert "--gpus" not in cmd and "--gres" not in cmd, cmd
    assert p.launcher == f"srun --nodes={nodes} --ntasks-per-node={per_node} --cpus-per-task=2 --kill-on-bad-exit=1"


def test_cpu_cells_stay_on_one_node_up_to_cpu_ranks_per_node():
    cluster = {**CLUSTER, "gpus_per_node": 1}
    for per_node in (None, 4):  # unset: any number of ranks on one node
        one = place(gpus=4, gpu_type="cpu", cluster={**cluster, "cpu_ranks_per_node": per_node}, rank_tasks=True,
                    stop_signal_s=300)
        assert (one.nodes, one.ranks_per_node, one.threads, one.mpi, one.launcher, one.slurm_extra) == (
            1, 4, 8, None, "", None)
        assert "--nodes=1 --ntasks=1 --cpus-per-task=8" in sbatch_of(one, one.threads)  # one task, every rank's CPUs


def test_a_cpu_cell_that_does_not_fill_whole_nodes_is_a_config_error():
    from retrace.errors import RetraceError
    from retrace.grid import load_study

    with pytest.raises(RetraceError, match=r"a run of 4 ranks does not fill whole nodes of "
                                           r"cluster.cpu_ranks_per_node = 3"):
        place(gpus=4, gpu_type="cpu", cluster={**CLUSTER, "gpus_per_node": 8, "cpu_ranks_per_node": 3})
    cfg = synthetic_study("uneven", parallel=[{"gpus": 4, "pdbs": 256, "gas": 1}])
    cfg["cluster"] = {"cpu_ranks_per_node": 3}
    with pytest.raises(RetraceError, match=r"axes.parallel\[0\].*cluster.cpu_ranks_per_node = 3"):
        load_study(cfg, root=ROOT)


def _gpu_study(tmp_path):
    cfg = synthetic_study("local-gpu", parallel=[{"gpus": 2, "pdbs": 32, "gas": 16}], gpu_type=["cpu", "a100"])
    cfg["axes"]["data"] = ["deduped-raw"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_local_profile_stops_naming_a_cell_that_needs_more_gpus(tmp_path):
    study = _gpu_study(tmp_path)
    out = snakemake("-n", "--profile", str(ROOT / "profiles" / "local"), "--configfile", str(study),
                    workdir=tmp_path / "wd")
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert re.search(r"cell \S+__g2p32a16__a100__\S+ needs 2 GPUs on one node, but this run allows 0", log), log[-3000:]
    # with enough GPUs allowed, the same DAG is built
    out = snakemake("-n", "--profile", str(ROOT / "profiles" / "local"), "--resources", "gpu=2", "--configfile",
                    str(study), workdir=tmp_path / "wd")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def test_local_profile_runs_cpu_targets_of_a_gpu_study(tmp_path):
    """The GPU cell is only refused when it is scheduled: CPU cells of the same study still run."""
    from retrace.grid import load_study

    study = _gpu_study(tmp_path)
    cpu = next(c.id for c in load_study(study, root=ROOT).cells() if c.gpu_type == "cpu")
    out = snakemake("-n", f"results/runs/{cpu}/checkpoints/manifest.json", "--profile", str(ROOT / "profiles" / "local"),
                    "--configfile", str(study), workdir=tmp_path / "wd")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def test_ranks_never_share_a_gpu():
    from retrace.errors import RetraceError
    from retrace.train.device import check_gpu_count

    check_gpu_count(8, 8, one_per_task=False)
    check_gpu_count(1, 8, one_per_task=True)  # SLURM bound one GPU to each task
    for visible, ranks, bound in ((4, 8, False), (1, 2, False), (2, 4, True), (0, 1, False)):
        with pytest.raises(RetraceError, match=rf"{ranks} ranks on this node but {visible} GPU\(s\) visible"):
            check_gpu_count(visible, ranks, one_per_task=bound)
