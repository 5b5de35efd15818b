"""The real studies (studies/*.yaml) and the audit target, through real Snakemake dry runs.

Each study's job table (per-rule job counts from the dry run's summary) is pinned to numbers derived
from its design, and the resources of its train jobs to its layouts and GPU types, as the SLURM profile
would submit them. The audit target is scheduled on request (`snakemake -n audit`), is part of `all`
only where the study says so, reads local references offline, and runs for real on a tiny hub cache.
The grid features the studies need (models.<name>.data, engine neox) are checked here too.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import yaml

from retrace.errors import RetraceError
from retrace.grid import checkpoint_steps, load_study
from retrace.launch import train_command, train_spec
from retrace.spec import NeoXRunConfig
from snakemake_runner import ROOT, job_counts, snakemake, spec_of

STUDIES = ROOT / "studies"
SLURM = ["--profile", str(ROOT / "profiles" / "slurm")]


def jobs_of(output: str, rule: str) -> list[dict[str, str]]:
    """Each scheduled job of ``rule``: its wildcards, its resources (parsed) and its shell command."""
    jobs, current = [], None
    for line in output.splitlines():
        if re.match(rf"^(local)?rule {rule}:$", line):
            current = {}
            jobs.append(current)
        elif re.match(r"^(local)?rule \w+:$", line) or line.startswith("Job stats"):
            current = None
        elif current is not None and line.startswith(("    wildcards: ", "    resources: ", "    input: ")):
            key, _, value = line.strip().partition(": ")
            current[key] = value
        elif current is not None and line.startswith("Shell command: "):
            current["shell"] = line.removeprefix("Shell command: ")
    for job in jobs:
        job["cell"] = job.get("wildcards", "").removeprefix("cell=")
        job["res"] = dict(kv.split("=", 1) for kv in job.get("resources", "").split(", ") if "=" in kv)
    return jobs


@cache
def dry_run(study: str, *targets: str) -> str:
    """`snakemake -n -p [targets] --profile profiles/slurm --configfile studies/<study>.yaml` (cached)."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix=f"retrace-dry-{study}-"))
    out = snakemake(*targets, "-n", "-p", *SLURM, "--configfile", str(STUDIES / f"{study}.yaml"), workdir=workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()
    return out.stdout


# Checkpoints compared per published run: 0, 1, 2, 4 … 512, 1000 (the Pythia schedule to step 1000).
STEPS_TO_1000 = len(checkpoint_steps(0, 1000))
# One factor at a time, crossed with model × data: a baseline plus one cell per other value of each axis:
# parallel 4 values (+3), gpu_type 2 (+1), attention 2 (+1), deps 2 (+1) = 7 cells per (model, data).
BLOG_CELLS = 1 + 3 + 1 + 1 + 1

SEGMENT_STARTS = (1000, 10000, 50000, 100000, 142000)

EXPECTED = {
    "pythia-2.8b-deduped": {
        "pile_data": 2,                     # deduped and standard preshuffled streams (no order maps)
        "fetch_reference": STEPS_TO_1000,   # one repo, fetched once per step for all cells
        "reference_steps": 1,
        "train": 1 * 2 * BLOG_CELLS,        # 1 model × 2 variants × 7
        "compare": 1 * 2 * BLOG_CELLS,
        "cells_table": 1, "aggregate": 1, "report": 1,
        "reference_findings": 1, "start_gate": 1, "provenance_tables": 1,  # the gate: once per repo, model
        "audit": 1,                          # audit.in_all: true
        "cross_generation": 1,               # cross_generation: vs pythia-2.8b-deduped-v0 (report input)
        "all": 1,
    },
    "pythia-70m-control": {
        "pile_data": 2, "fetch_reference": STEPS_TO_1000, "reference_steps": 1,
        "train": 2 * BLOG_CELLS, "compare": 2 * BLOG_CELLS,
        "reference_findings": 1, "start_gate": 1, "provenance_tables": 1,
        "cells_table": 1, "aggregate": 1, "report": 1, "all": 1,
    },
    "polypythias-seeds": {
        "pile_data": 10 + 1,                # one variant per order seed (1234, 1 … 9), same copy; the gate's stream
        "order_maps": 10,                   # raw data: GPT-NeoX index maps per order seed
        "order_check": 1,                   # the gate: seed 1234's rebuilt order = the published stream
        "fetch_reference": 10 * STEPS_TO_1000,  # 10 repos (pythia-70m, -seed1 … -seed9)
        "reference_steps": 10,
        "train": 10 * 2, "compare": 10 * 2,  # each run on its own order and one other (models.<name>.data)
        "reference_findings": 10, "start_gate": 10, "provenance_tables": 1,
        "cells_table": 1, "aggregate": 1, "report": 1, "all": 1,
    },
    "polypythias-segments": {
        "pile_data": 4 + 1, "order_maps": 4,  # seed 8, 1234, 7 over the standard Pile; seed 8 over deduped
        "order_check": 1,                     # (+ the published standard stream, for the gate)
        "fetch_training_state": len(SEGMENT_STARTS),  # each segment's start: weights + ZeRO-1 state, once
        "fetch_reference": 2 * len(SEGMENT_STARTS),   # each segment compares at its start and start + 1000
        "reference_steps": len(SEGMENT_STARTS),
        # 5 segments × 4 orders, plus the same 5 with GPT-NeoX's restarted Adam counter on the documented one
        "train": len(SEGMENT_STARTS) * (4 + 1), "compare": len(SEGMENT_STARTS) * (4 + 1),
        # one repo audited once; each segment model's start step gated (the two Adam counters: 2 per start)
        "reference_findings": 1, "start_gate": 2 * len(SEGMENT_STARTS), "provenance_tables": 1,
        "cells_table": 1, "aggregate": 1, "report": 1, "all": 1,
    },
    "pythia-14m-seed0": {
        "forensics": 1,                      # its step 0 against pythia-14m, -deduped, -seed1 … seed9
        "fetch_training_state": len(SEGMENT_STARTS),  # FP16_Optimizer's state (stage 0) at each start
        "pile_data": 2,                      # the seed-1234 streams of the standard and deduped Pile
        # from step 0: 0 … 512, 1000; segments: also 2000, 10000, 11000, 50000, 51000, 100000, …, 143000
        "fetch_reference": STEPS_TO_1000 + 2 * len(SEGMENT_STARTS) - 1,
        "reference_steps": 1 + len(SEGMENT_STARTS),
        "train": (1 + len(SEGMENT_STARTS)) * 2, "compare": (1 + len(SEGMENT_STARTS)) * 2,
        "reference_findings": 1, "start_gate": 1 + len(SEGMENT_STARTS), "provenance_tables": 1,
        "cells_table": 1, "aggregate": 1, "report": 1, "all": 1,
    },
}


def test_every_study_is_tested():
    assert {p.stem for p in STUDIES.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("study", sorted(EXPECTED))
def test_study_dry_run_job_table(study):
    out = dry_run(study)
    assert job_counts(out) == EXPECTED[study]
    cells = load_study(STUDIES / f"{study}.yaml", root=ROOT).cell_ids()
    assert sorted(j["cell"] for j in jobs_of(out, "train")) == sorted(cells)
    assert sorted(j["cell"] for j in jobs_of(out, "compare")) == sorted(cells)


def test_blog_study_resources_and_commands():
    out = dry_run("pythia-2.8b-deduped")
    train = {j["cell"]: j for j in jobs_of(out, "train")}
    by_axes = {tuple(c.split("__")[1:6]): j for c, j in train.items()}
    # 16×A40, pdbs 8, gas 8 (the baseline): two nodes, one srun task per GPU, GPUs asked per node
    two = by_axes[("deduped-preshuffled", "g16p8a8", "a40", "flash", "torch2.4")]
    assert two["res"]["nodes"] == "2" and two["res"]["tasks_per_node"] == "8" and two["res"]["mpi"] == "srun"
    from retrace.placement import stop_lead_s
    from retrace.pythia.sizes import PYTHIA_SIZES

    n = PYTHIA_SIZES["2.8b"].n_params
    lead16, lead8 = (stop_lead_s(n_params=n, dp=dp, zero1=True) for dp in (16, 8))
    assert two["res"]["slurm_extra"] == f"--gpus-per-node=a40:8 --signal=USR2@{lead16}"
    assert two["res"]["cpus_per_task"] == "4"
    assert "gpu" not in two["res"] and two["res"]["runtime"] == "1440"
    assert two["shell"].startswith("(srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=4 --kill-on-bad-exit=1 ")
    spec = spec_of(two["shell"])
    want = {"reference": "./resources/references/EleutherAI/pythia-2.8b-deduped/step0.safetensors",
            "published": "EleutherAI/pythia-2.8b-deduped", "device": "cuda", "gpu_names": ["a40"], "start_step": 0, "gpus": 16, "pdbs": 8, "gas": 8,
            "engine": "builtin", "checkpoint_activations": True, "precision": "fp16", "steps": 1000,
            "data": "resources/data/pile/deduped-preshuffled/document", "data_kind": "preshuffled"}
    assert {k: spec[k] for k in want} == want
    # 8×A40, pdbs 4, gas 32: one node, --gpus=a40:8, 8 srun tasks inside the SLURM job, the early signal
    one = by_axes[("standard-preshuffled", "g8p4a32", "a40", "flash", "torch2.4")]
    assert one["res"]["gpu"] == "8" and one["res"]["gpu_model"] == "a40" and one["res"]["nodes"] == "1"
    assert one["res"]["mpi"] == "srun" and one["res"]["tasks_per_node"] == "8"
    assert one["res"]["slurm_extra"] == f"--signal=USR2@{lead8}"
    assert one["shell"].startswith("(${SLURM_JOB_ID:+srun --nodes=1 --ntasks-per-node=8 --cpus-per-task=4 ")
    # the GPU-type cell keeps the baseline layout on A100s; the others keep the baseline GPU
    assert by_axes[("deduped-preshuffled", "g16p8a8", "a100", "flash", "torch2.4")]["res"]["slurm_extra"] == \
        f"--gpus-per-node=a100:8 --signal=USR2@{lead16}"
    assert {k[2] for k in by_axes if k[1] != "g16p8a8"} == {"a40"}
    assert {k[1] for k in by_axes} == {"g16p8a8", "g8p8a16", "g8p4a32", "g8p16a8"}
    assert {k[3] for k in by_axes} == {"flash", "global"} and {k[4] for k in by_axes} == {"torch2.4", "torch2.6"}


def test_polypythias_pairs_each_run_with_its_order():
    study = load_study(STUDIES / "polypythias-seeds.yaml", root=ROOT)
    pairs = {(c.model.reference, c.data.order_seed) for c in study.cells()}
    expected = {("EleutherAI/pythia-70m", 1234), ("EleutherAI/pythia-70m", 1)}
    for n in range(1, 10):
        expected |= {(f"EleutherAI/pythia-70m-seed{n}", n), (f"EleutherAI/pythia-70m-seed{n}", 1234)}
    assert pairs == expected
    for m in study.used_models():  # documented = the order seed of the run's own name (the assumption)
        own = int(m.reference.rsplit("seed", 1)[1]) if "-seed" in m.reference else 1234
        assert study.data[m.documented].order_seed == own
    out = dry_run("polypythias-seeds")
    orders = {j["wildcards"] for j in jobs_of(out, "order_maps")}
    assert {re.search(r"order_seed=(\d+)", w).group(1) for w in orders} == {"1234", *map(str, range(1, 10))}
    train = jobs_of(out, "train")[0]
    assert spec_of(train["shell"])["data_kind"] == "raw" and train["res"]["gpu_model"] == "a100"


def test_polypythias_segments_start_from_the_published_optimizer_state():
    study = load_study(STUDIES / "polypythias-segments.yaml", root=ROOT)
    cells = study.cells()
    assert {(c.model.start_step, c.steps) for c in cells} == {(n, n + 1000) for n in SEGMENT_STARTS}
    assert {c.model.name for c in cells} == {f"pythia-410m-seed8{a}-from{n}" for n in SEGMENT_STARTS
                                             for a in ("", "-neoxadam")}
    out = dry_run("polypythias-segments")
    staged = {j["wildcards"] for j in jobs_of(out, "fetch_training_state")}
    assert staged == {f"repo=EleutherAI/neox-ckpt-pythia-410m-seed8, step={n}" for n in SEGMENT_STARTS}
    specs = {j["cell"]: spec_of(j["shell"]) for j in jobs_of(out, "train")}
    for cell_id, spec in specs.items():
        cell = study.cell(cell_id)
        n = cell.model.start_step
        assert spec["reference"] == f"./resources/training_states/EleutherAI/neox-ckpt-pythia-410m-seed8/step{n}"
        assert (spec["start_step"], spec["steps"], spec["data_kind"]) == (n, n + 1000, "raw")
        assert spec["adam_resume"] == ("neox" if "neoxadam" in cell_id else "continue")
        assert spec["order_seed"] == cell.data.order_seed
    # one verdict per segment: the documented order is passed for every segment model
    (report,) = jobs_of(out, "report")
    for n in SEGMENT_STARTS:
        assert f"--documented pythia-410m-seed8-from{n}=standard-raw-seed8" in report["shell"]


def test_pythia_14m_seed0_asks_the_init_and_the_data_half():
    study = load_study(STUDIES / "pythia-14m-seed0.yaml", root=ROOT)
    assert {c.data.name for c in study.cells()} == {"standard-preshuffled", "deduped-preshuffled"}
    assert {(c.model.start_step, c.steps) for c in study.cells()} == {(0, 1000)} | {
        (n, n + 1000) for n in SEGMENT_STARTS}
    out = dry_run("pythia-14m-seed0")
    (forensics,) = jobs_of(out, "forensics")
    from retrace.forensics_target import forensics_entries

    (entry,) = forensics_entries(study)
    assert entry["model"] == "EleutherAI/neox-ckpt-pythia-14m-seed0" and entry["step"] == 0
    assert {"EleutherAI/pythia-14m", "EleutherAI/pythia-14m-deduped"} <= set(entry["against"])
    # the step-0 cells start from the weights (Adam's state is zero there); the segments from the staged
    # training checkpoint (14m: FP16_Optimizer's state in mp_rank_00_model_states.pt)
    for job in jobs_of(out, "train"):
        spec = spec_of(job["shell"])
        n = spec["start_step"]
        repo = "EleutherAI/neox-ckpt-pythia-14m-seed0"
        assert spec["reference"] == (f"./resources/training_states/{repo}/step{n}" if n else
                                     f"./resources/references/{repo}/step0.safetensors")
        assert spec["data_kind"] == "preshuffled" and spec["order_seed"] == 1234


@pytest.mark.parametrize("study", ["polypythias-seeds", "polypythias-segments"])
def test_training_on_the_rebuilt_standard_pile_waits_for_the_order_check(study):
    out = dry_run(study)
    (check,) = jobs_of(out, "order_check")
    assert check["shell"].startswith("(retrace order-check --raw resources/data/pile/standard-raw-seed1234/")
    assert "--preshuffled resources/data/pile/standard-preshuffled/document --seed 1234 --num-samples 147164160" \
        in check["shell"] and "--items 10240" in check["shell"]
    gate = "resources/order_check/standard-raw-seed1234.json"
    for job in jobs_of(out, "train"):
        gated = gate in job["input"]
        assert gated == ("standard-raw" in job["cell"]), job["cell"]  # the deduped idxmap is published
    # the gate's stream is fetched only as far as the items it compares (one shard)
    from retrace.jobs import pile_needs

    needs = pile_needs(load_study(STUDIES / f"{study}.yaml", root=ROOT), "standard-preshuffled")
    assert (needs["first_item"], needs["max_items"]) == (0, 10240)


# ------------------------------------------------------------------------------------------- audit


def test_audit_is_part_of_all_only_where_the_study_enables_it():
    assert "audit" in job_counts(dry_run("pythia-2.8b-deduped"))
    assert "audit" not in job_counts(dry_run("pythia-70m-control"))
    (audit,) = jobs_of(dry_run("pythia-2.8b-deduped"), "audit")
    assert ("retrace audit EleutherAI/pythia-2.8b-deduped EleutherAI/pythia-2.8b "
            "EleutherAI/neox-ckpt-pythia-2.8b-deduped-v1  --parquet results/audit/audit.parquet "
            "--summary results/audit/summary.txt") in audit["shell"]
    assert "--offline" not in audit["shell"]


@pytest.mark.parametrize("study", ["pythia-70m-control", "polypythias-seeds"])
def test_snakemake_audit_schedules_only_the_audit(study):
    out = dry_run(study, "audit")
    assert job_counts(out) == {"audit": 1}
    (audit,) = jobs_of(out, "audit")
    repos = sorted({m.reference for m in load_study(STUDIES / f"{study}.yaml", root=ROOT).used_models()})
    assert all(r in audit["shell"] for r in repos) and "--offline" not in audit["shell"]


def test_embedded_study_audit_reads_its_hub_cache_offline(tmp_path):
    out = snakemake("-n", "-p", "audit", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout)
    assert counts["audit"] == 1 and counts["reference_publish"] == 4  # audited once published
    (audit,) = jobs_of(out.stdout, "audit")
    assert ("retrace audit retrace-tiny/pythia-tiny-deduped retrace-tiny/pythia-tiny-control "
            "retrace-tiny/pythia-tiny-null retrace-tiny/pythia-tiny-wide --offline "
            "--cache-dir resources/hub --max-step 16") in audit["shell"]


def tiny_cache_study(cache: Path, **extra) -> dict:
    return {
        "study": "tiny-audit",
        "models": {"tiny": {"reference": "fix/tiny", "hub_cache": str(cache), "recipe": "70m",
                            "global_batch": 4}},
        "data": {"deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"}},
        "axes": {"model": ["tiny"], "data": ["deduped-raw"], "parallel": [{"gpus": 1, "pdbs": 4, "gas": 1}],
                 "steps": [2]},
        **extra,
    }


def test_audit_target_runs_on_a_local_hub_cache(tmp_path):
    from retrace.checkpoints.hubcache import publish_to_hub_cache

    cache = tmp_path / "hub"
    config = {"config.json": b'{"model_type": "gpt_neox"}'}
    weights = {s: {"model.safetensors": f"weights of step {s}".encode()} for s in (0, 2)}
    for rev, step in (("step0", 0), ("step1", 0), ("step2", 2), ("main", 2)):  # step1 = step0: LR 0
        publish_to_hub_cache(cache, "fix/tiny", rev, {**config, **weights[step]})
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(tiny_cache_study(cache)))
    wd = tmp_path / "wd"
    out = snakemake("audit", "--cores", "1", "--configfile", str(study), workdir=wd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    frame = pd.read_parquet(wd / "results" / "audit" / "audit.parquet")
    assert set(frame["repo"]) == {"fix/tiny"}
    assert {"step0", "step1", "step2", "main"} <= set(frame["revision"])
    summary = (wd / "results" / "audit" / "summary.txt").read_text()
    assert "clean: fix/tiny" in summary and "0 missing" in summary  # --max-step: its last local step
    log = (wd / "results" / "logs" / "audit" / "audit.log").read_text()
    assert "FAILED" not in log


def test_audit_refuses_to_mix_local_and_hub_references(tmp_path):
    cfg = tiny_cache_study(tmp_path / "hub")
    cfg["models"]["tiny"].pop("hub_cache")
    cfg["models"]["other"] = {"reference": "fix/other", "hub_cache": str(tmp_path / "hub"), "recipe": "70m",
                              "global_batch": 4, "start_step": 0}
    cfg["axes"]["model"] = ["tiny", "other"]
    from retrace.checkpoints.hubcache import publish_to_hub_cache

    for rev in ("step0", "step1", "step2"):
        publish_to_hub_cache(tmp_path / "hub", "fix/other", rev, {"config.json": b"{}"})
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(cfg))
    out = snakemake("-n", "audit", "--configfile", str(study), workdir=tmp_path / "wd")
    assert out.returncode != 0
    assert "mixes references from the Hub (tiny) and local hub caches" in out.stdout + out.stderr


