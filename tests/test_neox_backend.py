"""retrace.neox: GPT-NeoX v1.0 configs from the published Pythia ymls, the launch, and the conversion back.

What is checked here without GPT-NeoX (no GPU, no checkout on this machine):
  * the published configs (a facts table in retrace.neox.published, no copied files) hold every size and
    variant, the documented inconsistencies, and agree with the reference table (reference/pythia-neox.md
    §1-§4) and retrace's size registry and recipes;
  * generated configs equal the golden files in tests/golden/neox/ (regenerate with
    RETRACE_REGEN_GOLDEN=1 and review the diff), keep every published value the cell does not change,
    parse with GPT-NeoX's loader (yaml.load FullLoader) to the right types, and satisfy v1.0's batch
    arithmetic (``calculate_batch_parameters``/``check_batch_parameters``, re-derived here);
  * the save schedule and the stop (exit_interval) reproduce the canonical checkpoint steps;
  * the launch command, the load view, the conversion of tiny hand-built NeoX checkpoints (same tensors
    as reading them directly) and the log parsing; and run_cell end to end against a stand-in for
    deepy.py written below (it writes NeoX-format checkpoints and v1.0-format log lines; it is a test
    double, not GPT-NeoX).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from retrace.errors import RetraceError
from retrace.neox.config import neox_config, write_neox_config
from retrace.neox.published import NO_DEDUPED, PUBLISHED_SIZES, published_config
from retrace.neox.runner import NeoXEnv, launch_plan, prepare_load, run_cell

GOLDEN = Path(__file__).parent / "golden" / "neox"
DEDUP = "/data/pile_deduped/pile_0.87_deduped_text_document"
STANDARD = "/data/pile/pile_20B_tokenizer_text_document"

# name: (neox_config kwargs). The blog's layouts: 70m-deduped on 8 GPUs (pdbs 4, gas 32); 2.8b-deduped on
# 16 A40s (pdbs 8, gas 8); 12b-deduped (typo corrected) and 1b (bf16 correction) in their published layouts.
CASES = {
    "pythia-70m-deduped_g8p4a32": dict(size="70m", deduped=True, gpus=8, pdbs=4, gas=32, data=DEDUP, steps=1000,
                                       save="/runs/c70/neox/save", load="/runs/c70/neox/load"),
    "pythia-2.8b-deduped_g16p8a8": dict(size="2.8b", deduped=True, gpus=16, pdbs=8, gas=8, data=DEDUP + ".bin",
                                        steps=5000, save="/runs/c28/neox/save", attention="global",
                                        vocab_file="/data/20B_tokenizer.json"),
    "pythia-12b-deduped_g64p8a2": dict(size="12b", deduped=True, gpus=64, pdbs=8, gas=2, data=DEDUP, steps=143000,
                                       save="/runs/c12/neox/save", load="/runs/c12/neox/load"),
    "pythia-1b_g64p16a1_from1000": dict(size="1b", gpus=64, pdbs=16, gas=1, data=STANDARD, steps=3000,
                                        start_step=1000, save="/runs/c1b/neox/save", load="/runs/c1b/neox/load",
                                        launcher="slurm"),
}

# The reference table (§1): L, h, heads, lr, min_lr, pp, mp, micro, GAS, ZeRO stage, bucket.
TABLE = {
    "14m": (6, 128, 4, 1e-3, 1e-4, 0, 1, 32, 1, 0, 5e7),
    "31m": (6, 256, 8, 1e-3, 1e-4, 0, 1, 32, 1, 0, 5e8),
    "70m": (6, 512, 8, 1e-3, 1e-4, 1, 1, 32, 1, 1, 5e8),
    "160m": (12, 768, 12, 6e-4, 6e-5, 1, 1, 32, 1, 1, 5e8),
    "410m": (24, 1024, 16, 3e-4, 3e-5, 1, 1, 32, 1, 1, 5e8),
    "1b": (16, 2048, 8, 2.5e-4, 2.5e-5, 1, 1, 16, 1, 1, 5e8),
    "1.4b": (24, 2048, 16, 2e-4, 2e-5, 1, 1, 16, 1, 1, 5e8),
    "2.8b": (32, 2560, 32, 1.6e-4, 1.6e-5, 1, 1, 16, 1, 1, 5e8),
    "6.9b": (32, 4096, 32, 1.2e-4, 1.2e-5, 1, 2, 8, 2, 1, 1.26e9),
    "12b": (36, 5120, 40, 1.2e-4, 1.2e-5, 1, 4, 8, 2, 1, 1.26e9),
}

# Keys a cell (or a documented correction) may change; every other published value must survive.
CHANGED = {"train_micro_batch_size_per_gpu", "gas", "gradient_accumulation_steps", "attention_config",
           "train_data_paths", "valid_data_paths", "test_data_paths", "vocab_file", "extra_save_iters",
           "deepspeed_slurm", "launcher", "log_interval", "fp16", "num_layers", "num_attention_heads"}


def all_published():
    return [(s, d) for s in PUBLISHED_SIZES for d in (False, True) if not (d and s in NO_DEDUPED)]


def norm(d: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in d.items()}


def neox_load(text: str) -> dict:
    """What GPT-NeoX v1.0's NeoXArgs.from_ymls does with one file: yaml.load(FullLoader), '-' → '_'."""
    raw = yaml.load(text, Loader=yaml.FullLoader)
    out = {}
    for k, v in raw.items():
        assert k not in out, f"duplicate key {k}"
        out[k.replace("-", "_")] = v
    assert len(out) == len(raw), "two keys are the same GPT-NeoX argument"
    return out


