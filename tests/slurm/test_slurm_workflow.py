"""The real Snakefile on a real SLURM (tests/slurm/conftest.py), through --profile profiles/slurm.

One tiny study, two runs:
1. three cells: a CPU baseline, the same cell asking for GPUs of type a100 (fake GRES: sbatch --gpus=a100:2),
   and a cell whose local reference has a corrupt step 0. With keep-going the baseline finishes; the
   corrupt one fails, and so does the a100 cell: it gets its (fake) GPUs from SLURM but no CUDA, and a GPU
   cell never trains on the CPU instead. `retrace cells` says so.
2. after the reference is repaired and the a100 value dropped, a plain rerun resubmits only the failed
   cell's jobs (its reference fetch, train and compare) and completes the study (aggregate, report).
Then a dry run after adding a value to an axis schedules only the new cells.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from retrace.grid import load_study

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from interrupted_study import SYNTH, publish, retrace  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def publish_reference(tmp: Path, hub: Path) -> dict[str, Path]:
    """A really trained tiny run (steps 0-4), published as two repos; tiny-broken's step 0 is corrupt."""
    publish(tmp, hub, steps=4, repos=("retrace-test/tiny", "retrace-test/tiny-broken"))
    from retrace.checkpoints.hubcache import publish_to_hub_cache

    # re-point branch step0 of tiny-broken at a snapshot whose weights are not a safetensors file
    publish_to_hub_cache(hub, "retrace-test/tiny-broken", "step0",
                         {"config.json": tmp / "init" / "config.json", "model.safetensors": b"not a safetensors file"})
    return {"run": tmp / "run", "config": tmp / "init" / "config.json"}


def study_config(hub: Path) -> dict:
    model = {"hub_cache": str(hub), "recipe": "70m", "global_batch": 8, "seq_length": 32, "train_iters": 100}
    return {
        "study": "slurm-test",
        "design": "one_at_a_time",
        "synthetic": SYNTH,
        "data": {"deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"}},
        "models": {"tiny": {"reference": "retrace-test/tiny", **model},
                   "tiny-broken": {"reference": "retrace-test/tiny-broken", **model}},
        "axes": {"model": ["tiny", "tiny-broken"], "data": ["deduped-raw"],
                 "parallel": [{"gpus": 2, "pdbs": 4, "gas": 1}], "gpu_type": ["cpu", "a100"], "steps": [4]},
    }


def run_snakemake(cluster, workdir: Path, study: Path, *extra: str, timeout: float = 240):
    cmd = ["timeout", "-k", "10", str(int(timeout)), sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
           "-d", str(workdir), "--configfile", str(study), "--profile", str(ROOT / "profiles" / "slurm"),
           "--workflow-profile", str(ROOT / "tests" / "slurm" / "profile"), *extra]
    env = {**cluster.env(), "PYTHONPATH": str(ROOT / "workflow")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)
    return out, out.stdout + out.stderr


def jobs_of(log: str) -> dict[str, dict[str, str | None]]:
    """rule → {wildcards: SLURM job id, or None for a job run locally} of every job a run started."""
    blocks, current = {}, None
    for line in log.splitlines():
        if m := re.match(r"^(local)?rule (\w+):$", line):
            current = {"rule": m.group(2), "wildcards": ""}
        elif not line.startswith(" "):  # the end of a job block ("Error in rule ...", a date, ...)
            current = None
        elif current is not None and (m := re.match(r"^\s+jobid: (\d+)$", line)):
            blocks[m.group(1)] = current
        elif current is not None and (m := re.match(r"^\s+wildcards: (.*)$", line)):
            current["wildcards"] = m.group(1)
    slurm = dict(re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", log, re.M))
    out: dict[str, dict[str, str | None]] = {}
    for job, info in blocks.items():
        out.setdefault(info["rule"], {})[info["wildcards"]] = slurm.get(job)
    return out


def submitted(log: str) -> dict[str, list[str]]:
    """rule → sorted wildcards of the jobs submitted to SLURM (local rules left out)."""
    jobs = {rule: sorted(w for w, j in ws.items() if j) for rule, ws in jobs_of(log).items()}
    return {rule: ws for rule, ws in jobs.items() if ws}


def cell_states(workdir: Path, study: Path) -> dict[str, str]:
    from retrace.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["cells", "--configfile", str(study), "-d", str(workdir)]) == 0
    return {ln.split()[1]: ln.split()[0] for ln in buf.getvalue().splitlines() if not ln.startswith("#")}