# ------------------------------------------------------------------------- grid features they need


def base(**models) -> dict:
    return {
        "study": "unit",
        "design": "one_at_a_time",
        "cross": ["model", "data"],
        "models": models or {
            "a": {"reference": "EleutherAI/pythia-70m", "data": ["d1", "d0"]},
            "b": {"reference": "EleutherAI/pythia-70m-seed1", "data": ["d1"]},
        },
        "data": {f"d{i}": {"source": "synthetic", "corpus": "standard", "format": "raw", "order_seed": i}
                 for i in range(3)},
        "axes": {"model": ["a", "b"], "data": ["d0", "d1", "d2"], "parallel": [{"gpus": 32, "pdbs": 32, "gas": 1}],
                 "attention": ["flash", "global"], "steps": [4]},
    }


def test_models_data_leaves_out_the_other_pairs_and_keeps_ids():
    study = load_study(base(), root=ROOT)
    assert {(c.model.name, c.data.name, c.attention) for c in study.cells()} == {
        ("a", "d0", "flash"), ("a", "d0", "global"), ("a", "d1", "flash"), ("a", "d1", "global"),
        ("b", "d1", "flash"), ("b", "d1", "global")}
    cfg = base()
    for m in cfg["models"].values():
        m.pop("data")
    everything = load_study(cfg, root=ROOT).cell_ids()
    assert len(everything) == 12 and set(study.cell_ids()) <= set(everything)  # a subset, same ids
    cfg = base()
    cfg["design"], cfg["cross"] = "factorial", []
    assert len(load_study(cfg, root=ROOT).cells()) == 6


