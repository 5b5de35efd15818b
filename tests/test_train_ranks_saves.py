"""Real gloo ranks around saves and stops: a slow rank-0 save does not kill the others, SIGUSR2 delivered to
every process of the job (as SLURM signals a step) saves and stops, the job's end time stops the run like
the signal, and ranks whose newest shards differ in health agree on one resume step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrace.errors import RetraceError
from retrace.train import TrainConfig, TrainingInterrupted, train
from test_train_helpers import SEQ, B, argv, load_ckpt, masters


def _cfg(world: Path, out: str, steps: int, **over) -> TrainConfig:
    kw = dict(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / out), steps=steps,
              recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, gpus=2, pdbs=2, gas=2,
              precision="fp16", threads=1, progress=False, device="cpu")
    kw.update(over)
    return TrainConfig(**kw)


@pytest.mark.slow
def test_a_slow_rank0_save_does_not_kill_the_other_ranks(world):
    """Collective timeout 4 s (gloo), rank 0's checkpoint writes take 7 s: the other rank waits in the save
    group's barrier, whose timeout fits the save, and the run ends bitwise equal to one without delay."""
    fast = train(_cfg(world, "nodelay", 3, save_steps=[3]))
    slow = train(_cfg(world, "slowsave", 3, save_steps=[3], extra={"pg_timeout_s": 4, "save_delay_s": 7}))
    assert slow.final_step == 3
    a, b = load_ckpt(fast.out / "checkpoints" / "step3.safetensors"), load_ckpt(slow.out / "checkpoints" / "step3.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((slow.out / "run.json").read_text())
    assert run["distributed"]["save_timeout_s"] >= 600  # sized from the model: never below NCCL's default


@pytest.mark.slow
def test_a_save_longer_than_the_save_timeout_is_one_clear_error(world, capfd):
    """The wait is bounded by --save-timeout-s: a save that outlasts it stops the waiting rank with a message
    naming the setting (not an anonymous collective timeout)."""
    with pytest.raises(RetraceError, match="training ranks failed"):
        train(_cfg(world, "tooslow", 2, save_steps=[2], save_timeout_s=2, extra={"save_delay_s": 6}))
    err = capfd.readouterr().err
    assert "rank 1: the ranks did not all finish the start checkpoint (step 0) within --save-timeout-s 2 s" in err


@pytest.mark.slow
def test_sigusr2_to_every_process_saves_and_resumes_bit_identically(world):
    """SLURM's --signal (without B:) signals every process of the ranks' step: here the launcher and its two
    ranks all get SIGUSR2 at once (killpg of a new session). They save at the end of the step, exit 140, and
    the rerun ends equal to an uninterrupted run."""
    steps = 8
    ref = subprocess.run(argv(world, "usr2_ref", steps, 2, 2, 2), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    cmd = argv(world, "usr2", steps, 2, 2, 2)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, RETRACE_TEST_STEP_DELAY="0.1"))
    lines, deadline = [], time.monotonic() + 180
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step "):  # the first progress line (step 1) ...
            break
        assert time.monotonic() < deadline
    time.sleep(0.35)  # ... and a few steps later, in the middle of one
    os.killpg(proc.pid, signal.SIGUSR2)
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=180) == 128 + signal.SIGUSR2, err
    assert "stopped by SIGUSR2" in err
    saved = sorted(int(p.name[4:]) for p in (world / "usr2" / "state").iterdir())
    assert 1 <= saved[-1] < steps and not (world / "usr2" / "checkpoints" / "manifest.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    a = load_ckpt(world / "usr2_ref" / "checkpoints" / f"step{steps}.safetensors")
    b = load_ckpt(world / "usr2" / "checkpoints" / f"step{steps}.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_jobs_end_time_stops_the_run_like_sigusr2(world, monkeypatch):
    """SLURM_JOB_END_TIME an hour away and a stop lead of an hour: the run saves after its first step and
    stops with SIGUSR2's status; the rerun without a deadline completes from that state."""
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 3600))
    cfg = _cfg(world, "deadline", 4, gpus=1, pdbs=4, stop_lead_s=3600)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.signum == signal.SIGUSR2 and info.value.step == 1
    assert (world / "deadline" / "state" / "step1" / "state.json").is_file()
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert train(cfg).final_step == 4
    run = json.loads((world / "deadline" / "run.json").read_text())
    assert [a["resumed_from"] for a in run["attempts"]] == [None, 1]


def test_squeue_end_times_parse():
    from retrace.train.deadline import parse_squeue_time, stop_deadline

    assert parse_squeue_time("N/A") is None and parse_squeue_time("Unknown") is None
    t = parse_squeue_time("2026-12-01T12:00:00")
    assert t is not None and abs(t - time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))) < 1
    assert stop_deadline(60, {"SLURM_JOB_END_TIME": "1000"}) == 940
    assert stop_deadline(0, {"SLURM_JOB_END_TIME": "1000"}) is None and stop_deadline(60, {}) is None


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["builtin", "deepspeed"])
def test_ranks_agree_when_one_ranks_newest_shard_is_damaged(world, engine):
    """Two real ranks, a state per rank (builtin ZeRO-1, or DeepSpeed's partitions): rank 1's newest shard
    is corrupted, so both ranks resume from the step before, and the run ends equal to an uninterrupted one."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    over = {"engine": engine, "precision": "fp32" if engine == "deepspeed" else "fp16", "save_steps": [2, 4]}
    full = train(_cfg(world, f"agree_full_{engine}", 6, **over))
    part = _cfg(world, f"agree_{engine}", 4, **over)
    train(part)
    out = Path(part.out)
    f = out / "state" / "step4" / "rank1.safetensors"
    data = bytearray(f.read_bytes())
    data[-64] ^= 0xFF
    f.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "retrace", "train", "--spec",
                           json.dumps({**part.to_dict(), "steps": 6}),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ranks agree on resuming from step 2" in proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["attempts"][-1]["resumed_from"] == 2
    a = load_ckpt(full.out / "checkpoints" / "step6.safetensors")
    b = load_ckpt(out / "checkpoints" / "step6.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        ma, mb = masters(full.out, 6, f"rank{r}"), masters(out, 6, f"rank{r}")
        assert all(torch.equal(ma[k], mb[k]) for k in ma if not k.startswith("rng."))
