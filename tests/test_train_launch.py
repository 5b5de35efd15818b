"""A cell's train job on a cluster: its start weights staged once where Snakemake runs (never fetched by
the ranks), its srun line and early stop signal, and the device it must run on."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from retrace import launch
from retrace.grid import load_study
from retrace.placement import SAVE_BYTES_PER_S, place, save_timeout_s, stop_lead_s
from retrace.pythia.sizes import PYTHIA_SIZES
from snakemake_runner import ROOT, snakemake, spec_of
from study_factory import synthetic_study
from test_workflow_dryrun import scheduled, write_study

CELLS = [{"gpus": 2, "pdbs": 32, "gas": 16}, {"gpus": 16, "pdbs": 32, "gas": 2}, {"gpus": 1, "pdbs": 32, "gas": 32}]


def _study(**axes):
    cfg = synthetic_study("dry", parallel=CELLS, gpu_type=["a100", "cpu"], **axes)
    cfg["axes"]["data"] = ["deduped-raw"]
    cfg["models"]["pythia-70m-deduped"]["start_step"] = 1000
    cfg["axes"]["steps"] = [1004]
    cfg["cluster"] = {"gpus_per_node": 8, "gpu_models": {"a100": "a100_80gb"}}
    return cfg


def _jobs(out: str) -> dict[str, dict]:
    """cell → {input, resources, shell} of each train job of a `-n -p` dry run."""
    jobs, current, cell = {}, None, None
    for line in out.splitlines():
        if re.match(r"^(local)?rule \w+:$", line):
            current = {} if line.strip() == "rule train:" else None
            cell = None
        elif current is not None and line.startswith("    input: "):
            current["input"] = line.split(": ", 1)[1].split(", ")
        elif current is not None and line.startswith("    wildcards: cell="):
            cell = line.split("=", 1)[1]
            jobs[cell] = current
        elif current is not None and line.startswith("    resources: "):
            current["resources"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
        elif current is not None and line.startswith("Shell command: "):
            current["shell"] = line[len("Shell command: "):]
    return jobs


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    study = write_study(tmp / "s.yaml", _study())
    out = snakemake("-n", "-p", "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(study),
                    workdir=tmp / "wd")
    assert out.returncode == 0, out.stderr
    return out.stdout, _jobs(out.stdout)


def test_the_start_checkpoint_is_staged_once_and_read_locally(dry):
    out, jobs = dry
    staged = "resources/references/EleutherAI/pythia-70m-deduped/step1000.safetensors"
    fetches = [j["wildcards"] for j in scheduled(out, "fetch_reference")]
    assert fetches.count("repo=EleutherAI/pythia-70m-deduped, step=1000") == 1  # one fetch for all cells
    assert len(jobs) == 6
    for cell, job in jobs.items():
        assert staged in job["input"], cell
        spec = spec_of(job["shell"])
        assert spec["reference"] == "./" + staged  # ./: never mistaken for a Hub spec
        assert spec["published"] == "EleutherAI/pythia-70m-deduped" and spec["start_step"] == 1000
        gpu = "__a100__" in cell
        assert spec["device"] == ("cuda" if gpu else "cpu")
        assert spec["gpu_names"] == (["a100", "a100_80gb"] if gpu else None)


def test_the_srun_line_and_the_early_signal(dry):
    _, jobs = dry

    def job(token):
        return next(j for c, j in jobs.items() if token in c)

    lead = stop_lead_s(n_params=PYTHIA_SIZES["70m"].n_params, dp=2, zero1=True)
    one = job("__g2p32a16__a100")  # one node, two ranks: srun tasks inside the SLURM job only
    assert one["shell"].startswith("(${SLURM_JOB_ID:+srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 "
                                   "--kill-on-bad-exit=1} env ")
    assert one["resources"]["mpi"] == "srun" and one["resources"]["slurm_extra"] == f"--signal=USR2@{lead}"
    lead16 = stop_lead_s(n_params=PYTHIA_SIZES["70m"].n_params, dp=16, zero1=True)
    two = job("__g16p32a2__a100")
    assert two["shell"].startswith("(srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=1 --kill-on-bad-exit=1 env ")
    assert two["resources"]["slurm_extra"] == f"--gpus-per-node=a100_80gb:8 --signal=USR2@{lead16}"
    single = job("__g1p32a32__a100")  # the SLURM plugin refuses an mpi job of one task: no signal, the deadline
    assert single["shell"].startswith("( env ") and "slurm_extra" not in single["resources"]
    cpu = job("__g2p32a16__cpu")
    assert cpu["shell"].startswith("( env ") and "mpi" not in cpu["resources"]


def test_the_srun_line_runs_the_ranks_itself_outside_slurm():
    """The one-node launcher expands to nothing without SLURM_JOB_ID (the local executor), to srun inside."""
    p = place(gpus=2, gpu_type="a100", cluster={"gpus_per_node": 8, "threads_per_rank": 2, "gpu_models": {},
                                                "gpu_constraints": {}}, rank_tasks=True, stop_signal_s=120)
    script = f"echo {p.launcher} retrace"
    outside = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    inside = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7"})
    assert outside.stdout.split() == ["retrace"]
    assert inside.stdout.split() == ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=2",
                                     "--kill-on-bad-exit=1", "retrace"]


def test_engine_neox_cells_keep_their_hub_spec():
    cfg = _study(engine=["neox"])
    cfg["axes"]["gpu_type"] = ["a100"]
    cfg["models"]["pythia-70m-deduped"]["start_step"] = 0
    cfg["axes"]["steps"] = [4]
    cfg["neox"] = {"path": "/opt/gpt-neox"}
    study = load_study(cfg, root=ROOT)
    cell = next(c for c in study.cells() if c.parallel.gpus == 2)
    assert launch.start_weights(cell) == []
    spec = launch.train_spec(study, cell)
    assert spec.reference == "EleutherAI/pythia-70m-deduped"
    from retrace.placement import train_placement

    p = train_placement(cell=cell, cluster=study.cluster)  # GPT-NeoX starts its own ranks, gets no signal
    assert p.mpi is None and p.slurm_extra is None


def test_save_waits_are_sized_from_the_model():
    """Timeout = NCCL's 10 min + the busiest rank's bytes (fp16 checkpoint 2 B/param, its share of the
    12 B/param state) at 25 MB/s; the stop lead = 5 min + the same, whole minutes."""
    n = PYTHIA_SIZES["2.8b"].n_params
    assert SAVE_BYTES_PER_S == 25_000_000
    z8 = 600 + -(-(2 * n + -(-12 * n // 8)) // 25_000_000)
    assert save_timeout_s(n_params=n, dp=8, zero1=True) == z8
    assert 15 * 60 < z8 < 18 * 60
    rep = save_timeout_s(n_params=n, dp=8, zero1=False)
    assert rep == 600 + -(-14 * n // 25_000_000) and 35 * 60 < rep < 38 * 60
    lead = stop_lead_s(n_params=n, dp=8, zero1=True)
    assert lead % 60 == 0 and lead - 60 < 300 + (z8 - 600) <= lead


def test_a_cell_trains_from_its_staged_file_without_the_hub(world, tmp_path, monkeypatch):
    """fetch-reference writes the start step once; training reads only that file, offline, with an empty
    hub cache, and records the published repo and the file's provenance."""
    from retrace.train import TrainConfig, train
    from test_train_helpers import SEQ, B

    staged = tmp_path / "resources" / "references" / "org" / "tiny" / "step0.safetensors"
    r = subprocess.run([sys.executable, "-m", "retrace", "fetch-reference", "--source", str(world / "ref"),
                        "--out", str(staged)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = tmp_path / "run"
    res = train(TrainConfig(reference=str(staged), published="org/tiny", data=str(world / "data" / "tiny"),
                            out=str(out), steps=2, recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100,
                            lr=2e-3, pdbs=8, gas=1, precision="fp16", threads=1, progress=False, device="cpu"))
    assert res.final_step == 2
    assert not (tmp_path / "empty-hub-cache").exists()
    manifest = json.loads(res.manifest.read_text())
    assert manifest["reference"] == "org/tiny" and manifest["start_weights"] == str(staged)
    run = json.loads((out / "run.json").read_text())
    assert run["published"] == "org/tiny" and run["source"] == str(staged)
    assert run["start_weights"]["source"] == str(world / "ref" / "model.safetensors")
    assert run["start_weights"]["path"] == str(staged)
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "step2.safetensors"), framework="pt") as fh:
        assert fh.metadata()["reference"] == "org/tiny"


def test_snakemake_dies_on_the_step_signal_so_ranks_get_their_own_step(tmp_path):
    """Why a GPU cell's ranks run as srun tasks (retrace.placement): SLURM's --signal reaches every process
    of a step, and a job without the mpi resource runs as ``srun -n1 snakemake …``, so that Snakemake would
    get SIGUSR2 too — and Snakemake has no handler for it: it dies at once (and SLURM then ends the step,
    ranks included). Here the same delivery, to a local Snakemake and its job."""
    import os
    import signal
    import time

    (tmp_path / "Snakefile").write_text('rule all:\n    output: "done"\n    shell: "touch started; sleep 60; touch {output}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(tmp_path / "Snakefile"),
                             "-d", str(tmp_path)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGUSR2)
    assert proc.wait(timeout=60) == -signal.SIGUSR2
    assert not (tmp_path / "done").exists()