def v1_batch_check(a: dict) -> tuple[int, int, int, int]:
    """v1.0 calculate_derived: dp = global_num_gpus / max(pp,1) / max(mp,1); all three given → checked."""
    pp = max(a.get("pipe_parallel_size", 0), 1)
    mp = max(a.get("model_parallel_size", 1), 1)
    dp = a["global_num_gpus"] / pp / mp
    assert dp % 1 == 0
    tb, mb, ga = a["train_batch_size"], a["train_micro_batch_size_per_gpu"], a.get("gradient_accumulation_steps", 1)
    assert tb == mb * ga * dp, (tb, mb, ga, dp)
    return tb, mb, ga, int(dp)


# --- the published data -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,deduped", all_published())
def test_published_copies_match_the_reference_table(size, deduped):
    pub = published_config(size, deduped)
    assert pub.repo == "EleutherAI/pythia" and pub.commit == "a19eecb807ec2c79a39ebf18108816e6ffffc1d5"
    assert pub.name == f"pythia-{size}{'-deduped' if deduped else ''}"
    assert pub.path == f"models/{size.upper()}/{pub.name}.yml" and pub.size == size and pub.deduped == deduped
    a = pub.normalized()
    L, h, heads, lr, min_lr, pp, mp, micro, ga, stage, bucket = TABLE[size]
    layers = 40 if pub.name == "pythia-12b-deduped" else L  # the documented typo (heads 36 too)
    assert (a["num_layers"], a["hidden_size"]) == (layers, h)
    assert a["num_attention_heads"] == (36 if pub.name == "pythia-12b-deduped" else heads)
    assert a["optimizer"]["params"]["lr"] == lr and a["min_lr"] == min_lr
    assert (a["pipe_parallel_size"], a["model_parallel_size"], a["train_micro_batch_size_per_gpu"]) == (pp, mp, micro)
    assert a.get("gradient_accumulation_steps", 1) == ga
    assert a["zero_optimization"]["stage"] == stage and a["zero_optimization"]["reduce_bucket_size"] == bucket
    assert a["fp16"]["enabled"] is True and a["fp16"]["initial_scale_power"] == 12
    assert (a["train_iters"], a["lr_decay_iters"], a["warmup"], a["seq_length"]) == (143000, 143000, 0.01, 2048)
    assert ("init_method" in a) == (size not in ("6.9b", "12b"))
    assert ("_deduped" in a["train_data_paths"][0] or "pile_deduped" in a["train_data_paths"][0]) == (
        deduped or size in NO_DEDUPED)


def test_published_agrees_with_registry_and_recipes():
    from retrace.pythia.recipes import PYTHIA_RECIPES
    from retrace.pythia.sizes import PYTHIA_SIZES

    for size in PUBLISHED_SIZES:
        a = published_config(size).normalized()
        m, r = PYTHIA_SIZES[size], PYTHIA_RECIPES[size]
        assert (a["num_layers"], a["hidden_size"], a["num_attention_heads"]) == (m.n_layers, m.hidden, m.heads)
        assert a["optimizer"]["params"]["lr"] == r.lr and a["min_lr"] == r.min_lr
        assert a["train_micro_batch_size_per_gpu"] == r.micro_batch
        assert a.get("gradient_accumulation_steps", 1) == r.gas


def test_every_published_variant_is_in_the_table():
    names = {published_config(s, d).name for s, d in all_published()}
    assert len(names) == 18 and len(PUBLISHED_SIZES) == 10 and set(NO_DEDUPED) == {"14m", "31m"}
    for size in NO_DEDUPED:
        with pytest.raises(RetraceError, match="has no deduped run"):
            published_config(size, deduped=True)
    for size, deduped in all_published():  # keys unique as GPT-NeoX sees them, values fresh per call
        pub = published_config(size, deduped)
        assert len(pub.normalized()) == len(pub.values)
        pub.values["fp16"]["enabled"] = False
        assert published_config(size, deduped).values["fp16"]["enabled"] is True


