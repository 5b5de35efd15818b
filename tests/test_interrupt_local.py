"""The local profile, interrupted: Ctrl-C (SIGINT to Snakemake's process group, as a terminal sends it) in
the middle of a two-rank CPU cell's training, then a plain rerun. The rerun resumes from the newest
complete state and the cell ends bit-identical to an uninterrupted run of the same study."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import yaml

from interrupted_study import (
    ROOT,
    checkpoint_tensors,
    env,
    publish,
    snakemake_cmd,
    study,
    uninterrupted,
    wait_for_state,
)
from retrace.grid import load_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    hub = tmp / "hub"
    publish(tmp, hub)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study(hub), sort_keys=False))
    (cell,) = load_study(path, root=ROOT).cells()
    return {"tmp": tmp, "study": path, "cell": cell.id}


def local_run(published, workdir, **extra_env):
    cmd = snakemake_cmd(workdir, published["study"], "--profile", str(ROOT / "profiles" / "local"), "--cores", "2",
                        f"results/runs/{published['cell']}/checkpoints/manifest.json")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(**extra_env), start_new_session=True)


def test_ctrl_c_mid_training_then_rerun_is_bit_identical(published):
    tmp, cell = published["tmp"], published["cell"]
    wd = tmp / "interrupted"
    run = wd / "results" / "runs" / cell
    proc = local_run(published, wd, RETRACE_TEST_STEP_DELAY="0.3")
    try:
        at = wait_for_state(run, at_least=2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, log[-3000:]
    assert not (run / "checkpoints" / "manifest.json").exists(), log[-3000:]

    again = local_run(published, wd)
    log = again.communicate(timeout=600)[0]
    assert again.returncode == 0, log[-3000:]
    assert checkpoint_tensors(run) == checkpoint_tensors(uninterrupted(wd, run))
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from"] >= at, attempts
