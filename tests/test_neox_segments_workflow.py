"""An offline study whose "published" run is built in the GPT-NeoX training layout (models.<name>.build
.format neox) and reproduced in segments from its ZeRO-1 states: the DAG, and the whole workflow run for
real (a segment on the run's own data lands on the next published step bit for bit, on the other
variant it does not; the report's Segments table says so)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from snakemake_runner import job_counts, snakemake, spec_of
from test_studies import jobs_of

LAYOUT = {"gpus": 2, "pdbs": 4, "gas": 1}


def study(tmp_path) -> dict:
    shape = {"n_layers": 2, "hidden": 32, "heads": 4, "vocab": 512, "seq_len": 32}
    model = {"reference": "retrace-tiny/neox-ckpt-tiny", "hub_cache": "resources/hub", "documented": "standard-raw",
             "recipe": "70m", "global_batch": 8, "seq_length": 32, "train_iters": 100}
    return {
        "study": "tiny-neox-segments",
        "synthetic": {"seed": 1234, "vocab": 512, "seq_length": 32, "tokens": 200_000},
        "data": {"standard-raw": {"source": "synthetic", "corpus": "standard", "format": "raw"},
                 "deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"}},
        "models": {"tiny": {**model, "segments": {"starts": [8], "length": 8},
                            "build": {"shape": shape, "data": "standard-raw", "parallel": LAYOUT, "steps": 16,
                                      "format": "neox", "max_elements_per_comm": 3000}}},
        "design": "factorial",
        "axes": {"model": ["tiny"], "data": ["standard-raw", "deduped-raw"], "parallel": [LAYOUT],
                 "gpu_type": ["cpu"], "attention": ["flash"], "deps": ["torch-cpu"], "seed": [1234],
                 "steps": [16], "precision": ["fp16"], "engine": ["builtin"]},
        "cluster": {"threads_per_rank": 1},
    }


def write(tmp_path) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(tmp_path)))
    return str(path)


def test_the_dag_builds_publishes_as_neox_and_stages_the_state(tmp_path):
    out = snakemake("-n", "-p", "--configfile", write(tmp_path), workdir=tmp_path / "wd")
    assert out.returncode == 0, out.stderr[-3000:]
    counts = job_counts(out.stdout)
    assert counts["fetch_training_state"] == 1 and counts["train"] == 2 and counts["reference_publish"] == 1
    (pub,) = jobs_of(out.stdout, "reference_publish")
    assert "--format neox --dp 2 --max-elements-per-comm 3000" in pub["shell"]
    (build,) = jobs_of(out.stdout, "reference_train")
    assert spec_of(build["shell"])["keep_states"] == 6  # 0, 1, 2, 4, 8, 16: every published step kept
    (stage,) = jobs_of(out.stdout, "fetch_training_state")
    assert "HF_HUB_CACHE=resources/hub HF_HUB_OFFLINE=1 retrace fetch-state --source " \
        "retrace-tiny/neox-ckpt-tiny@step8" in stage["shell"]
    for job in jobs_of(out.stdout, "train"):
        spec = spec_of(job["shell"])
        assert spec["reference"] == "./resources/training_states/retrace-tiny/neox-ckpt-tiny/step8"
        assert (spec["start_step"], spec["steps"], spec["gpus"]) == (8, 16, 2)


@pytest.mark.slow
def test_the_workflow_reproduces_a_segment_bit_for_bit_on_its_own_data(tmp_path):
    wd = tmp_path / "wd"
    out = snakemake("--cores", "2", "--configfile", write(tmp_path), workdir=wd, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seg = pd.read_csv(wd / "results" / "report" / "tables" / "segments.csv").set_index("data")
    assert seg.loc["standard-raw", "bitwise"] == 1 and seg.loc["standard-raw", "l2"] == 0
    assert seg.loc["deduped-raw", "bitwise"] == 0 and seg.loc["deduped-raw", "l2"] > 0
    assert set(seg["closest"]) == {"standard-raw"} or set(seg["closest"]) == {"none"}