@pytest.mark.parametrize("size,deduped", all_published())
def test_published_values_the_reference_states(size, deduped):
    a = published_config(size, deduped).normalized()
    assert a["optimizer"] == {"type": "Adam", "params": {"lr": TABLE[size][3], "betas": [0.9, 0.95], "eps": 1e-8}}
    assert isinstance(a["optimizer"]["params"]["eps"], float) and isinstance(a["min_lr"], float)
    assert a["fp16"] == {"fp16": True, "enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
                         "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}  # 1b too (§1)
    assert a["extra_save_iters"] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] and a["checkpoint_factor"] == 1000
    assert (a["lr_decay_style"], a["weight_decay"], a["gradient_clipping"]) == ("cosine", 0.1, 1.0)
    assert (a["hidden_dropout"], a["attention_dropout"], a["rotary_pct"], a["pos_emb"]) == (0, 0, 0.25, "rotary")
    assert a["gpt_j_residual"] is True and a["no_weight_tying"] is True and a["bias_gelu_fusion"] is True
    z = a["zero_optimization"]
    assert z["allgather_bucket_size"] == z["reduce_bucket_size"] and isinstance(z["reduce_bucket_size"], int)
    assert (z["allgather_partitions"], z["overlap_comm"], z["reduce_scatter"], z["contiguous_gradients"],
            z["cpu_offload"]) == (True, True, True, True, False)
    assert a["train_data_paths"] == a["valid_data_paths"] == a["test_data_paths"]
    assert a["tokenizer_type"] == "HFTokenizer" and a["vocab_file"].endswith("/20B_tokenizer.json")
    assert a["attention_config"] == [[["flash"], TABLE[size][0]]]  # the true depth, 12b-deduped included
    small = size in NO_DEDUPED  # §1: no activation checkpointing; no SLURM launcher keys
    assert a["checkpoint_activations"] is a["partition_activations"] is (not small)
    assert ("launcher" in a, a.get("deepspeed_slurm")) == ((False, None) if small else (True, True))


def test_published_inconsistencies_are_kept():
    """The table restates the configs as published; retrace.neox.config corrects these (test_corrections)."""
    d12 = published_config("12b", deduped=True).normalized()
    assert (d12["num_layers"], d12["num_attention_heads"]) == (40, 36)  # typo: the model has 36/40
    b1 = published_config("1b").normalized()
    assert b1["optimizer"]["params"]["lr"] == 0.00025 and "type" not in b1["fp16"]  # README: 3e-4, bf16
    for size in ("6.9b", "12b"):
        for deduped in (False, True):
            a = published_config(size, deduped).normalized()
            assert "init_method" not in a and "output_layer_init_method" not in a
    for size in NO_DEDUPED:
        assert published_config(size).normalized()["train_data_paths"] == [
            "/mnt/ssd-2/pile_deduped/pile_20B_tokenizer_text_document"]
    assert published_config("70m").normalized()["train_data_paths"] == ["/fsx/pile/pile_20B_tokenizer_text_document"]
    assert published_config("70m", True).normalized()["train_data_paths"] == [
        "/fsx/pile_deduped/pile_0.87_deduped_text_document"]
    # pythia-12b.yml is not valid YAML as published (missing comma): reported as a correction
    assert [c.key for c in published_config("12b").corrections] == ["attention_config"]
    assert not published_config("12b", deduped=True).corrections and not published_config("6.9b").corrections


def test_published_spelling_and_order():
    """The 6.9b/12b configs spell four keys with '_' and carry norm and gradient_accumulation_steps."""
    small = list(published_config("70m").values)
    large = list(published_config("12b").values)
    assert small[:3] == ["pipe-parallel-size", "model-parallel-size", "num-layers"] and small[-1] == "deepspeed_slurm"
    assert {"rotary-pct", "gpt-j-residual", "output-layer-parallelism", "tokenizer-type", "gas"} <= set(small)
    assert {"rotary_pct", "gpt_j_residual", "output_layer_parallelism", "tokenizer_type", "norm",
            "gradient_accumulation_steps"} <= set(large)
    assert "gas" not in large and "num_workers" not in large and "norm" not in small
    assert large.index("norm") == large.index("max-position-embeddings") + 1


# --- generated configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    kw = dict(CASES[name])
    cfg = neox_config(kw.pop("size"), **kw)
    fmt = "json" if kw.get("launcher") == "slurm" else "yaml"
    text = cfg.text(fmt)
    golden = GOLDEN / f"{name}.{'json' if fmt == 'json' else 'yml'}"
    if os.environ.get("RETRACE_REGEN_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8"), f"{golden} differs (RETRACE_REGEN_GOLDEN=1 to rewrite)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_published_values_survive(name):
    kw = dict(CASES[name])
    cfg = neox_config(kw.pop("size"), **kw)
    got = neox_load(cfg.text("yaml"))
    assert got == neox_load(cfg.text("json")) == cfg.normalized()
    pub = cfg.published.normalized()
    for key, value in pub.items():
        if key not in CHANGED:
            assert got[key] == value, key
    # the ones the brief names, explicitly, with their types as GPT-NeoX will see them
    opt = got["optimizer"]["params"]
    assert opt == pub["optimizer"]["params"] and isinstance(opt["eps"], float) and opt["eps"] == 1e-8
    assert opt["betas"] == [0.9, 0.95] and isinstance(got["min_lr"], float)
    assert (got["weight_decay"], got["warmup"], got["seq_length"], got["gradient_clipping"]) == (0.1, 0.01, 2048, 1.0)
    assert got["rotary_pct"] == 0.25 and got["zero_optimization"] == pub["zero_optimization"]
    assert (got["train_iters"], got["lr_decay_iters"], got["checkpoint_factor"]) == (143000, 143000, 1000)
    fp16 = got["fp16"]
    assert {k: fp16[k] for k in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                                 "min_loss_scale")} == {"loss_scale": 0, "initial_scale_power": 12,
                                                        "loss_scale_window": 1000, "hysteresis": 2,
                                                        "min_loss_scale": 1}
    size = cfg.published.size
    assert (got["init_method"], got["output_layer_init_method"]) == (
        ("normal", "scaled_normal") if size in ("6.9b", "12b") else ("small_init", "wang_init"))
    # the cell's values
    tb, mb, ga, dp = v1_batch_check(got)
    assert (tb, mb, ga, dp) == (1024, kw["pdbs"], kw["gas"], kw["gpus"])
    assert "gas" not in got  # v1.0 overwrites it from gradient_accumulation_steps
    assert got["attention_config"] == [[[kw.get("attention", "flash")], got["num_layers"]]]
    assert got["train_data_paths"] == got["valid_data_paths"] == got["test_data_paths"] == [DEDUP if kw.get(
        "deduped") else STANDARD]
    assert got["exit_interval"] == kw["steps"] and got["seed"] == 1234 and got["save"] == kw["save"]
    assert got.get("finetune") == (None if "load" not in kw else kw.get("start_step", 0) == 0)