def test_study_on_slurm_with_a_failing_cell_and_a_rerun(slurm_cluster, tmp_path):
    hub = tmp_path / "hub"
    made = publish_reference(tmp_path, hub)
    cfg = study_config(hub)
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cells = {c.id: c for c in load_study(cfg, root=ROOT).cells()}
    assert len(cells) == 3
    broken = next(i for i, c in cells.items() if c.model.name == "tiny-broken")
    gpu_cell = next(i for i, c in cells.items() if c.gpu_type == "a100")
    good = [i for i in cells if i not in (broken, gpu_cell)]
    wd = tmp_path / "wd"

    # 1. keep-going: the good cells finish, the broken one fails
    out, log = run_snakemake(slurm_cluster, wd, study_path)
    assert out.returncode != 0, log[-3000:]
    for cid in good:
        assert (wd / f"results/runs/{cid}/checkpoints/manifest.json").is_file(), log[-3000:]
        assert (wd / f"results/runs/{cid}/similarity.parquet").is_file(), log[-3000:]
    for cid in (broken, gpu_cell):
        assert not (wd / f"results/runs/{cid}/checkpoints/manifest.json").exists()
    states = cell_states(wd, study_path)
    assert states == {good[0]: "done", broken: "failed", gpu_cell: "failed"}, states
    jobs = jobs_of(log)
    assert sorted(submitted(log)) == ["compare", "order_maps", "train"]
    # the corrupt cell's start checkpoint never stages, so its training is never submitted
    assert sorted(jobs["train"]) == sorted(f"cell={c}" for c in cells if c != broken)
    assert "cell=" + broken not in jobs["train"]
    assert all(j is None for j in jobs["fetch_reference"].values())  # fetches run locally

    # the GPU-typed cell really asked SLURM for two a100 GPUs (fake GRES) and got them, then refused the CPU
    job_id = jobs["train"][f"cell={gpu_cell}"]
    info = slurm_cluster.run("scontrol", "-d", "show", "job", job_id).stdout
    assert "TresPerJob=gres:gpu:a100:2" in info, info  # asked: sbatch --gpus=a100:2
    assert "JOB_GRES=gpu:a100:2" in info, info  # allocated: both fake GPUs
    train_log = (wd / f"results/logs/train/{gpu_cell}.log").read_text()
    assert "--device cuda but no GPU is usable" in train_log and "never falls back to the CPU" in train_log
    run_json = (wd / f"results/runs/{good[0]}/run.json").read_text()
    assert f'"slurm_job_id": "{jobs["train"][f"cell={good[0]}"]}"' in run_json  # trained inside its allocation

    # 2. repair the reference, drop the a100 cell; a plain rerun resubmits only the failed cell's jobs
    cfg["axes"]["gpu_type"] = ["cpu"]
    study_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cells = {c.id: c for c in load_study(cfg, root=ROOT).cells()}
    assert set(cells) == {good[0], broken}
    from retrace.checkpoints.hubcache import repo_folder

    shutil.rmtree(repo_folder(hub, "retrace-test/tiny-broken"))
    retrace("reference", "publish", "--run", str(made["run"]), "--config", str(made["config"]), "--hub-cache",
            str(hub), "--repo", "retrace-test/tiny-broken", cwd=tmp_path)
    out, log = run_snakemake(slurm_cluster, wd, study_path)
    assert out.returncode == 0, log[-3000:]
    assert submitted(log) == {"train": [f"cell={broken}"], "compare": [f"cell={broken}"]}, log[-3000:]
    ran = {rule: sorted(ws) for rule, ws in jobs_of(log).items()}
    assert ran["fetch_reference"] == ["repo=retrace-test/tiny-broken, step=0"]
    # cells_table: the a100 cell left the study; provenance_tables: the new cell's train log
    assert set(ran) == {"fetch_reference", "reference_steps", "train", "compare", "cells_table", "aggregate",
                        "provenance_tables", "report", "all"}
    assert (wd / "results/report/index.html").is_file() and (wd / "results/tables/similarity.parquet").is_file()
    assert set(cell_states(wd, study_path).values()) == {"done"}

    # 3. a new axis value: the dry run schedules only the new cells
    cfg["axes"]["seed"] = [1234, 7]
    study_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    new = {c.id for c in load_study(cfg, root=ROOT).cells()} - set(cells)
    assert len(new) == 1
    out, log = run_snakemake(slurm_cluster, wd, study_path, "-n")
    assert out.returncode == 0, log[-3000:]
    planned = set(re.findall(r"^\s+wildcards: cell=(\S+)", log, re.M))
    assert planned == new, planned
