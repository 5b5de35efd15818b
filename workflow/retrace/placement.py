"""Where a training run executes: the resources its job asks the scheduler for, and its CPU threads.

One rule for every run the workflow starts (a cell's train job, a built reference's), from the run's
parallel layout, its ``gpu_type`` and the study's ``cluster`` section:

* CPU (``gpu_type: cpu``): one task on one node; ``retrace train`` starts every rank itself, each with
  ``cluster.threads_per_rank`` threads, so the job needs ranks × threads_per_rank CPUs.
* GPU, at most ``cluster.gpus_per_node`` GPUs: one task asking ``gpu`` GPUs of ``gpu_model`` (and the
  node feature ``constraint``); ``retrace train`` starts one rank per GPU.
* GPU, more: ``nodes`` × ``tasks_per_node`` srun tasks, one rank per GPU (``mpi = "srun"``), the GPUs
  asked per node through ``slurm_extra``.

Values that reach the sbatch command line (GPU model names, constraints) are checked against
``SCHEDULER_WORD`` by the study schema and quoted here: the SLURM plugin runs sbatch through a shell.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from retrace.errors import RetraceError

#: What a GPU model name or a node-feature expression may contain (letters, digits, ``._-:+``, and the
#: feature operators ``&|,[]*``): nothing a shell would expand. Also the schema's pattern.
SCHEDULER_WORD = r"[A-Za-z0-9][A-Za-z0-9._:+\-&|,\[\]*]*"


@dataclass(frozen=True)
class Placement:
    """What one training run asks for. None = not asked for (Snakemake drops the resource)."""

    nodes: int
    ranks_per_node: int
    threads: int  # CPU threads on the (first) node: ranks there × threads per rank
    gpu: int | None = None
    gpu_model: str | None = None
    constraint: str | None = None
    tasks_per_node: int | None = None
    mpi: str | None = None
    cpus_per_task: int | None = None  # None: the job's threads
    slurm_extra: str | None = None

    @property
    def launcher(self) -> str:
        """What starts the ranks: nothing on one node, srun across nodes. The inner srun states its CPUs per
        rank: since Slurm 22.05 it no longer inherits --cpus-per-task from the allocation."""
        if self.mpi is None:
            return ""
        cpus = f" --cpus-per-task={self.cpus_per_task}" if self.cpus_per_task else ""
        return f"srun --nodes={self.nodes} --ntasks-per-node={self.tasks_per_node}{cpus} --kill-on-bad-exit=1"

    def resource(self, name: str, threads: int | None = None) -> Any:
        """The value of one Snakemake resource of the train rule (``cpus_per_task`` falls back to the
        job's threads)."""
        if name == "cpus_per_task" and self.cpus_per_task is None:
            return threads
        return getattr(self, name)


def place(*, gpus: int, gpu_type: str, cluster: dict[str, Any]) -> Placement:
    """The placement of a run of ``gpus`` data-parallel ranks on ``gpu_type`` (see the module doc)."""
    per_node, tpr = cluster["gpus_per_node"], cluster["threads_per_rank"]
    if gpu_type == "cpu":
        return Placement(nodes=1, ranks_per_node=gpus, threads=gpus * tpr)
    ranks = min(gpus, per_node)
    nodes = -(-gpus // per_node)
    model = cluster["gpu_models"].get(gpu_type, gpu_type) or None  # "": untyped GPUs
    constraint = cluster["gpu_constraints"].get(gpu_type)
    for what, value in (("cluster.gpu_models", model), ("cluster.gpu_constraints", constraint)):
        if value is not None and not re.fullmatch(SCHEDULER_WORD, value):
            raise RetraceError(f"config key {what}.{gpu_type}: {value!r} is not a scheduler word "
                               "(letters, digits and ._-:+&|,[]*)")
    if nodes == 1:
        return Placement(nodes=1, ranks_per_node=ranks, threads=ranks * tpr, gpu=gpus, gpu_model=model,
                         constraint=constraint)
    if gpus % per_node:
        raise RetraceError(f"a run of {gpus} GPUs does not fill whole nodes of cluster.gpus_per_node = "
                           f"{per_node}: srun gives every node the same number of ranks")
    gres = f"{model}:{ranks}" if model else str(ranks)
    return Placement(nodes=nodes, ranks_per_node=ranks, threads=ranks * tpr, constraint=constraint,
                     tasks_per_node=ranks, mpi="srun", cpus_per_task=tpr,
                     slurm_extra=shlex.quote(f"--gpus-per-node={gres}"))


#: The train rule's Snakemake resources a placement may set (besides threads).
RESOURCES = ("gpu", "gpu_model", "constraint", "nodes", "tasks_per_node", "mpi", "cpus_per_task", "slurm_extra")


def resources_used(placements: list[Placement]) -> list[str]:
    """The ``RESOURCES`` some placement sets: the train rule declares only these, so a CPU study's jobs
    carry no resource functions at all (Snakemake inspects each one per job: at 5,000 cells that is
    seconds of DAG time)."""
    if any(p.mpi for p in placements):
        return list(RESOURCES)  # cpus_per_task falls back to the job's threads where it is None
    return [name for name in RESOURCES if any(getattr(p, name) is not None for p in placements)]
