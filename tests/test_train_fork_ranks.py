"""Local ranks as forks of the launcher (`retrace train` in a process of its own, CPU cells): the same
bits as ranks started as fresh interpreters, and the launcher's contract (exit codes, crashes, signals)
kept. A fork skips a rank's `import torch` (~2 s of CPU each: most of an 8-rank cell's start-up on 2
cores); retrace.train.distributed.fork_ok says when it is allowed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from retrace.train import TrainConfig, train
from retrace.train.distributed import LOCAL_START_VAR, launch_local
from test_train_helpers import SEQ, B, load_ckpt

STEPS = 4


def _cfg(root: Path, out: str, gpus: int = 4) -> TrainConfig:
    return TrainConfig(reference=str(root / "ref"), data=str(root / "data" / "tiny"), out=str(root / out),
                       data_kind="preshuffled", steps=STEPS, recipe="70m", global_batch=B, seq_length=SEQ,
                       train_iters=100, gpus=gpus, pdbs=B // (2 * gpus), gas=2, precision="fp16", threads=1, progress=False)


def test_forked_ranks_train_the_same_bits_as_spawned_ones(world):
    spawned = _cfg(world, "spawned")
    train(spawned)  # a library call: it may not fork (this process has run torch ops), so it spawns
    forked = _cfg(world, "forked")
    proc = subprocess.run([sys.executable, "-m", "retrace", "train", "--spec", json.dumps(forked.to_dict())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    starts = {name: json.loads((world / name / "run.json").read_text())["distributed"]["local_start"]
              for name in ("spawned", "forked")}
    assert starts == {"spawned": "spawn", "forked": "fork"}
    for step in (0, 1, 2, 4):
        a = load_ckpt(world / "spawned" / "checkpoints" / f"step{step}.safetensors")
        b = load_ckpt(world / "forked" / "checkpoints" / f"step{step}.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), step
    assert "step 4 reached" in proc.stderr  # the launcher's own message, once
    assert proc.stderr.count("step 4 reached") == 1


PROBE = Path(__file__).with_name("fork_launch_probe.py")


def _launch_forked(scenario: str, nprocs: int, out: Path) -> tuple[int, str]:
    """The launcher with forked ranks in a fresh interpreter (tests/fork_launch_probe.py says why not
    here); returns its exit code and the process's stderr."""
    proc = subprocess.run([sys.executable, str(PROBE), scenario, str(nprocs), str(out)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow")})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["code"], proc.stderr


def test_fork_launcher_returns_the_first_failing_ranks_status(tmp_path):
    assert _launch_forked("ok", 3, tmp_path)[0] == 0
    assert _launch_forked("rank2_fails", 3, tmp_path)[0] == 3


def test_a_forked_ranks_crash_is_reported_and_the_others_are_stopped(tmp_path):
    t0 = time.monotonic()
    code, err = _launch_forked("crash_or_wait", 2, tmp_path)  # grace_s=0.5
    assert code == 1 and time.monotonic() - t0 < 30
    assert "ValueError: rank one broke" in err


def test_forked_ranks_get_their_own_environment_and_the_forwarded_signal(tmp_path):
    code, err = _launch_forked("report_then_wait", 2, tmp_path)
    assert code == 128 + signal.SIGTERM, err  # every rank got the forwarded signal and exited as a saving rank does
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["RANK"] for e in envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and {e[LOCAL_START_VAR] for e in envs} == {"fork"}


def test_with_a_second_thread_the_launcher_spawns_instead(tmp_path):
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    try:
        code = launch_local(["-c", f"import os; open({str(tmp_path)!r} + '/' + os.environ['RANK'], 'w')"
                             f".write(os.environ[{LOCAL_START_VAR!r}])"], 2, fork_target=lambda: 7)
    finally:
        stop.set()
    assert code == 0  # the argv program ran, not the fork target
    assert {(tmp_path / r).read_text() for r in ("0", "1")} == {"spawn"}


def test_a_cli_call_inside_another_program_spawns(world):
    """`retrace.cli.main(argv)` called by a program (this test process, which has run torch ops on several
    threads: a fork of it could hang in libgomp) starts fresh interpreters."""
    from retrace.cli import main

    cfg = _cfg(world, "in_process_cli", gpus=2)
    assert main(["train", "--spec", json.dumps(cfg.to_dict()), "--no-progress"]) == 0
    run = json.loads((world / "in_process_cli" / "run.json").read_text())
    assert run["distributed"]["local_start"] == "spawn"
