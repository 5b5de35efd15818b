"""Where ranks come from: torchrun's variables, or SLURM's (srun) through submitit's helper."""

from __future__ import annotations

import os

import pytest

from retrace.train.distributed import detect

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SUBMITIT_EXECUTOR")


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)  # submitit's export() writes os.environ directly: restore all of it after
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SRUN_")) or k in LAUNCH_VARS:
            monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def test_no_launcher_means_single_process(clean_env):
    assert detect() is None
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")  # one task (Snakemake's jobstep): we start our own ranks
    assert detect() is None


def test_torchrun_variables(clean_env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (3, 4, 1, 2, "env")


def test_srun_across_two_nodes_through_submitit(clean_env):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    for k, v in slurm.items():
        clean_env.setenv(k, v)
    env = detect()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 4, "slurm")
    assert os.environ["SUBMITIT_EXECUTOR"] == "slurm"  # needed when submitit did not launch the job
    assert os.environ["MASTER_ADDR"] == "gpu07"  # the first host of the node list
    assert os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "8" and os.environ["LOCAL_RANK"] == "1"
    port = int(os.environ["MASTER_PORT"])
    assert 20000 <= port <= 60000  # derived from the job id: the same on every rank
    clean_env.delenv("MASTER_PORT")
    for k in ("RANK", "WORLD_SIZE"):
        clean_env.delenv(k)
    assert detect().rank == 5 and int(os.environ["MASTER_PORT"]) == port