def test_corrections():
    c12 = neox_config("pythia-12b-deduped", gpus=64, pdbs=8, gas=2, data=DEDUP, steps=10, save="/s")
    a = c12.normalized()
    assert (a["num_layers"], a["num_attention_heads"], a["attention_config"]) == (36, 40, [[["flash"], 36]])
    assert {c.key for c in c12.corrections} == {"num_layers", "num_attention_heads", "init_method",
                                                "output_layer_init_method"}
    assert "# retrace correction: published 40 is a typo" in c12.text()
    assert c12.world_size == 256 and c12.model_parallel == 4

    c1 = neox_config("1b", gpus=64, pdbs=16, gas=1, data=STANDARD, steps=10, save="/s")
    assert c1.normalized()["fp16"]["type"] == "bfloat16" and c1.normalized()["fp16"]["enabled"] is True
    assert [c.key for c in c1.corrections] == ["fp16"]
    assert c1.normalized()["optimizer"]["params"]["lr"] == 0.00025 and any("3.0e-4" in n for n in c1.notes)
    c1_fp16 = neox_config("1b", gpus=64, pdbs=16, gas=1, data=STANDARD, steps=10, save="/s", precision="fp16")
    assert "type" not in c1_fp16.normalized()["fp16"] and not c1_fp16.corrections
    assert any("bf16" in n for n in c1_fp16.notes)
    c70 = neox_config("70m", gpus=32, pdbs=32, gas=1, data=STANDARD, steps=10, save="/s", precision="fp32")
    assert c70.normalized()["fp16"]["enabled"] is False and not c70.corrections

    c14 = neox_config("14m", gpus=32, pdbs=32, gas=1, data=STANDARD, steps=10, save="/s")
    keys = [c.key for c in c14.corrections]
    assert keys == ["train_data_paths", "valid_data_paths", "test_data_paths"]
    assert c14.corrections[0].published == ["/mnt/ssd-2/pile_deduped/pile_20B_tokenizer_text_document"]
    assert c14.corrections[0].value == [STANDARD] and "standard file name" in c14.text()
    a14 = c14.normalized()
    assert a14["pipe_parallel_size"] == 0 and a14["zero_optimization"]["stage"] == 0
    assert "deepspeed_slurm" not in a14  # not published for 14m: nothing to switch off

    c69 = neox_config("6.9b", gpus=64, pdbs=8, gas=2, data=STANDARD, steps=10, save="/s")
    assert [c.key for c in c69.corrections] == ["init_method", "output_layer_init_method"]
    assert c69.world_size == 128 and v1_batch_check(c69.normalized())[3] == 64


def test_published_layout_is_untouched():
    cfg = neox_config("410m", gpus=32, pdbs=32, gas=1, data=STANDARD, steps=143000, save="/s")
    keys = {o.key for o in cfg.overrides}
    assert "train_micro_batch_size_per_gpu" not in keys and "attention_config" not in keys
    assert "train_micro_batch_size_per_gpu: 32\n" in cfg.text()  # no comment: the published value
    more = neox_config("410m", gpus=32, pdbs=32, gas=1, data=STANDARD, steps=10, save="/s",
                       extra={"keep-last-n-checkpoints": 3, "eval-interval": 5})
    assert (more.normalized()["keep_last_n_checkpoints"], more.normalized()["eval_interval"]) == (3, 5)
    assert {o.key: o.published for o in more.overrides if o.reason == "set by the study"} == {
        "keep_last_n_checkpoints": None, "eval_interval": 40000}


@pytest.mark.parametrize("kw,match", [
    (dict(gpus=8, pdbs=4, gas=16), r"8 × pdbs 4 × gas 16 = 512 .* global batch is 1024"),
    (dict(gpus=0, pdbs=4, gas=16), r"gpus must be an integer ≥ 1"),
    (dict(steps=0), r"steps must be an integer ≥ 1"),
    (dict(start_step=5, steps=5, load="/l"), r"steps \(5\) must be after the start step \(5\)"),
    (dict(steps=143001), r"beyond the published run's 143000"),
    (dict(start_step=1000, steps=2000), r"start step 1000 needs load"),
    (dict(attention="sparse"), r"attention must be one of flash, global"),
    (dict(precision="fp8"), r"precision must be one of"),
    (dict(launcher="mpi"), r"launcher must be one of"),
    (dict(data_kind="preshuffled"), r"raw tokenized corpus"),
    (dict(size="14m", deduped=True), r"pythia-14m has no deduped run"),
    (dict(size="3b"), r"unknown Pythia size"),
])
def test_impossible_cells_are_one_clear_error(kw, match):
    args = dict(size="70m", gpus=8, pdbs=4, gas=32, data=DEDUP, steps=1000, save="/s")
    args.update(kw)
    with pytest.raises(RetraceError, match=match):
        neox_config(args.pop("size"), **args)


