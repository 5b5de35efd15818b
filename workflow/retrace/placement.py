"""Where a training run executes: the resources its job asks the scheduler for, and its CPU threads.

One rule for every run the workflow starts (a cell's train job, a built reference's), from the run's
parallel layout, its ``gpu_type`` and the study's ``cluster`` section:

* CPU (``gpu_type: cpu``), at most ``cluster.cpu_ranks_per_node`` ranks (unset: any number): one task on
  one node; ``retrace train`` starts every rank itself, each with ``cluster.threads_per_rank`` threads, so
  the job needs ranks × threads_per_rank CPUs.
* CPU, more: ``nodes`` × ``tasks_per_node`` srun tasks, one rank each with ``threads_per_rank`` CPUs,
  exactly as a multi-node GPU cell without the GPUs (gloo across the nodes).
* GPU, at most ``cluster.gpus_per_node`` GPUs: one task asking ``gpu`` GPUs of ``gpu_model`` (and the
  node feature ``constraint``); ``retrace train`` starts one rank per GPU.
* GPU, more: ``nodes`` × ``tasks_per_node`` srun tasks, one rank per GPU (``mpi = "srun"``), the GPUs
  asked per node through ``slurm_extra``. With one rank per node (``cluster.gpus_per_node: 1``, or
  ``cluster.cpu_ranks_per_node: 1`` for a CPU cell) the job asks for ``tasks`` = nodes instead, and ``--ntasks-per-node=1`` through ``slurm_extra``: the SLURM
  plugin refuses an mpi job's ``tasks_per_node`` of 1 (snakemake-executor-plugin-slurm 2.8
  submit_string.py, "'tasks_per_node' must be greater than 1") but takes ``tasks`` > 1.

A cell trained by ``retrace train`` (``rank_tasks``) on two GPUs or more runs its ranks as srun tasks on
one node too (under SLURM; elsewhere ``retrace train`` starts them itself), and, like every such cell
across nodes (GPU or CPU), asks SLURM for an early ``--signal=USR2@lead`` (``stop_signal_s``): the ranks then save and stop before the time limit. Why srun
tasks: the SLURM jobstep plugin runs a job without the ``mpi`` resource as ``srun -n1 snakemake …``, so
a step signal reaches that inner Snakemake too, which dies on SIGUSR2 (Python's default action), and
SLURM then kills what is left of the step — the ranks in the middle of their save. With ``mpi`` the
inner Snakemake runs in the batch step, which ``--signal`` without ``B:`` leaves alone, and only the
ranks' own step is signalled. A one-GPU cell cannot be an mpi job (the SLURM plugin refuses one task), so
it gets no signal and stops by the job's end time instead (``retrace train --stop-lead-s``), as does a
CPU cell on one node (one task: ``retrace train`` starts its ranks).

Sizes for the waits around a save (``save_bytes``, ``save_timeout_s``, ``stop_lead_s``) assume the
busiest rank writes ``SAVE_BYTES_PER_S`` (a busy shared filesystem); the trainer uses the same figures.

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
    tasks: int | None = None  # the job's tasks in all: only where tasks_per_node would be 1 (module doc)
    mpi: str | None = None
    cpus_per_task: int | None = None  # None: the job's threads
    slurm_extra: str | None = None

    @property
    def launcher(self) -> str:
        """What starts the ranks: nothing (``retrace train`` starts local ranks itself), or srun: across
        nodes always; on one node only inside a SLURM job (``${SLURM_JOB_ID:+…}``: the same command runs
        under the local executor). The inner srun states its CPUs per rank: since Slurm 22.05 it no longer
        inherits --cpus-per-task from the allocation."""
        if self.mpi is None:
            return ""
        cpus = f" --cpus-per-task={self.cpus_per_task}" if self.cpus_per_task else ""
        srun = f"srun --nodes={self.nodes} --ntasks-per-node={self.ranks_per_node}{cpus} --kill-on-bad-exit=1"
        return srun if self.nodes > 1 else "${SLURM_JOB_ID:+" + srun + "}"

    def resource(self, name: str, threads: int | None = None) -> Any:
        """The value of one Snakemake resource of the train rule (``cpus_per_task`` falls back to the
        job's threads)."""
        if name == "cpus_per_task" and self.cpus_per_task is None:
            return threads
        return getattr(self, name)


#: Bytes per second the busiest rank is assumed to write at a save (a busy shared filesystem).
SAVE_BYTES_PER_S = 25_000_000
#: NCCL's default collective timeout (10 min): the save timeout never goes below it.
MIN_COLLECTIVE_TIMEOUT_S = 600
#: Seconds for the step in flight when the stop comes, and slack (SLURM signals up to 60 s early or late).
STEP_MARGIN_S = 300


def save_bytes(*, n_params: int, dp: int, zero1: bool) -> int:
    """Bytes the busiest rank (rank 0) writes at a save step: the fp16 checkpoint (2 B/param) and its resume
    state (fp32 master and the two Adam moments, 12 B/param; divided by ``dp`` under ZeRO-1)."""
    state = 12 * int(n_params)
    if zero1 and dp > 1:
        state = -(-state // dp)
    return 2 * int(n_params) + state


def save_timeout_s(*, n_params: int, dp: int, zero1: bool) -> int:
    """How long a rank waits for a save (and the collective timeout): NCCL's 10 minutes plus the save's time at
    ``SAVE_BYTES_PER_S``. pythia-2.8b: ≈ 16 min with ZeRO-1 on 8 ranks, ≈ 36 min replicated."""
    return MIN_COLLECTIVE_TIMEOUT_S + -(-save_bytes(n_params=n_params, dp=dp, zero1=zero1) // SAVE_BYTES_PER_S)


def stop_lead_s(*, n_params: int, dp: int, zero1: bool) -> int:
    """Seconds before the time limit to stop: a step's margin plus the save, rounded up to a minute."""
    s = STEP_MARGIN_S + -(-save_bytes(n_params=n_params, dp=dp, zero1=zero1) // SAVE_BYTES_PER_S)
    return -(-s // 60) * 60


def place(*, gpus: int, gpu_type: str, cluster: dict[str, Any], rank_tasks: bool = False,
          stop_signal_s: int | None = None) -> Placement:
    """The placement of a run of ``gpus`` data-parallel ranks on ``gpu_type`` (see the module doc).

    Args:
        gpus, gpu_type, cluster: the layout's ranks, the cell's GPU axis value, the study's ``cluster``.
        rank_tasks: the ranks are ``retrace train``'s (they handle SIGUSR2): on one node with two GPUs or
            more they run as srun tasks too, and srun-task placements (these, and any across nodes) get
            ``stop_signal_s``.
        stop_signal_s: ask SLURM for SIGUSR2 this many seconds before the time limit (srun-task
            placements only; see the module doc).
    """
    tpr = cluster["threads_per_rank"]
    signal = [f"--signal=USR2@{int(stop_signal_s)}"] if rank_tasks and stop_signal_s else []
    if gpu_type == "cpu":
        per_node = cluster.get("cpu_ranks_per_node") or gpus
        if gpus <= per_node:
            return Placement(nodes=1, ranks_per_node=gpus, threads=gpus * tpr)
        return _across_nodes(gpus=gpus, per_node=per_node, key="cluster.cpu_ranks_per_node", tpr=tpr,
                             constraint=None, gres=None, signal=signal)
    per_node = cluster["gpus_per_node"]
    ranks = min(gpus, per_node)
    nodes = -(-gpus // per_node)
    model = cluster["gpu_models"].get(gpu_type, gpu_type) or None  # "": untyped GPUs
    constraint = cluster["gpu_constraints"].get(gpu_type)
    for what, value in (("cluster.gpu_models", model), ("cluster.gpu_constraints", constraint)):
        if value is not None and not re.fullmatch(SCHEDULER_WORD, value):
            raise RetraceError(f"config key {what}.{gpu_type}: {value!r} is not a scheduler word "
                               "(letters, digits and ._-:+&|,[]*)")
    if nodes == 1:
        if rank_tasks and gpus > 1:  # ranks as srun tasks (module doc)
            return Placement(nodes=1, ranks_per_node=ranks, threads=ranks * tpr, gpu=gpus, gpu_model=model,
                             constraint=constraint, tasks_per_node=ranks, mpi="srun", cpus_per_task=tpr,
                             slurm_extra=_words(signal))
        return Placement(nodes=1, ranks_per_node=ranks, threads=ranks * tpr, gpu=gpus, gpu_model=model,
                         constraint=constraint)
    return _across_nodes(gpus=gpus, per_node=per_node, key="cluster.gpus_per_node", tpr=tpr, constraint=constraint,
                         gres=f"{model}:{ranks}" if model else str(ranks), signal=signal)


def _across_nodes(*, gpus: int, per_node: int, key: str, tpr: int, constraint: str | None, gres: str | None,
                  signal: list[str]) -> Placement:
    """``gpus`` ranks as srun tasks, ``per_node`` on each node (``key`` names that setting), with ``gres``
    GPUs per node (None: a CPU run)."""
    if gpus % per_node:
        raise RetraceError(f"a run of {gpus} ranks does not fill whole nodes of {key} = {per_node}: srun "
                           "gives every node the same number of ranks")
    nodes = gpus // per_node
    gpus_per_node = [f"--gpus-per-node={gres}"] if gres else []
    if per_node == 1:  # one rank per node: tasks, not tasks_per_node (module doc)
        return Placement(nodes=nodes, ranks_per_node=1, threads=tpr, constraint=constraint, tasks=nodes, mpi="srun",
                         cpus_per_task=tpr, slurm_extra=_words(["--ntasks-per-node=1", *gpus_per_node, *signal]))
    return Placement(nodes=nodes, ranks_per_node=per_node, threads=per_node * tpr, constraint=constraint,
                     tasks_per_node=per_node, mpi="srun", cpus_per_task=tpr,
                     slurm_extra=_words([*gpus_per_node, *signal]))


#: The train rule's Snakemake resources a placement may set (besides threads).
RESOURCES = ("gpu", "gpu_model", "constraint", "nodes", "tasks_per_node", "tasks", "mpi", "cpus_per_task",
             "slurm_extra")


#: ``shared_resources``' value of a resource that differs between placements (a function of the cell).
VARIES = object()


def shared_resources(placements: list[Placement]) -> dict[str, Any]:
    """The ``RESOURCES`` some placement sets, each with its value where every placement asks the same, else
    ``VARIES``. The train rule declares only these, as constants where they are shared: Snakemake inspects
    and calls a resource function per job (at 5,000 cells that is seconds of DAG time), so a CPU study's
    jobs carry no resource functions at all. ``cpus_per_task`` is declared wherever some placement is an
    mpi job; it varies where some placement leaves it to the job's threads (``Placement.resource``).
    """
    shared: dict[str, Any] = {}
    for name in RESOURCES:
        if name == "cpus_per_task":
            if not any(p.mpi for p in placements):
                continue
            values = {p.cpus_per_task for p in placements}
            shared[name] = values.pop() if len(values) == 1 and None not in values else VARIES
            continue
        values = {getattr(p, name) for p in placements}
        if values == {None}:
            continue  # asked for by no placement: Snakemake would drop it in every job
        shared[name] = values.pop() if len(values) == 1 else VARIES
    return shared


def _words(words: list[str]) -> str | None:
    """sbatch options for ``slurm_extra`` (one shell word each), or None for none."""
    return " ".join(shlex.quote(w) for w in words) or None


def train_placement(*, cell: Any, cluster: dict[str, Any]) -> Placement:
    """The placement of a cell's train job: ``place`` with, for the engines of ``retrace train``, ranks as
    srun tasks and, where they are (a GPU cell of two GPUs or more, any cell across nodes), SIGUSR2
    ``stop_lead_s`` before the limit (sized from the model's recipe size)."""
    rank_tasks = cell.engine != "neox"
    where = place(gpus=cell.parallel.gpus, gpu_type=cell.gpu_type, cluster=cluster, rank_tasks=rank_tasks)
    if not (rank_tasks and where.mpi):
        return where
    from retrace.pythia.sizes import PYTHIA_SIZES

    recipe = cell.model.recipe_values()
    shape = PYTHIA_SIZES.get(cell.model.recipe)
    n = shape.n_params if shape is not None else 0
    zero1 = cell.engine == "deepspeed" or recipe.zero_stage >= 1
    lead = stop_lead_s(n_params=n, dp=cell.parallel.gpus, zero1=zero1)
    return place(gpus=cell.parallel.gpus, gpu_type=cell.gpu_type, cluster=cluster, rank_tasks=rank_tasks,
                 stop_signal_s=lead)


def gpu_limit_error(*, cell_id: str, placement: Placement, gpu_limit: int | None) -> str | None:
    """Why a cell must not run under a ``--resources gpu=N`` limit, or None where it may.

    Snakemake caps a job's resources at the global limits instead of holding the job back
    (snakemake 9 rules.py ``expand_items(constraints=self.workflow.global_resources)``): a cell asking for
    8 GPUs under ``gpu=4`` (or profiles/local's ``gpu=0``) would start with 4 (or none). The workflow
    stops with this message naming the cell instead.
    """
    if gpu_limit is None or placement.gpu is None or placement.gpu <= gpu_limit:
        return None
    return (f"cell {cell_id} needs {placement.gpu} GPUs on one node, but this run allows {gpu_limit} "
            f"(--resources gpu={gpu_limit}; profiles/local sets gpu=0): Snakemake would start it on fewer. "
            "Raise the limit to this machine's GPU count if it has enough, run the study under "
            "profiles/slurm, or leave this cell out (ask for other targets)")
