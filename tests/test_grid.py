"""retrace.grid: the study schema, semantic checks, designs, stable cell ids and the cells table."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import yaml

from retrace.errors import RetraceError
from retrace.grid import AXES, CELL_COLUMNS, CELL_ID_RE, OPTIONAL_AXES, SCHEMA_PATH, load_study
from retrace.launch import train_spec
from retrace.placement import place
from retrace.spec import TrainConfig, from_arguments
from study_factory import synthetic_study

ROOT = Path(__file__).resolve().parents[1]


def base_config() -> dict:
    return synthetic_study(
        "unit",
        models={"pythia-70m-deduped": {"reference": "EleutherAI/pythia-70m-deduped"},
                "pythia-70m": {"reference": "EleutherAI/pythia-70m", "documented": "standard-raw"}},
        parallel=[{"gpus": 32, "pdbs": 32, "gas": 1}, {"gpus": 16, "pdbs": 32, "gas": 2}],
        gpu_type=["a100"], steps=[1000])


def load(cfg: dict):
    return load_study(cfg, root=ROOT)


def error_of(cfg: dict) -> str:
    with pytest.raises(RetraceError) as exc:
        load(cfg)
    return str(exc.value)


# ----------------------------------------------------------------------------------------- designs


def test_factorial_is_every_combination_with_defaults():
    study = load(base_config())
    cells = study.cells()
    assert len(cells) == 2 * 2
    c = cells[0]
    assert c.id == "pythia-70m-deduped__deduped-raw__g32p32a1__a100__flash__torch-cpu__s1234__to1000__fp16__builtin"
    assert c.axes == {"model": "pythia-70m-deduped", "data": "deduped-raw",
                      "parallel": {"gpus": 32, "pdbs": 32, "gas": 1}, "gpu_type": "a100", "attention": "flash",
                      "deps": "torch-cpu", "seed": 1234, "steps": 1000, "precision": "fp16", "engine": "builtin",
                      "replica": 0, "reanchor": False}
    assert {(x.data.name, x.parallel.gas) for x in cells} == set(
        itertools.product(["deduped-raw", "standard-raw"], [1, 2]))


def test_one_at_a_time_changes_one_axis_per_cell():
    cfg = base_config()
    cfg["design"] = "one_at_a_time"
    cfg["axes"]["attention"] = ["flash", "global"]
    cfg["axes"]["seed"] = [1234, 1, 2]
    cfg["baseline"] = {"data": "standard-raw"}
    study = load(cfg)
    cells = study.cells()
    base = cells[0]
    assert base.data.name == "standard-raw" and base.parallel.gas == 1 and base.attention == "flash"
    # baseline + 1 other data + 1 other layout + 1 other attention + 2 other seeds
    assert len(cells) == 1 + 1 + 1 + 1 + 2
    for c in cells[1:]:
        differing = [a for a in AXES if c.axes[a] != base.axes[a]]
        assert len(differing) == 1, (c.id, differing)


def test_one_at_a_time_cross_repeats_the_design_per_combination():
    cfg = base_config()
    cfg["design"] = "one_at_a_time"
    cfg["cross"] = ["model", "data"]
    cfg["axes"]["model"] = ["pythia-70m-deduped", "pythia-70m"]
    cfg["axes"]["attention"] = ["flash", "global"]
    cells = load(cfg).cells()
    # 2 models × 2 variants × (baseline + other layout + other attention)
    assert len(cells) == 4 * 3
    for model, data in itertools.product(["pythia-70m-deduped", "pythia-70m"], ["deduped-raw", "standard-raw"]):
        group = [c for c in cells if c.model.name == model and c.data.name == data]
        assert len(group) == 3


# ---------------------------------------------------------------------------------------- cell ids


def test_ids_follow_the_grammar_and_split_back_into_axes():
    cfg = base_config()
    cfg["models"]["pythia-70m-deduped"]["start_step"] = 1000
    cfg["axes"]["steps"] = [2000]
    cfg["axes"]["deps"] = ["torch2.4"]
    for cell in load(cfg).cells():
        assert CELL_ID_RE.fullmatch(cell.id)
        tokens = cell.id.split("__")
        assert len(tokens) == len(AXES) - len(OPTIONAL_AXES)  # optional axes at their default: no token
        assert tokens[0] == "pythia-70m-deduped-from1000"
        assert tokens[2] == f"g{cell.parallel.gpus}p{cell.parallel.pdbs}a{cell.parallel.gas}"
        assert tokens[5:8] == ["torch2.4", "s1234", "to2000"]


@pytest.mark.parametrize("design", ["factorial", "one_at_a_time"])
@pytest.mark.parametrize(
    "axis,value",
    [
        ("data", "deduped-pre"),
        ("parallel", {"gpus": 8, "pdbs": 64, "gas": 2}),
        ("attention", "global"),
        ("seed", 7),
        ("steps", 2000),
        ("precision", "bf16"),
        ("model", "pythia-70m"),
    ],
)
def test_adding_a_value_adds_cells_and_never_renames(design, axis, value):
    cfg = base_config()
    cfg["design"] = design
    cfg["data"]["deduped-pre"] = {"source": "synthetic", "corpus": "deduped", "format": "preshuffled"}
    cfg["synthetic"] = {"seq_length": 2048}
    before = [c.id for c in load(cfg).cells()]
    grown = copy.deepcopy(cfg)
    grown["axes"].setdefault(axis, list(yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["axes"]
                                      ["properties"][axis].get("default", [])))
    grown["axes"][axis].append(value)
    after = [c.id for c in load(grown).cells()]
    assert set(before) < set(after)


def test_ids_are_unique_and_stable_across_loads():
    cfg = base_config()
    a = [c.id for c in load(cfg).cells()]
    b = [c.id for c in load(copy.deepcopy(cfg)).cells()]
    assert a == b and len(set(a)) == len(a)


def test_cells_frame_one_row_per_cell_every_axis_a_column():
    study = load(base_config())
    frame = study.cells_frame()
    assert list(frame.columns) == list(CELL_COLUMNS)
    assert len(frame) == len(study.cells())
    assert frame["cell"].is_unique
    row = frame.iloc[1].to_dict()
    assert row["gpus"] == 16 and row["gas"] == 2 and row["model"] == "pythia-70m-deduped"


def test_study_cell_lookup_and_unknown_id():
    study = load(base_config())
    cid = study.cells()[2].id
    assert study.cell(cid).id == cid
    with pytest.raises(RetraceError, match="no cell"):
        study.cell("nope")


def test_checkpoint_steps_are_the_pythia_schedule():
    cfg = base_config()
    cell = load(cfg).cells()[0]
    assert cell.checkpoint_steps() == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    cfg["axes"]["steps"] = [143000]
    assert len(load(cfg).cells()[0].checkpoint_steps()) == 154


def test_placement_from_the_cell_and_the_cluster():
    cfg = base_config()
    cfg["axes"]["gpu_type"] = ["cpu", "a100", "h100"]
    cfg["axes"]["parallel"] = [{"gpus": 4, "pdbs": 32, "gas": 8}, {"gpus": 32, "pdbs": 32, "gas": 1}]
    cfg["cluster"] = {"gpus_per_node": 8, "threads_per_rank": 2, "gpu_models": {"h100": ""},
                      "gpu_constraints": {"h100": "h100&ib"}}
    study = load(cfg)
    by = {(c.gpu_type, c.parallel.gpus): place(gpus=c.parallel.gpus, gpu_type=c.gpu_type, cluster=study.cluster)
          for c in study.cells() if c.data.name == "deduped-raw"}
    cpu = by[("cpu", 4)]
    assert (cpu.nodes, cpu.threads, cpu.gpu, cpu.mpi, cpu.launcher) == (1, 8, None, None, "")
    one = by[("a100", 4)]
    assert (one.nodes, one.gpu, one.gpu_model, one.constraint, one.mpi) == (1, 4, "a100", None, None)
    many = by[("a100", 32)]
    assert (many.nodes, many.tasks_per_node, many.mpi, many.cpus_per_task, many.gpu) == (4, 8, "srun", 2, None)
    assert many.slurm_extra == "--gpus-per-node=a100:8" and many.threads == 16
    assert many.launcher == "srun --nodes=4 --ntasks-per-node=8 --cpus-per-task=2 --kill-on-bad-exit=1"
    untyped = by[("h100", 32)]  # GPUs selected by feature, not GRES type
    assert untyped.slurm_extra == "--gpus-per-node=8" and untyped.constraint == "h100&ib"
    assert by[("h100", 4)].gpu_model is None and by[("h100", 4)].gpu == 4


def test_the_cell_spec_is_what_the_train_cli_runs():
    cfg = base_config()
    cfg["models"]["pythia-70m-deduped"].update(start_step=1000, lr=5e-4)
    cfg["axes"]["steps"] = [2000]
    study = load(cfg)
    cell = study.cells()[1]
    spec = train_spec(study, cell)
    # the start step staged by fetch_reference, read locally; the published repo kept beside it
    assert spec.reference == "./resources/references/EleutherAI/pythia-70m-deduped/step1000.safetensors"
    assert spec.published == "EleutherAI/pythia-70m-deduped" and spec.start_step == 1000
    assert spec.data == "resources/data/synthetic/s1234/deduped/raw/document"
    assert (spec.gpus, spec.pdbs, spec.gas, spec.global_batch) == (16, 32, 2, 1024)
    assert spec.steps == 2000 and spec.recipe == "70m" and spec.lr == 5e-4
    assert spec.out == f"results/runs/{cell.id}"
    from retrace.cli import build_parser

    # the trainer's own parser takes the JSON the rule renders; --out and --threads come from the rule
    parsed = build_parser().parse_args(["train", "--spec", spec.to_json(), "--out", "x", "--gas", "4"])
    got = from_arguments(TrainConfig, parsed)
    assert got == dataclasses.replace(spec, out="x", gas=4)
    assert "out" not in json.loads(spec.to_json()) and "threads" not in json.loads(spec.to_json())


def test_model_keys_that_name_a_setting_reach_the_spec_and_the_fingerprint():
    """A new setting is one TrainConfig field plus its schema key: the grid passes it through."""
    cfg = base_config()
    cfg["models"]["pythia-70m-deduped"].update(checkpoint_activations=True, warmup_iters=7)
    cfg["train"] = {"rotary_angles": "fp32"}
    study = load(cfg)
    spec = train_spec(study, next(c for c in study.cells() if c.model.name == "pythia-70m-deduped"))
    assert spec.checkpoint_activations and spec.warmup_iters == 7 and spec.rotary_angles == "fp32"
    recipe = spec.resolve_recipe()
    assert recipe.warmup_steps == 7.0 and study.models["pythia-70m-deduped"].recipe_values() == recipe
    fp = spec.fingerprint(recipe)
    assert fp["rotary_angles"] == "fp32" and fp["recipe"]["warmup_steps"] == 7.0 and "steps" not in fp


# ------------------------------------------------------------------------------------------ errors


def test_unknown_keys_are_named():
    cfg = base_config()
    cfg["axis"] = {}
    assert "unknown key axis" in error_of(cfg)
    cfg = base_config()
    cfg["axes"]["parallel"][1]["gpu"] = 2
    msg = error_of(cfg)
    assert "unknown key axes.parallel[1].gpu" in msg and "known keys: gas, gpus, pdbs" in msg
    cfg = base_config()
    cfg["models"]["pythia-70m"]["start"] = 3
    assert "unknown key models.pythia-70m.start" in error_of(cfg)


def test_schema_errors_name_the_key():
    cfg = base_config()
    cfg["axes"]["precision"] = ["fp8"]
    assert "config key axes.precision[0]" in error_of(cfg)
    cfg = base_config()
    del cfg["axes"]["steps"]
    assert "missing key axes.steps" in error_of(cfg)
    cfg = base_config()
    cfg["data"]["bad__name"] = cfg["data"].pop("deduped-raw")
    assert "not a valid token" in error_of(cfg)
    cfg = base_config()
    cfg["models"]["pythia-70m"]["reference"] = "no-org"
    assert "config key models.pythia-70m.reference" in error_of(cfg)


def test_layout_breaking_the_global_batch():
    cfg = base_config()
    cfg["axes"]["parallel"].append({"gpus": 16, "pdbs": 16, "gas": 3})
    msg = error_of(cfg)
    assert "axes.parallel[2]" in msg and "16·16·3 = 768" in msg and "global batch 1024" in msg


def test_layout_checked_against_the_model_override():
    cfg = base_config()
    cfg["models"]["pythia-70m-deduped"]["global_batch"] = 64
    cfg["axes"]["parallel"] = [{"gpus": 2, "pdbs": 16, "gas": 2}, {"gpus": 4, "pdbs": 16, "gas": 1}]
    assert len(load(cfg).cells()) == 4
    cfg["axes"]["parallel"].append({"gpus": 1, "pdbs": 32, "gas": 1})
    assert "axes.parallel[2]" in error_of(cfg)


def test_deps_without_env_file(tmp_path):
    cfg = base_config()
    cfg["axes"]["deps"] = ["torch-cpu", "torch9.9"]
    msg = error_of(cfg)
    assert "axes.deps[1]" in msg and "envs/torch9.9.yaml" in msg


def test_unknown_model_data_and_baseline_values():
    cfg = base_config()
    cfg["axes"]["model"] = ["pythia-70m-deduped", "pythia-160m"]
    assert "axes.model[1]" in error_of(cfg)
    cfg = base_config()
    cfg["axes"]["data"] = ["deduped-raw", "nope"]
    assert "axes.data[1]" in error_of(cfg)
    cfg = base_config()
    cfg["design"] = "one_at_a_time"
    cfg["baseline"] = {"attention": "global"}
    assert "baseline.attention" in error_of(cfg)
    cfg = base_config()
    cfg["baseline"] = {"attention": "flash"}
    assert "config key baseline: only used by design one_at_a_time" in error_of(cfg)


def test_start_step_and_steps():
    cfg = base_config()
    cfg["models"]["pythia-70m-deduped"]["start_step"] = 1000
    assert "axes.steps[0]" in error_of(cfg)


def test_synthetic_preshuffled_items_must_fit_the_sequence_length():
    cfg = base_config()
    cfg["data"]["deduped-pre"] = {"source": "synthetic", "corpus": "deduped", "format": "preshuffled"}
    cfg["axes"]["data"] = ["deduped-pre"]
    msg = error_of(cfg)
    assert "models.pythia-70m-deduped.seq_length" in msg and "synthetic.seq_length = 128" in msg
    cfg["models"]["pythia-70m-deduped"]["seq_length"] = 128
    assert len(load(cfg).cells()) == 2


def test_pile_variants():
    cfg = base_config()
    cfg["data"]["standard-raw"] = {"source": "pile", "corpus": "standard", "format": "raw"}
    assert "data.standard-raw.path" in error_of(cfg) and "not published" in error_of(cfg)
    cfg["data"]["standard-raw"]["path"] = "/data/pile/pile_20B_tokenizer_text_document"
    assert len(load(cfg).cells()) == 4
    cfg["data"]["deduped-raw"]["path"] = "/data/x"
    assert "data.deduped-raw.path" in error_of(cfg)


def test_documented_must_be_a_variant():
    cfg = base_config()
    cfg["models"]["pythia-70m"]["documented"] = "deduped"
    assert "models.pythia-70m.documented" in error_of(cfg)


def test_unknown_recipe_size():
    cfg = base_config()
    cfg["models"]["tiny"] = {"reference": "retrace/tiny"}
    assert "models.tiny" in error_of(cfg) and "recipe" in error_of(cfg)
    cfg["models"]["tiny"]["recipe"] = "3m"
    assert "models.tiny.recipe" in error_of(cfg)


def _publish(cache: Path, repo: str, steps: list[int]) -> None:
    from retrace.checkpoints.hubcache import publish_to_hub_cache

    for s in steps:
        publish_to_hub_cache(cache, repo, f"step{s}", {"config.json": f'{{"step": {s}}}'.encode()})


def test_local_reference_start_step_checked_in_the_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    _publish(cache, "retrace/tiny-deduped", [0, 1, 2, 4, 8, 16])
    cfg = base_config()
    cfg["models"]["tiny"] = {"reference": "retrace/tiny-deduped", "hub_cache": str(cache), "recipe": "70m",
                             "global_batch": 16, "start_step": 4}
    cfg["axes"]["model"] = ["tiny"]
    cfg["axes"]["parallel"] = [{"gpus": 2, "pdbs": 8, "gas": 1}]
    cfg["axes"]["steps"] = [16]
    study = load(cfg)
    assert study.cells()[0].id.startswith("tiny-from4__")
    cfg["models"]["tiny"]["start_step"] = 3
    msg = error_of(cfg)
    assert "models.tiny.start_step" in msg and "no branch step3" in msg and "0, 1, 2, 4, 8, 16" in msg
    cfg["models"]["tiny"]["start_step"] = 0
    cfg["axes"]["steps"] = [32]
    msg = error_of(cfg)
    assert "axes.steps[0]" in msg and "step 32" in msg
    cfg["models"]["tiny"]["hub_cache"] = str(tmp_path / "empty")
    cfg["axes"]["steps"] = [16]
    assert "no step branches" in error_of(cfg)


# ------------------------------------------------------------------------------ shared with Snakemake


def test_snakemake_validate_uses_the_same_schema():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    validate(base_config(), str(SCHEMA_PATH))
    cfg = base_config()
    cfg["axes"]["parallel"][0]["gpu"] = 1
    with pytest.raises(WorkflowError):
        validate(cfg, str(SCHEMA_PATH))


def test_the_grid_needs_no_torch():
    """Snakemake builds the DAG with retrace.grid in its own process: importing torch there would cost
    ~1 s and ~250 MB on every dry run (benchmarks/dag.py)."""
    import subprocess
    import sys

    code = ("import sys, yaml; from retrace.grid import load_study; "
            f"s = load_study(yaml.safe_load(open({str(ROOT / 'config.yaml')!r})), root={str(ROOT)!r}); "
            "[c.checkpoint_steps() for c in s.cells()]; s.cells_frame(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "workflow"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


def test_load_study_from_a_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(base_config()))
    assert len(load_study(path, root=ROOT).cells()) == 4
    path.write_text("study: [unclosed")
    with pytest.raises(RetraceError, match="not valid YAML"):
        load_study(path, root=ROOT)
    with pytest.raises(RetraceError, match="not found"):
        load_study(tmp_path / "missing.yaml")


def test_replica_and_reanchor_axes_add_cells_and_rename_none():
    from retrace.grid import CELL_ID_RE

    before = {c.id for c in load(base_config()).cells()}
    cfg = base_config()
    cfg["axes"] = {**cfg["axes"], "replica": [0, 1], "reanchor": [False, True]}
    cells = load(cfg).cells()
    ids = {c.id for c in cells}
    assert before <= ids and len(ids) == 4 * len(before)
    assert {c.id.split("__", 10)[-1] for c in cells if c.replica or c.reanchor} == {"r1", "anchored", "r1__anchored"}
    assert all(CELL_ID_RE.match(i) for i in ids)
    anchored = next(c for c in cells if c.reanchor and not c.replica)
    assert not next(c for c in cells if c.id == anchored.id.removesuffix("__anchored")).reanchor


def test_model_axes_limit_a_models_replica_and_reanchor_cells():
    """models.<name>.axes leaves a model's other replica/reanchor cells out; the other model keeps all;
    no remaining id changes; values off the axis or leaving out the baseline value are refused."""
    cfg = base_config()
    cfg["design"] = "one_at_a_time"
    cfg["cross"] = ["model", "data"]
    cfg["axes"] = {**cfg["axes"], "model": ["pythia-70m-deduped", "pythia-70m"], "replica": [0, 1],
                   "reanchor": [False, True]}
    full = {c.id for c in load(cfg).cells()}
    cfg["models"]["pythia-70m"]["axes"] = {"replica": [0], "reanchor": [False]}
    cells = load(cfg).cells()
    by_model = {m: [c for c in cells if c.model.name == m] for m in ("pythia-70m", "pythia-70m-deduped")}
    # per model x data: baseline, the other layout, replica 1, anchored (one axis at a time)
    assert len(by_model["pythia-70m-deduped"]) == 2 * 4
    assert len(by_model["pythia-70m"]) == 2 * 2
    assert not any(c.replica or c.reanchor for c in by_model["pythia-70m"])
    assert {c.id for c in cells} <= full
    cfg["models"]["pythia-70m"]["axes"] = {"reanchor": [True]}
    assert "models.pythia-70m.axes.reanchor: leaves out the baseline value False" in error_of(cfg)
    cfg["models"]["pythia-70m"]["axes"] = {"replica": [0, 2]}
    assert "models.pythia-70m.axes.replica[1]: 2 is not one of the values of axes.replica" in error_of(cfg)
    cfg["models"]["pythia-70m"]["axes"] = {"seed": [1234]}
    assert "unknown key models.pythia-70m.axes.seed" in error_of(cfg)
