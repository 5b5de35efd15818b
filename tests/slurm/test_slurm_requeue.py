"""Preemption mid-training on a real SLURM (tests/slurm/conftest.py), through --profile profiles/slurm.

A two-rank CPU cell trains slowly (RETRACE_TEST_STEP_DELAY reaches the job through sbatch --export=ALL);
once it has a complete resume state, SLURM signals the job's steps (``scancel --signal=TERM``, what a
preemption with a grace time or a time-limit warning sends). The ranks save and stop, the job fails, and
Snakemake's retry submits the train job again: ``retrace train`` resumes from the newest complete state
(the ranks agreeing on it), and the cell ends bit-identical to its spec trained in one go.

``scontrol requeue`` of the same job (the same job id coming back) is not used: on Debian's Slurm 22.05
here the requeued batch script starts after ~2.5 min, its inner ``srun`` fails with "Unable to confirm
allocation for job N: Invalid job id specified", and slurmctld never records the job's end, so Snakemake
waits on a job that squeue still shows running.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from interrupted_study import checkpoint_tensors, publish, snakemake_cmd, study, uninterrupted, wait_for_state  # noqa: E402
from retrace.grid import load_study  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def train_job_id(cluster, timeout: float = 180) -> str:
    """The SLURM job id of the running train job (the plugin puts the rule name in the job's comment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run("squeue", "-h", "-o", "%i|%k|%T", check=False).stdout
        for line in out.splitlines():
            job, comment, state = line.split("|", 2)
            if "train" in comment and state == "RUNNING":
                return job
        time.sleep(0.5)
    raise AssertionError(f"no running train job within {timeout} s: {out}")


def test_signalled_mid_training_the_retry_resumes_and_ends_bit_identical(slurm_cluster, tmp_path):
    hub = tmp_path / "hub"
    publish(tmp_path, hub)
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(study(hub), sort_keys=False))
    (cell,) = load_study(study_path, root=ROOT).cells()
    wd = tmp_path / "wd"
    run = wd / "results" / "runs" / cell.id
    cmd = ["timeout", "-k", "10", "600", *snakemake_cmd(
        wd, study_path, "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile",
        str(ROOT / "tests" / "slurm" / "profile"), "--retries", "1", f"results/runs/{cell.id}/checkpoints/manifest.json")]
    env = {**slurm_cluster.env(), "PYTHONPATH": str(ROOT / "workflow"), "RETRACE_TEST_STEP_DELAY": "1.0"}
    log_path = tmp_path / "snakemake.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            job = train_job_id(slurm_cluster)
            at = wait_for_state(run, at_least=1)
            slurm_cluster.run("scancel", "--signal=TERM", job)
            code = proc.wait(timeout=620)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 0, text[-4000:]
    submitted = re.findall(r"^Job \d+ has been submitted with SLURM jobid (\d+)", text, re.M)
    assert job in submitted and submitted[-1] != job, submitted  # the train job was submitted again
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from"] >= at, attempts
    assert checkpoint_tensors(run) == checkpoint_tensors(uninterrupted(wd, run))
