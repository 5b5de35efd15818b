"""A tiny one-cell study whose training can be interrupted mid-run, for the requeue and Ctrl-C tests.

``publish`` really trains a tiny run (steps 0-8) and publishes it to a local hub cache; ``study`` is a
CPU cell of two ranks reproducing it to step 8 (checkpoints 0, 1, 2, 4, 8, a resume state at each);
``uninterrupted`` trains the cell's spec again, in one go, beside it.
``RETRACE_TEST_STEP_DELAY`` (read by the trainer) slows each step so that a test can interrupt it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"n_layers": 2, "hidden": 32, "heads": 4, "vocab": 128, "seq_len": 32}
SYNTH = {"seed": 1234, "tokens": 20000, "vocab": 128, "seq_length": 32}
STEPS = 8
REPO = "retrace-test/tiny"


def retrace(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    out = subprocess.run([sys.executable, "-m", "retrace", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def publish(tmp: Path, hub: Path, *, steps: int = STEPS, repos: tuple[str, ...] = (REPO,)) -> None:
    """Really train the tiny run to ``steps`` (1 rank, pdbs 8) and publish it under each of ``repos``."""
    retrace("synth", "--out", "data", "--seed", "1", "--tokens", "20000", "--vocab", "128", "--seq-length", "32",
            cwd=tmp)
    retrace("reference", "init", *(f"--{k.replace('_', '-')}={v}" for k, v in SHAPE.items()), "--out", "init",
            cwd=tmp)
    retrace("train", "--reference", "init", "--data", "data/standard/preshuffled/document", "--data-kind",
            "preshuffled", "--gpus", "1", "--pdbs", "8", "--gas", "1", "--global-batch", "8", "--seq-length", "32",
            "--recipe", "70m", "--train-iters", "100", "--steps", str(steps), "--no-progress", "--out", "run", cwd=tmp)
    for repo in repos:
        retrace("reference", "publish", "--run", "run", "--config", "init/config.json", "--hub-cache", str(hub),
                "--repo", repo, cwd=tmp)


def study(hub: Path, parallel: dict | None = None) -> dict:
    model = {"reference": REPO, "hub_cache": str(hub), "recipe": "70m", "global_batch": 8, "seq_length": 32,
             "train_iters": 100}
    return {
        "study": "interrupted",
        "design": "one_at_a_time",
        "synthetic": SYNTH,
        "data": {"deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"}},
        "models": {"tiny": model},
        "axes": {"model": ["tiny"], "data": ["deduped-raw"],
                 "parallel": [parallel or {"gpus": 2, "pdbs": 4, "gas": 1}], "gpu_type": ["cpu"],
                 "steps": [STEPS]},
    }


def snakemake_cmd(workdir: Path, study_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile",
            str(study_path), *extra]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), **extra}


def checkpoint_tensors(run: Path) -> dict[str, tuple[dict, bytes]]:
    """Each checkpoint's tensor table and data bytes, without the metadata (which names paths)."""
    got = {}
    for p in sorted((run / "checkpoints").glob("step*.safetensors")):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        got[p.name] = (header, raw[8 + n:])
    return got


def wait_for_state(run: Path, *, at_least: int, timeout: float = 240) -> int:
    """Wait until ``run`` has a complete resume state at step >= ``at_least``; returns that step."""
    from retrace.train.state import complete_steps

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = complete_steps(run / "state")
        if steps and steps[-1] >= at_least:
            return steps[-1]
        time.sleep(0.2)
    raise AssertionError(f"{run}: no resume state at step >= {at_least} within {timeout} s")


def uninterrupted(workdir: Path, run: Path) -> Path:
    """Train the spec ``run`` recorded (run.json ``arguments``) again without interruption, in ``workdir``
    (its inputs are relative to it), into ``<run>-uninterrupted``; returns that run directory."""
    spec = json.loads((run / "run.json").read_text())["arguments"]
    out = run.with_name(run.name + "-uninterrupted")
    spec.update(out=str(out), progress=False)
    retrace("train", "--spec", json.dumps(spec), "--threads", "1", "--out", str(out), cwd=workdir)
    return out