@pytest.mark.parametrize("change, message", [
    (lambda c: c["models"]["a"].update(data=["d9"]), "config key models.a.data[0]: 'd9' is not a data variant"),
    (lambda c: c["axes"].update(data=["d0", "d2"]),
     "config key models.b.data: none of ['d1'] is a value of axes.data, so model 'b' would get no cells"),
    (lambda c: c.update(cross=["model"]),
     "config key models.b.data: leaves out the baseline data variant 'd0': add it, or cross the data axis"),
])
def test_models_data_errors_name_the_key(change, message):
    cfg = base()
    change(cfg)
    with pytest.raises(RetraceError, match=re.escape(message)):
        load_study(cfg, root=ROOT)


def test_engine_neox_needs_its_section_and_the_train_rule_runs_neox_run(tmp_path):
    cfg = base()
    cfg["axes"]["engine"] = ["builtin", "neox"]
    with pytest.raises(RetraceError, match=r"config key neox: required when axes.engine has neox"):
        load_study(cfg, root=ROOT)
    cfg["neox"] = {"path": "/opt/gpt-neox", "container": "neox.sif", "conda_env": "neox"}
    with pytest.raises(RetraceError, match=r"give container or conda_env, not both"):
        load_study(cfg, root=ROOT)
    cfg["neox"] = {"path": "/opt/gpt-neox", "container": "/images/neox-v1.0.sif", "binds": ["/data"]}
    study = load_study(cfg, root=ROOT)
    neox = next(c for c in study.cells() if c.engine == "neox")
    builtin = next(c for c in study.cells() if c.engine == "builtin")
    assert neox.id.endswith("__neox") and train_command(neox) == "neox-run"
    assert train_command(builtin) == "train" and train_spec(study, builtin).engine == "builtin"
    spec = train_spec(study, neox)
    assert isinstance(spec, NeoXRunConfig) and spec.neox_path == "/opt/gpt-neox" and not hasattr(spec, "engine")
    assert spec.neox_container == "/images/neox-v1.0.sif" and spec.neox_bind == ["/data"] and spec.data_kind == "raw"
    bad = base()
    bad["axes"]["engine"] = ["neox"]
    bad["neox"] = cfg["neox"]
    bad["models"]["a"]["lr"] = 1e-3
    with pytest.raises(RetraceError, match=r"engine neox runs the published GPT-NeoX config, but models.a sets lr"):
        bad_study = load_study(bad, root=ROOT)
        train_spec(bad_study, next(c for c in bad_study.cells() if c.model.name == "a"))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake("-n", "-p", "--configfile", str(tmp_path / "s.yaml"), workdir=tmp_path / "wd")
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if " retrace " in f" {line} " or "retrace" in line]
    neox_lines = [line for line in commands if "neox-run" in line]
    assert neox_lines and all('"neox_path": "/opt/gpt-neox"' in line and '"neox_container": "/images/neox-v1.0.sif"'
                              in line and '"neox_bind": ["/data"]' in line for line in neox_lines)
    assert any(re.search(r"retrace\S* train --spec .*\"engine\": \"builtin\"", line) for line in commands)
