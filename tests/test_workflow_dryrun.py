"""The Snakemake workflow without running it: dry runs of the real Snakefile, its error messages, the
resources the SLURM profile asks for, incremental grids, and `retrace cells` reading states from disk."""

from __future__ import annotations

import io
import os
import re
import time
from base64 import urlsafe_b64encode
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from retrace import paths as layout
from retrace.grid import load_study
from snakemake_runner import ROOT, job_counts, snakemake
from study_factory import synthetic_study


def scheduled(output: str, rule: str) -> list[dict[str, str]]:
    """Each scheduled job of ``rule`` in a dry run: its wildcards and resources."""
    jobs, current = [], None
    for line in output.splitlines():
        if re.match(rf"^(local)?rule {rule}:$", line):
            current = {}
            jobs.append(current)
        elif re.match(r"^(local)?rule \w+:$", line):
            current = None
        elif current is not None and line.startswith(("    wildcards: ", "    resources: ")):
            key, _, value = line.strip().partition(": ")
            current[key] = value
    return jobs


def write_study(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def hub_study(**axes) -> dict:
    """A study on published Hub repos (nothing is fetched by a dry run)."""
    return synthetic_study("dry", **axes)


# --------------------------------------------------------------------------------------- dry runs


def test_embedded_study_dry_run(tmp_path):
    out = snakemake("-n", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    study = load_study(ROOT / "config.yaml", root=ROOT)
    n = len(study.cells())
    counts = job_counts(out.stdout)
    assert counts["train"] == n and counts["compare"] == n
    # fetched once per (repo, step): 4 references × the Pythia schedule up to 16 (0, 1, 2, 4, 8, 16)
    assert counts["fetch_reference"] == 4 * 6
    # one step 0 shared by the four built references; order maps for the two candidates and tiny-null's order
    assert counts["reference_train"] == 4 and counts["reference_init"] == 1 and counts["order_maps"] == 3
    assert counts["synth_data"] == 1 and counts["aggregate"] == 1 and counts["report"] == 1


def test_the_report_lists_the_provenance_of_every_fetched_reference(tmp_path):
    """The report job reads each compared repo's fetched references (repo, commit, verified)."""
    out = snakemake("-n", "-p", "report", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "retrace report " in x)
    study = load_study(ROOT / "config.yaml", root=ROOT)
    repos = sorted({c.model.reference_key for c in study.cells()})
    assert re.findall(r"--references ([^\s)]+)", line) == [layout.reference_dir(r) for r in repos]


def test_a_bad_config_stops_before_anything_runs_naming_the_key(tmp_path):
    cfg = hub_study()
    cfg["axes"]["parallel"][0]["gpu"] = 2
    out = snakemake("-n", "--configfile", str(write_study(tmp_path / "s.yaml", cfg)), workdir=tmp_path / "wd")
    assert out.returncode != 0
    assert "unknown key axes.parallel[0].gpu" in out.stdout + out.stderr

    cfg = hub_study(parallel=[{"gpus": 32, "pdbs": 16, "gas": 1}])
    out = snakemake("-n", "--configfile", str(write_study(tmp_path / "s.yaml", cfg)), workdir=tmp_path / "wd")
    assert out.returncode != 0
    assert "config key axes.parallel[0]: gpus·pdbs·gas = 32·16·1 = 512 breaks the global batch 1024" in (
        out.stdout + out.stderr)
    assert not (tmp_path / "wd" / "results").exists()


def test_slurm_profile_resources_come_from_the_cell(tmp_path):
    cfg = hub_study(parallel=[{"gpus": 2, "pdbs": 32, "gas": 16}, {"gpus": 16, "pdbs": 32, "gas": 2}],
                    gpu_type=["a100", "cpu"])
    cfg["axes"]["data"] = ["deduped-raw"]
    cfg["cluster"] = {"gpus_per_node": 8, "gpu_models": {"a100": "a100_80gb"}, "gpu_constraints": {"a100": "ib"},
                      "cpu_ranks_per_node": 8}
    out = snakemake("-n", "--profile", str(ROOT / "profiles" / "slurm"), "--configfile",
                    str(write_study(tmp_path / "s.yaml", cfg)), workdir=tmp_path / "wd")
    assert out.returncode == 0, out.stderr
    jobs = {j["wildcards"]: dict(kv.split("=", 1) for kv in j["resources"].split(", "))
            for j in scheduled(out.stdout, "train")}
    one = next(r for w, r in jobs.items() if "__g2p32a16__a100" in w)
    two = next(r for w, r in jobs.items() if "__g16p32a2__a100" in w)
    cpu = next(r for w, r in jobs.items() if "__g2p32a16__cpu" in w)
    # one node: sbatch --gpus=a100_80gb:2 -C ib, one srun task per GPU (so that only the ranks' own step
    # gets the early SIGUSR2, see retrace.placement), the signal asked for
    assert one["gpu"] == "2" and one["gpu_model"] == "a100_80gb" and one["constraint"] == "ib"
    assert one["nodes"] == "1" and one["mpi"] == "srun" and one["tasks_per_node"] == "2"
    assert one["runtime"] == "1440" and one["cpus_per_task"] == "1"
    assert re.fullmatch(r"--signal=USR2@\d+", one["slurm_extra"])
    # two nodes: one srun task per GPU, GPUs per node
    assert "gpu" not in two and two["nodes"] == "2" and two["tasks_per_node"] == "8" and two["mpi"] == "srun"
    assert re.fullmatch(r"--gpus-per-node=a100_80gb:8 --signal=USR2@\d+", two["slurm_extra"])
    assert two["cpus_per_task"] == "1"
    # CPU cells ask for no GPU at all; one node up to cluster.cpu_ranks_per_node ranks, srun tasks across nodes
    assert not {"gpu", "gpu_model", "constraint", "mpi", "slurm_extra"} & set(cpu) and cpu["nodes"] == "1"
    cpus = next(r for w, r in jobs.items() if "__g16p32a2__cpu" in w)
    assert not {"gpu", "gpu_model", "constraint"} & set(cpus) and cpus["cpus_per_task"] == "1"
    assert cpus["nodes"] == "2" and cpus["tasks_per_node"] == "8" and cpus["mpi"] == "srun"
    assert re.fullmatch(r"--signal=USR2@\d+", cpus["slurm_extra"])


def _complete_everything(workdir: Path, study: Path) -> None:
    """Make every output of the study exist with provenance, as if it had run (no real work)."""
    summary = snakemake("-n", "--summary", "--configfile", str(study), workdir=workdir)
    assert summary.returncode == 0, summary.stderr
    for line in summary.stdout.splitlines()[1:]:
        path = line.split("\t")[0]
        if "/" not in path:
            continue
        target = workdir / path
        if path in ("results/report/tables", "results/report/figures"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    touched = snakemake("--touch", "--forceall", "--cores", "1", "--configfile", str(study), workdir=workdir)
    assert touched.returncode == 0, touched.stderr
    nothing = snakemake("-n", "--configfile", str(study), workdir=workdir)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr


def test_adding_a_value_to_an_axis_schedules_only_the_new_cells(tmp_path):
    wd = tmp_path / "wd"
    cfg = hub_study()
    study_path = write_study(tmp_path / "s.yaml", cfg)
    _complete_everything(wd, study_path)
    old = {c.id for c in load_study(cfg, root=ROOT).cells()}

    cfg["axes"]["seed"] = [1234, 7]
    cfg["axes"]["parallel"].append({"gpus": 16, "pdbs": 32, "gas": 2})
    write_study(study_path, cfg)
    new = {c.id for c in load_study(cfg, root=ROOT).cells()} - old
    assert len(new) == 2 * 2 * 2 - 2

    out = snakemake("-n", "--configfile", str(study_path), workdir=wd)
    assert out.returncode == 0, out.stderr
    trained = {j["wildcards"].removeprefix("cell=") for j in scheduled(out.stdout, "train")}
    compared = {j["wildcards"].removeprefix("cell=") for j in scheduled(out.stdout, "compare")}
    assert trained == new and compared == new
    counts = job_counts(out.stdout)
    # no data, order, reference or gate job: they are shared and already done (the provenance table
    # reads every cell's train log, so it is rebuilt)
    assert set(counts) == {"cells_table", "train", "compare", "provenance_tables", "aggregate", "report", "all"}


# ------------------------------------------------------------------------------- cells on disk


def _mark_incomplete(wd: Path, output: str) -> None:
    marker = wd / ".snakemake" / "incomplete" / urlsafe_b64encode(output.encode()).decode()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text('{"external_jobid": null}')


def test_cells_command_reads_each_state_from_disk(tmp_path):
    wd = tmp_path
    cfg = hub_study(attention=["flash", "global"], seed=[1, 2])
    cfg_path = write_study(tmp_path / "s.yaml", cfg)
    ids = [c.id for c in load_study(cfg, root=ROOT).cells()]
    assert len(ids) == 8
    done, failed, running, interrupted, trained, partial, untouched, compare_failed = ids

    def touch(rel: str, age: float = 0) -> None:
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
        t = time.time() - age
        while p != wd:  # the file and the directories it was created in
            os.utime(p, (t, t))
            p = p.parent

    old = 3600
    touch(layout.manifest(done), old)
    touch(layout.similarity(done), old)
    (wd / layout.log("train", failed)).parent.mkdir(parents=True, exist_ok=True)
    (wd / layout.log("train", failed)).write_text(f"step 3/4\nTraceback ...\n{layout.FAILURE_MARK} (exit status 1)\n")
    touch(f"{layout.run_dir(running)}/state/step2/rng.pt")
    _mark_incomplete(wd, layout.manifest(running))
    touch(f"{layout.run_dir(interrupted)}/state/step2/rng.pt", old)
    touch(layout.log("train", interrupted), old)
    _mark_incomplete(wd, layout.manifest(interrupted))
    touch(layout.manifest(trained), old)
    touch(f"{layout.run_dir(partial)}/checkpoints/step1.safetensors", old)
    touch(layout.manifest(compare_failed), old)
    (wd / layout.log("compare", compare_failed)).parent.mkdir(parents=True)
    (wd / layout.log("compare", compare_failed)).write_text(f"{layout.FAILURE_MARK} (exit status 2)\n")

    from retrace.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["cells", "--configfile", str(cfg_path), "-d", str(wd)]) == 0
    states = {line.split()[1]: line.split()[0] for line in buf.getvalue().splitlines() if not line.startswith("#")}
    assert states == {done: "done", failed: "failed", running: "running", interrupted: "failed",
                      trained: "pending", partial: "pending", untouched: "pending", compare_failed: "failed"}
    assert "# study dry: 8 cells: 1 done, 3 failed, 1 running, 3 pending" in buf.getvalue()

    # a Snakemake lock makes an incomplete cell running, however old its files
    (wd / ".snakemake" / "locks").mkdir(parents=True)
    (wd / ".snakemake" / "locks" / "0.output.lock").write_text("x")
    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["cells", "--configfile", str(cfg_path), "-d", str(wd), "--state", "running"])
    assert [line.split()[1] for line in buf.getvalue().splitlines()[:-1]] == [running, interrupted]


def test_a_failed_start_checkpoint_fetch_fails_the_cells_that_wait_for_it(tmp_path):
    """A cell whose start checkpoint could not be staged never starts its own jobs: `retrace cells` says
    failed (naming the fetch's log), not pending; a cell already done stays done."""
    from retrace.launch import start_fetch_logs

    cfg = hub_study(seed=[1, 2])
    cfg_path = write_study(tmp_path / "s.yaml", cfg)
    cells = load_study(cfg, root=ROOT).cells()
    done, waiting = cells[0].id, cells[1].id
    for out in (layout.manifest(done), layout.similarity(done)):
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out).touch()
    [fetch_log] = start_fetch_logs(cells[1])
    assert fetch_log == "results/logs/fetch_reference/EleutherAI/pythia-70m-deduped/step0.log"
    (tmp_path / fetch_log).parent.mkdir(parents=True)
    (tmp_path / fetch_log).write_text(f"sha256 mismatch\n{layout.FAILURE_MARK} (exit status 1)\n")

    from retrace.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["cells", "--configfile", str(cfg_path), "-d", str(tmp_path)]) == 0
    rows = {ln.split()[1]: ln for ln in buf.getvalue().splitlines() if not ln.startswith("#")}
    assert rows[done].split()[0] == "done"
    assert rows[waiting].split()[0] == "failed" and fetch_log in rows[waiting]


def test_cells_command_bad_config_is_one_message(tmp_path, capsys):
    from retrace.cli import main

    cfg = hub_study()
    cfg["axes"]["sead"] = [1]
    assert main(["cells", "--configfile", str(write_study(tmp_path / "s.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key axes.sead" in err[0]


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profiles_are_valid_yaml_with_every_entry_commented(profile):
    path = ROOT / "profiles" / profile / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert isinstance(cfg, dict) and cfg
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z][-a-z]*:", line):  # a top-level option: a comment right above it
            assert lines[i - 1].lstrip().startswith("#"), f"{path}: {line!r} has no comment"