@pytest.mark.parametrize("start,steps", [(0, 1), (0, 3), (0, 512), (0, 1000), (0, 4096), (0, 143000),
                                         (1000, 3000), (3, 700), (142000, 143000)])
def test_save_schedule_and_stop_give_the_canonical_steps(start, steps):
    cfg = neox_config("70m", gpus=32, pdbs=32, gas=1, data=STANDARD, steps=steps, start_step=start,
                      save="/s", load="/l" if start else None)
    a = cfg.normalized()
    # v1.0 calculate_derived: save_iters = extra_save_iters ∪ {k·factor < train_iters}
    save_iters = set(a["extra_save_iters"]) | set(range(a["checkpoint_factor"], a["train_iters"], a["checkpoint_factor"]))
    # v1.0 pretrain/train: step 0 saved if 0 in save_iters and iteration == 0; then each iteration is saved
    # if in save_iters, and the run exits at the first iteration divisible by exit_interval.
    it = 0 if a.get("finetune", True) else start
    saved = [0] if it == 0 and 0 in save_iters else []
    while True:
        it += 1
        if it in save_iters:
            saved.append(it)
        if it % a["exit_interval"] == 0:
            break
    assert it == steps
    assert sorted(set(saved) | {start}) == cfg.save_steps


def test_write_is_atomic_and_json_for_slurm(tmp_path):
    kw = dict(CASES["pythia-1b_g64p16a1_from1000"])
    cfg = neox_config(kw.pop("size"), **kw)
    p = write_neox_config(cfg, tmp_path / "c.json")
    assert norm(json.loads(p.read_text())) == neox_load(p.read_text()) == cfg.normalized()
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]
    a = cfg.normalized()
    assert (a["launcher"], a["deepspeed_slurm"], a["finetune"]) == ("slurm", True, False)


# --- launching ------------------------------------------------------------------------------------------
def _cfg(**kw):
    args = dict(size="70m", deduped=True, gpus=8, pdbs=4, gas=32, data=DEDUP, steps=1000, save="/runs/c/save",
                load="/runs/c/load", vocab_file="/tok/20B_tokenizer.json")
    args.update(kw)
    return neox_config(args.pop("size"), **args)


def test_launch_plan_local_container_conda_docker():
    cfg = _cfg()
    env = NeoXEnv.from_config({"path": "/opt/gpt-neox", "container": "/img/neox.sif"})
    plan = launch_plan(cfg, "/runs/c/neox/config.yml", env, workdir="/runs/c/neox", gpus_per_node=8)
    assert plan.cwd == "/opt/gpt-neox"
    assert plan.argv[:5] == ["apptainer", "exec", "--nv", "--pwd", "/opt/gpt-neox"]
    assert plan.argv[-5:] == ["/img/neox.sif", "python", "./deepy.py", "train.py", "/runs/c/neox/config.yml"]
    binds = [plan.argv[i + 1] for i, a in enumerate(plan.argv) if a == "--bind"]
    assert binds == ["/opt/gpt-neox", "/runs/c/neox", "/runs/c/save", "/runs/c/load", "/data/pile_deduped", "/tok"]
    assert plan.env == {"DLTS_HOSTFILE": "/runs/c/neox/hostfile", "MASTER_ADDR": "127.0.0.1"}
    assert plan.files == {"/runs/c/neox/hostfile": "localhost slots=8\n"}
    assert "python ./deepy.py train.py /runs/c/neox/config.yml" in plan.shell()

    conda = launch_plan(cfg, "c.yml", NeoXEnv("/n", conda_env="neox"), workdir="/w")
    assert conda.argv == ["conda", "run", "--no-capture-output", "-n", "neox", "python", "./deepy.py", "train.py",
                          "c.yml"]
    plain = launch_plan(cfg, "c.yml", NeoXEnv("/n", python="/venv/bin/python"), workdir="/w")
    assert plain.argv == ["/venv/bin/python", "./deepy.py", "train.py", "c.yml"]
    docker = launch_plan(cfg, "c.yml", NeoXEnv("/n", container="neox:v1.0", runtime="docker"), workdir="/w")
    assert docker.argv[:3] == ["docker", "run", "--rm"] and "-e" in docker.argv and "MASTER_ADDR=127.0.0.1" in docker.argv
    with pytest.raises(RetraceError, match="do not fit one node of 4"):
        launch_plan(cfg, "c.yml", env, workdir="/w", gpus_per_node=4)


