"""A CPU cell of 2 nodes × 2 ranks on a real two-node SLURM (tests/slurm/two_node.py), through the workflow.

``cluster.cpu_ranks_per_node: 2`` places the 4-rank CPU cell on two nodes: the train rule is submitted with
sbatch (``--nodes=2 --ntasks-per-node=2``), its shell runs ``srun`` over both nodes, each rank takes its
rank, world size and master (the first node) from the SLURM environment, and gloo connects the ranks
across the two network namespaces. The cell must end bit-identical — every checkpoint and the final
resume state (less numpy's unseeded global RNG) — to the same spec trained with the same layout on one node (``retrace train`` starting its
4 ranks itself here).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from interrupted_study import STEPS, checkpoint_tensors, publish, snakemake_cmd, study, uninterrupted  # noqa: E402
from retrace.grid import load_study  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


#: numpy's legacy global RNG: saved in every resume state, but never seeded and never drawn from in
#: training, so it differs between any two processes (on one node as much as across nodes).
UNSEEDED = "rng.numpy.keys"


def state_tensors(run: Path, step: int) -> dict[str, dict[str, tuple[str, list[int], bytes]]]:
    """Each rank's resume-state tensors at ``step``: name → (dtype, shape, bytes), ``UNSEEDED`` left out."""
    from safetensors.torch import load_file

    return {p.name: {k: (str(t.dtype), list(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                     for k, t in load_file(str(p)).items() if k != UNSEEDED}
            for p in sorted((run / "state" / f"step{step}").glob("*.safetensors"))}


def test_a_cpu_cell_across_two_nodes_ends_bit_identical_to_one_node(slurm_two_nodes, tmp_path):
    hub = tmp_path / "hub"
    publish(tmp_path, hub)
    cfg = study(hub, parallel={"gpus": 4, "pdbs": 2, "gas": 1})
    cfg["cluster"] = {"cpu_ranks_per_node": 2}
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (cell,) = load_study(study_path, root=ROOT).cells()
    wd = tmp_path / "wd"
    run = wd / "results" / "runs" / cell.id
    cmd = ["timeout", "-k", "10", "400", *snakemake_cmd(
        wd, study_path, "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile",
        str(ROOT / "tests" / "slurm" / "profile"), f"results/runs/{cell.id}/checkpoints/manifest.json")]
    env = {**slurm_two_nodes.env(), "PYTHONPATH": str(ROOT / "workflow")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    log = out.stdout + out.stderr
    train_log = wd / "results" / "logs" / "train" / f"{cell.id}.log"
    assert out.returncode == 0, (log[-4000:], train_log.read_text()[-3000:] if train_log.exists() else "",
                                 slurm_two_nodes.logs())

    # sbatch asked for two nodes of two tasks; the job got both nodes
    jobs = [ln.split("|") for ln in slurm_two_nodes.run("squeue", "-h", "-t", "all", "-o", "%i|%k").stdout.splitlines()]
    (train_job,) = [job for job, comment in jobs if "train" in comment]  # the plugin names the rule there
    info = slurm_two_nodes.run("scontrol", "show", "job", train_job).stdout
    assert "NodeList=rt-n[1-2]" in info and "NumNodes=2" in info and "NumTasks=4" in info, info
    # every rank took its place from SLURM (srun's tasks) and ran on the node SLURM put it on: gloo
    # connected ranks in two network namespaces
    record = json.loads((run / "run.json").read_text())
    assert record["distributed"]["source"] == "slurm" and record["distributed"]["world_size"] == 4
    assert record["distributed"]["backend"] == "gloo"
    (attempt,) = record["attempts"]
    assert attempt["rank_hosts"] == ["rt-n1", "rt-n1", "rt-n2", "rt-n2"], attempt["rank_hosts"]
    assert attempt["environment"]["slurm_job_id"] == train_job

    # the same layout on one node: the same spec, 4 local ranks; every checkpoint and the last state equal
    local = uninterrupted(wd, run)
    here = json.loads((local / "run.json").read_text())
    assert here["distributed"]["source"] == "env" and here["distributed"]["world_size"] == 4
    assert here["attempts"][0]["rank_hosts"] == [socket.gethostname()] * 4
    got = checkpoint_tensors(run)
    assert sorted(got) == [f"step{s}.safetensors" for s in (0, 1, 2, 4, 8)]
    assert got == checkpoint_tensors(local)
    state = state_tensors(run, STEPS)
    assert sorted(state) == [f"rank{r}.safetensors" for r in range(4)]  # ZeRO-1: a partition per rank
    assert all("group0.master" in t and "rng.torch" in t for t in state.values())
    assert state == state_tensors(local, STEPS)
