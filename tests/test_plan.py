"""retrace.plan / `retrace plan`: the cost of a study from its numbers, before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retrace.grid import load_study
from retrace.plan import ASSUMED_MFU, GPUS, flops_per_token, render, study_plan
from retrace.pythia.sizes import pythia_config
from snakemake_runner import ROOT

STUDIES = ROOT / "studies"


def test_the_70m_control_fetches_one_shard_per_variant_not_the_whole_pile():
    plan = study_plan(load_study(STUDIES / "pythia-70m-control.yaml", root=ROOT))
    data = {d["variant"]: d for d in plan.data}
    for name in ("deduped-preshuffled", "standard-preshuffled"):
        d = data[name]
        # items [0, 1,024,000) of 2049 uint16 tokens lie in shard 00000 (30 GB): that shard and document.idx
        assert d["shards"] == 1 and d["fetch_bytes"] == 30_000_000_000 + 1_757_184_042 == d["disk_bytes"]
        assert d["legacy_fetch_bytes"] > 18 * d["fetch_bytes"]  # every shard, and then a merged copy
    ref = plan.references[0]
    n = pythia_config("70m").n_params
    assert ref["repo"] == "EleutherAI/pythia-70m-deduped" and ref["steps"] == 12 and ref["fetch_bytes"] == 2 * n * 12


def test_memory_and_gpu_hours_per_cell_from_the_model_numbers():
    study = load_study(STUDIES / "pythia-2.8b-deduped.yaml", root=ROOT)
    plan = study_plan(study)
    by_layout = {c.cell.split("__")[2]: c for c in plan.cells if "__a40__flash__torch2.4" in c.cell}
    # ZeRO-1 with activation recomputation fits 48 GB at 16×A40 p8 and 8×A40 p8/p4; pdbs 16 does not
    assert by_layout["g16p8a8"].fits and by_layout["g8p8a16"].fits and by_layout["g8p4a32"].fits
    assert by_layout["g8p16a8"].fits is False
    # GPU-hours: (6N + 12·L·h·T)·4/3 FLOPs per token × 1000 steps × 1024 × 2048 tokens / (peak × MFU)
    shape = pythia_config("2.8b")
    tokens = 1000 * 1024 * 2048
    per_token = (6 * shape.n_params + 12 * shape.n_layers * shape.hidden * 2048) * 4 / 3
    want = per_token * tokens / (GPUS["a40"][1] * ASSUMED_MFU) / 3600
    assert by_layout["g16p8a8"].gpu_hours == pytest.approx(want, rel=1e-12)
    assert flops_per_token(shape, 2048, recompute=False) == pytest.approx(per_token * 3 / 4, rel=1e-12)
    # measured utilisation replaces the assumed one, and says so
    measured = study_plan(study, mfu={"a40": 0.2})
    cell = next(c for c in measured.cells if c.cell == by_layout["g16p8a8"].cell)
    assert cell.gpu_hours == pytest.approx(2 * want) and "measured MFU" in cell.throughput_source


def test_the_embedded_study_costs_nothing_to_download_and_runs_on_cpu():
    plan = study_plan(load_study(ROOT / "config.yaml", root=ROOT))
    assert plan.download_bytes == 0 and plan.gpu_hours == 0
    assert all(c.memory_per_gpu is None and c.cpu_core_hours > 0 for c in plan.cells)
    text = render(plan, max_cells=3)
    assert text.startswith("# plan of study embedded-tiny: 54 cells") and "… and 51 more cells" in text


def test_cli_prints_the_plan_and_its_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "retrace", "plan", "--configfile",
                          str(STUDIES / "pythia-70m-control.yaml"), "--json"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    data = json.loads(out.stdout)
    assert data["study"] == "pythia-70m-control" and len(data["cells"]) == 14 and data["download_bytes"] > 0
    bad = tmp_path / "mfu.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, "-m", "retrace", "plan", "--configfile", str(ROOT / "config.yaml"),
                          "--throughput", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "no 'mfu' mapping" in out.stderr


def test_a_downloaded_raw_variant_renders_without_a_merged_copy_line():
    """The deduped raw Pile (pythia_deduped_pile_idxmaps) has no merged-copy alternative: the plan of a
    study reading it must still render (the start of every run prints it)."""
    plan = study_plan(load_study(STUDIES / "polypythias-segments.yaml", root=ROOT))
    text = render(plan)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("data deduped-raw-seed8 ")]
    assert "merge" not in line and "fetch" in line


def test_the_order_check_stream_is_planned_as_its_first_shard():
    plan = study_plan(load_study(STUDIES / "polypythias-seeds.yaml", root=ROOT))
    (d,) = [d for d in plan.data if d["variant"] == "standard-preshuffled"]
    assert d["shards"] == 1 and d["fetch_bytes"] == 30_000_000_000 + 1_757_184_042


def test_segments_plan_their_published_optimizer_states():
    study = load_study(STUDIES / "polypythias-segments.yaml", root=ROOT)
    plan = study_plan(study)
    (states,) = [r for r in plan.references if r.get("what") == "training states"]
    n = pythia_config("410m").n_params
    assert states["steps"] == 5 and states["fetch_bytes"] == 14 * n * 5  # fp16 weights + fp32 master, m, v
    assert "reference EleutherAI/neox-ckpt-pythia-410m-seed8 training states (Hub): 5 step(s)" in render(plan)