def test_launch_plan_slurm():
    cfg = neox_config("12b", gpus=64, pdbs=8, gas=2, data=STANDARD, steps=1000, save="/s", launcher="slurm")
    plan = launch_plan(cfg, "/w/config.json", NeoXEnv("/n", conda_env="neox"), workdir="/w", gpus_per_node=8)
    assert plan.argv[:2] == ["bash", "-c"]
    script = plan.argv[2]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 32 | sed "s/$/ slots=8/" > /w/hostfile' in script
    assert script.endswith("exec conda run --no-capture-output -n neox python ./deepy.py train.py /w/config.json")
    assert not plan.files and plan.env == {"DLTS_HOSTFILE": "/w/hostfile"}
    with pytest.raises(RetraceError, match="not whole nodes of 6"):
        launch_plan(cfg, "c", NeoXEnv("/n"), workdir="/w", gpus_per_node=6)
    with pytest.raises(RetraceError, match="needs gpus_per_node"):
        launch_plan(cfg, "c", NeoXEnv("/n"), workdir="/w")


def test_neox_env_from_config_names_bad_keys():
    with pytest.raises(RetraceError, match=r"neox: unknown key\(s\) contianer"):
        NeoXEnv.from_config({"path": "/n", "contianer": "x.sif"})
    with pytest.raises(RetraceError, match=r"neox.path"):
        NeoXEnv.from_config({"container": "x.sif"})
    with pytest.raises(RetraceError, match="not both"):
        NeoXEnv.from_config({"path": "/n", "container": "x", "conda_env": "e"})


# --- tiny NeoX checkpoints --------------------------------------------------------------------------------
L, H, V, MP = 2, 16, 32, 2


