"""models.<name>.segments: one model per start, trained to start + length, each with its own token and
verdict; a segment with the published optimizer state starts from the staged GPT-NeoX checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrace.errors import RetraceError
from retrace.grid import load_study
from retrace.launch import start_weights, train_spec
from study_factory import synthetic_study

ROOT = Path(__file__).resolve().parents[1]


def config(**segments) -> dict:
    seg = {"starts": [1000, 5000], **segments}
    return synthetic_study(
        "seg",
        models={"p70": {"reference": "EleutherAI/neox-ckpt-pythia-70m", "recipe": "70m", "segments": seg,
                        "documented": "standard-raw"},
                "p70-step0": {"reference": "EleutherAI/pythia-70m"}},
        model=["p70", "p70-step0"], parallel=[{"gpus": 32, "pdbs": 32, "gas": 1}], gpu_type=["a100"],
        steps=[1000, 3000])


def test_each_start_is_a_model_trained_to_its_own_end():
    study = load_study(config(), root=ROOT)
    seg = [c for c in study.cells() if c.model.segment_of == "p70"]
    # the steps axis (1000, 3000) does not apply to segments: each trains to start + 1000
    assert sorted({(c.model.name, c.model.start_step, c.steps) for c in seg}) == [
        ("p70-from1000", 1000, 2000), ("p70-from5000", 5000, 6000)]
    assert all(c.id.startswith(f"{c.model.name}__") and "-from" not in c.id.split("__")[0][len(c.model.name):]
               for c in seg)
    assert len(seg) == 2 * 2  # × the two data variants, and no duplicate per steps value
    assert {c.model.documented for c in seg} == {"standard-raw"}
    assert sorted({c.steps for c in study.cells() if c.model.name == "p70-step0"}) == [1000, 3000]
    assert seg[0].checkpoint_steps() == [1000, 2000]


def test_a_segment_reads_the_staged_training_state_unless_told_not_to():
    study = load_study(config(), root=ROOT)
    cell = next(c for c in study.cells() if c.model.name == "p70-from5000")
    assert start_weights(cell) == ["resources/training_states/EleutherAI/neox-ckpt-pythia-70m/step5000"]
    spec = train_spec(study, cell)
    assert (spec.reference, spec.start_step, spec.steps) == (
        "./resources/training_states/EleutherAI/neox-ckpt-pythia-70m/step5000", 5000, 6000)
    plain = load_study(config(optimizer_state=False, length=2000), root=ROOT)
    cell = next(c for c in plain.cells() if c.model.name == "p70-from5000")
    assert start_weights(cell) == ["resources/references/EleutherAI/neox-ckpt-pythia-70m/step5000.safetensors"]
    assert cell.steps == 7000 and cell.checkpoint_steps() == [5000, 6000, 7000]


def test_adding_a_start_adds_cells_and_renames_none():
    a = set(load_study(config(), root=ROOT).cell_ids())
    b = set(load_study(config(starts=[1000, 5000, 9000]), root=ROOT).cell_ids())
    assert a < b and all("p70-from9000__" in i for i in b - a)


def test_start_step_and_segments_together_are_refused():
    cfg = config()
    cfg["models"]["p70"]["start_step"] = 1000
    with pytest.raises(RetraceError, match=r"models\.p70\.start_step: set either start_step or segments"):
        load_study(cfg, root=ROOT)


def test_a_segment_clashing_with_a_resumed_model_is_refused():
    cfg = config()
    cfg["models"]["p70-from1000"] = {"reference": "EleutherAI/neox-ckpt-pythia-70m", "recipe": "70m"}
    cfg["axes"]["model"] = ["p70", "p70-from1000"]
    with pytest.raises(RetraceError, match="same cell-id token"):
        load_study(cfg, root=ROOT)