def shards(seed: int, dtype=torch.float16) -> dict[int, list[dict[str, torch.Tensor]]]:
    """A tensor-parallel (mp 2) GPT-NeoX pipeline checkpoint's layer files (multiples of 1/64: exact sums)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randint(-64, 65, shape, generator=g).float() / 64).to(dtype)

    out = {0: [{"word_embeddings.weight": r(V // MP, H)} for _ in range(MP)]}
    for i in range(L):
        out[i + 2] = [{
            "input_layernorm.weight": r(H), "input_layernorm.bias": r(H),
            "attention.query_key_value.weight": r(3 * H // MP, H), "attention.query_key_value.bias": r(3 * H // MP),
            "attention.rotary_emb.inv_freq": torch.ones(2, dtype=dtype),
            "attention.dense.weight": r(H, H // MP), "attention.dense.bias": r(H),
            "post_attention_layernorm.weight": r(H), "post_attention_layernorm.bias": r(H),
            "mlp.dense_h_to_4h.weight": r(4 * H // MP, H), "mlp.dense_h_to_4h.bias": r(4 * H // MP),
            "mlp.dense_4h_to_h.weight": r(H, 4 * H // MP), "mlp.dense_4h_to_h.bias": r(H),
        } for _ in range(MP)]
    out[L + 3] = [{"norm.weight": r(H), "norm.bias": r(H)} for _ in range(MP)]
    out[L + 4] = [{"final_linear.weight": r(V // MP, H)} for _ in range(MP)]
    return out


def write_step(root: Path, step: int, sh, *, zero: bool = False, latest: bool = True) -> Path:
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    for idx, ranks in sh.items():
        for rank, st in enumerate(ranks):
            torch.save(st, d / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
    for rank in range(MP):
        torch.save({"module": None, "iteration": step, "global_steps": step, "skipped_steps": 0},
                   d / f"mp_rank_{rank:02d}_model_states.pt")
        if zero:
            torch.save({"optimizer_state_dict": {}}, d / f"zero_pp_rank_0_mp_rank_{rank:02d}_optim_states.pt")
    if latest:
        (root / "latest").write_text(f"global_step{step}")
    return d


def test_prepare_load(tmp_path):
    load = tmp_path / "ckpt"
    write_step(load, 0, shards(0))
    write_step(load, 1000, shards(1), zero=True)  # latest now names global_step1000
    view = prepare_load(load, 0, tmp_path / "view")
    assert view == tmp_path / "view" and (view / "latest").read_text() == "global_step0\n"
    assert (view / "global_step0").resolve() == (load / "global_step0").resolve()
    assert prepare_load(load, 0, tmp_path / "view") == view  # idempotent
    assert prepare_load(load, 1000, tmp_path / "v2") == load  # latest already names it
    assert prepare_load(load / "global_step1000", 1000, tmp_path / "v3") == tmp_path / "v3"
    with pytest.raises(RetraceError, match=r"no GPT-NeoX checkpoint global_step5 \(found: 0, 1000\)"):
        prepare_load(load, 5, tmp_path / "v4")
    write_step(tmp_path / "nozero", 2000, shards(2))
    with pytest.raises(RetraceError, match="no zero_pp_rank_.*needs the optimizer"):
        prepare_load(tmp_path / "nozero", 2000, tmp_path / "v5")
    bad = write_step(tmp_path / "bad", 3000, shards(3), zero=True)
    for rank in range(MP):
        torch.save({"module": None, "iteration": 17}, bad / f"mp_rank_{rank:02d}_model_states.pt")
    with pytest.raises(RetraceError, match="iteration 17, not the start step 3000"):
        prepare_load(tmp_path / "bad", 3000, tmp_path / "v6")


def test_conversion_gives_the_tensors_read_directly(tmp_path):
    from safetensors import safe_open

    from retrace.checkpoints import NeoXReader
    from retrace.neox.convert import convert_run

    save, load = tmp_path / "save", tmp_path / "load"
    write_step(load, 4, shards(40, torch.bfloat16), zero=True)  # the start comes from the load dir
    for s in (5, 6, 8):
        write_step(save, s, shards(s, torch.bfloat16))
    manifest = convert_run(save, tmp_path / "out", start_step=4, steps=8, load_dir=load, reference="org/x")
    m = json.loads(manifest.read_text())
    assert m["steps"] == [4, 8] and [f["step"] for f in m["files"]] == [4, 8]  # the Pythia schedule in [4, 8]
    assert {k for k in m} >= {"steps", "files", "final_step", "start_step", "reference", "dtype", "final_loss",
                              "written"}  # what retrace train writes
    assert (m["final_step"], m["start_step"], m["dtype"], m["producer"]) == (8, 4, "float16", "gpt-neox")
    from retrace.io import sha256_file

    for f, src in ((m["files"][0], load / "global_step4"), (m["files"][1], save / "global_step8")):
        path = manifest.parent / f["file"]
        assert sha256_file(path) == f["sha256"]
        with NeoXReader(src) as ref, safe_open(str(path), "pt") as got:
            assert sorted(got.keys()) == sorted(ref.names())
            assert len(ref.names()) == 4 + 12 * L
            for name in ref.names():
                t = got.get_tensor(name)
                assert t.dtype == torch.float16 and torch.equal(t, ref.get(name).half()), name
    with pytest.raises(RetraceError, match=r"no GPT-NeoX checkpoint for step\(s\) 7 \(found: 5, 6, 8"):
        convert_run(save, tmp_path / "o2", start_step=4, steps=8, save_steps=[4, 7, 8], load_dir=load)


def test_step1_equals_step0_check(tmp_path, capsys):
    from retrace.neox.convert import convert_run

    for name, one in (("good", shards(0)), ("bad", shards(9))):
        save = tmp_path / name / "save"
        write_step(save, 0, shards(0))
        write_step(save, 1, one)
        m = json.loads(convert_run(save, tmp_path / name / "out", start_step=0, steps=1).read_text())
        assert m["checks"] == {"step1_equals_step0": name == "good"}
    assert "step 1 differs from step 0" in capsys.readouterr().err


def _line(it, lr, loss, scale=4096.0, skipped=0):
    return (f" samples/sec: 10.240 | iteration {it:8d}/  143000 | elapsed time per iteration (ms): 200.0 | "
            f"learning rate: {lr:.3E} | approx flops per GPU: 1.2TFLOPS | lm_loss: {loss:.6E} | "
            f"loss scale: {scale:.1f} | number of skipped iterations: {skipped:3d} | number of nan iterations:   0 |")


def test_parse_log_shifts_lr_and_scale_to_the_update_they_drive(tmp_path):
    from retrace.neox.convert import LOG_COLUMNS, parse_neox_log, write_train_log

    text = "\n".join(["noise", _line(1, 7e-7, 10.5), _line(2, 1.4e-6, 10.25, skipped=1, scale=2048.0),
                      _line(3, 1.4e-6, 10.0, scale=2048.0), "[2023] other | iteration 4/ 5 |"])
    rows = parse_neox_log(text, start_step=0)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == [0.0, 7e-7, 1.4e-6]  # update 1 has LR 0 in v1.0
    assert [r["loss_scale"] for r in rows] == [4096.0, 4096.0, 2048.0]
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[0]["loss"] == 10.5 and rows[1]["loss"] != rows[1]["loss"]  # NaN for a skipped step
    assert [r["lr_iter"] for r in rows] == [1, 1, 2] and rows[0]["tokens_per_s"] == pytest.approx(10.24 * 2048)
    assert rows[0]["step_time_s"] == pytest.approx(0.2)
    resumed = parse_neox_log(_line(1001, 1e-3, 3.0) + "\n" + _line(1002, 1e-3, 2.9), start_step=1000)
    assert resumed[0]["lr"] != resumed[0]["lr"] and resumed[1]["lr"] == 1e-3 and resumed[1]["lr_iter"] == -1
    import pandas as pd

    frame = pd.read_parquet(write_train_log(rows, tmp_path / "train_log.parquet"))
    assert tuple(frame.columns) == LOG_COLUMNS and str(frame["skipped"].dtype) == "bool"


# --- run_cell end to end, against a stand-in for deepy.py ---------------------------------------------------
FAKE_DEEPY = textwrap.dedent('''
    """Test double for `python ./deepy.py train.py CONFIG` (not GPT-NeoX): v1.0's config reading, batch
    check, load/finetune, save schedule and exit_interval, on a tiny NeoX-format checkpoint."""
    import os, sys, yaml, torch
    assert sys.argv[1] == "train.py" and os.path.isfile(os.environ["DLTS_HOSTFILE"]), sys.argv
    a = {k.replace("-", "_"): v for k, v in yaml.load(open(sys.argv[2]), Loader=yaml.FullLoader).items()}
    dp = a["global_num_gpus"] // max(a["pipe_parallel_size"], 1) // a["model_parallel_size"]
    assert a["train_batch_size"] == a["train_micro_batch_size_per_gpu"] * a["gradient_accumulation_steps"] * dp
    tag = open(os.path.join(a["load"], "latest")).read().strip()
    src = os.path.join(a["load"], tag)
    files = {f: torch.load(os.path.join(src, f)) for f in os.listdir(src) if f.startswith("layer_")}
    it = 0 if a["finetune"] else int(tag[len("global_step"):])
    save_iters = set(a["extra_save_iters"]) | set(range(a["checkpoint_factor"], a["train_iters"], a["checkpoint_factor"]))
    def save(i):
        d = os.path.join(a["save"], f"global_step{i}")
        os.makedirs(d)
        for f, st in files.items():
            torch.save(st, os.path.join(d, f))
        torch.save({"module": None, "iteration": i}, os.path.join(d, "mp_rank_00_model_states.pt"))
        open(os.path.join(a["save"], "latest"), "w").write(f"global_step{i}")
    if it == 0 and 0 in save_iters:
        save(0)
    while it < a["train_iters"]:
        it += 1
        if it > 1:  # the first update has LR 0
            files = {f: {k: v + 0.5 for k, v in st.items()} for f, st in files.items()}
        print(f" samples/sec: 5.000 | iteration {it:8d}/{a['train_iters']:8d} | elapsed time per iteration (ms): 50.0 |"
              f" learning rate: {1e-4 * it:.3E} | approx flops per GPU: 1.0TFLOPS | lm_loss: {10.0 / it:.6E} |"
              f" loss scale: 4096.0 | number of skipped iterations:   0 | number of nan iterations:   0 |", flush=True)
        if it in save_iters:
            save(it)
        if a["exit_interval"] and it % a["exit_interval"] == 0:
            sys.exit()
''')


def test_run_cell_end_to_end_with_a_stand_in(tmp_path):
    import pandas as pd
    from safetensors import safe_open

    from retrace.checkpoints import NeoXReader

    neox_dir = tmp_path / "gpt-neox"
    neox_dir.mkdir()
    (neox_dir / "deepy.py").write_text(FAKE_DEEPY)
    load = tmp_path / "published"
    write_step(load, 0, shards(3))
    env = NeoXEnv(str(neox_dir), python=sys.executable)
    out = tmp_path / "run"
    kw = dict(size="70m", deduped=True, gpus=8, pdbs=4, gas=32, data=DEDUP, steps=4, out=out, neox=env,
              load=str(load), reference="EleutherAI/pythia-70m-deduped")
    dry = run_cell(dry_run=True, **kw)
    assert dry["plan"]["argv"] == [sys.executable, "./deepy.py", "train.py", str(out.resolve() / "neox" / "config.yml")]
    assert not (out / "checkpoints").exists() and (out / "neox" / "plan.json").is_file()
    assert (out / "neox" / "hostfile").read_text() == "localhost slots=8\n"

    summary = run_cell(**kw)
    m = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert m["steps"] == [0, 1, 2, 4] and m["checks"] == {"step1_equals_step0": True}
    assert m["final_loss"] == pytest.approx(2.5) and m["reference"] == "EleutherAI/pythia-70m-deduped"
    with NeoXReader(load / "global_step0") as ref, safe_open(str(out / "checkpoints" / "step4.safetensors"), "pt") as f:
        name = "gpt_neox.layers.0.attention.query_key_value.weight"
        assert torch.equal(f.get_tensor(name), ref.get(name) + 1.5)  # updates 2, 3 and 4 add 0.5 each
    log = pd.read_parquet(out / "train_log.parquet")
    assert log["step"].tolist() == [1, 2, 3, 4] and log["lr"].tolist()[:2] == [0.0, 1e-4]
    assert json.loads((out / "run.json").read_text())["engine"] == "neox" and summary["log_rows"] == 4
    assert "iteration        4/  143000" in (out / "logs" / "neox.log").read_text()


def test_cli_writes_config_and_prints_corrections(tmp_path, capsys):
    from retrace.cli import main

    out = tmp_path / "c.yml"
    rc = main(["neox-config", "--size", "12b", "--deduped", "--gpus", "64", "--pdbs", "8", "--gas", "2",
               "--data", DEDUP, "--steps", "143000", "--save", "/runs/c12/neox/save", "--load", "/runs/c12/neox/load",
               "--out", str(out)])
    assert rc == 0
    assert out.read_text() == GOLDEN.joinpath("pythia-12b-deduped_g64p8a2.yml").read_text()
    printed = capsys.readouterr().out
    assert "4 correction(s)" in printed and "num_layers: 40 -> 36" in printed
    rc = main(["neox-config", "--size", "70m", "--gpus", "8", "--pdbs", "4", "--gas", "16", "--data", DEDUP,
               "--steps", "10", "--save", "/s"])
    assert rc == 2 and "global batch is 1024" in capsys.readouterr().err
    load = tmp_path / "load"
    write_step(load, 0, shards(0))
    write_step(load, 1000, shards(1))
    rc = main(["neox-config", "--size", "70m", "--gpus", "32", "--pdbs", "32", "--gas", "1", "--data", DEDUP,
               "--steps", "10", "--save", "/s", "--load", str(load)])
    assert rc == 2 and "not global_step0" in capsys.readouterr().err
