"""Segments from published optimizer states, end to end on a tiny model.

A local run is published in the layout of the NeoX-native repos (``retrace reference publish --format
neox``: every schedule step a GPT-NeoX training checkpoint with DeeperSpeed ZeRO-1 files, partitioned over
2 ranks in several comm intervals). A cell that starts from a middle published step with that state, on
the run's own data order, must land on the next published step bit for bit; on another order it must not.
The published run is trained by retrace itself, so this checks the state's round trip through the NeoX
layout and the data position, not the arithmetic against GPT-NeoX (which the parity tests do).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from retrace.train import TrainConfig, train
from test_train_helpers import SEQ, B, load_ckpt

pytestmark = pytest.mark.slow  # one 16-step published run (~12 s), then segments of 8 steps

REPO = "local/neox-ckpt-tiny"
START, END = 8, 16
COMMON = dict(recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, pdbs=4, gas=2,
              precision="fp16", threads=1, progress=False, data_kind="raw")


@pytest.fixture(scope="module")
def published(world, tmp_path_factory):
    """The "published" run (raw data, order seed 1234, every state kept) in a hub cache, NeoX format."""
    from retrace.cli import main

    root = tmp_path_factory.mktemp("neox-pub")
    run = root / "run"
    train(TrainConfig(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(run), steps=END,
                      order_seed=1234, keep_states=100, **COMMON))
    cache = root / "hub"
    assert main(["reference", "publish", "--run", str(run), "--config", str(world / "ref" / "config.json"),
                 "--hub-cache", str(cache), "--repo", REPO, "--format", "neox", "--dp", "2",
                 "--max-elements-per-comm", "3000"]) == 0
    return {"run": run, "cache": cache}


def _snapshot(cache: Path, step: int) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    return folder / "snapshots" / (folder / "refs" / f"step{step}").read_text().strip()


def test_published_steps_hold_zero1_state_in_the_neox_layout(published):
    from retrace.checkpoints.neox import load_client_state, zero_optimizer_files
    from retrace.train import state as st
    from retrace.train.neox_state import open_optimizer_state

    snap = _snapshot(published["cache"], START)
    assert (snap / "latest").read_text() == f"global_step{START}"
    d = snap / f"global_step{START}"
    assert sorted(zero_optimizer_files(d)) == [(0, 0), (1, 0)]
    assert load_client_state(d, 0)["lr_scheduler"]["num_iters"] == START
    raw = torch.load(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert raw["optimizer_state_dict"]["num_comm_intervals_per_group"][0] > 1  # spans several intervals
    assert type(raw["optimizer_state_dict"]["loss_scaler"]).__module__ == "deepspeed.runtime.fp16.loss_scaler"
    # reads back to the run's own state, tensor for tensor
    opt = open_optimizer_state(str(snap))
    meta, tensors = st.read_state(st.state_dir(published["run"] / "state", START))
    for gi, g in enumerate(meta["engine"]["groups"]):
        for key, got in (("master", opt.master), ("exp_avg", opt.exp_avg), ("exp_avg_sq", opt.exp_avg_sq)):
            assert torch.equal(torch.cat([got[n].reshape(-1) for n in g["names"]]), tensors[f"group{gi}.{key}"])
    assert opt.step == START and opt.loss_scaler["scale"] == meta["engine"]["loss_scaler"]["scale"]
    # step 0 has no kept state: weights only, no optimizer files
    assert zero_optimizer_files(_snapshot(published["cache"], 0) / "global_step0") == {}


@pytest.fixture(scope="module")
def staged(published, tmp_path_factory):
    """Step START staged as the workflow's fetch_training_state rule does (`retrace fetch-state`, offline)."""
    from retrace.cli import main

    out = tmp_path_factory.mktemp("staged") / f"step{START}"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(published["cache"]))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert main(["fetch-state", "--source", f"{REPO}@step{START}", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_fetch_state_stages_a_verified_save_directory(staged, published):
    from retrace.checkpoints.training_state import read_source_record

    assert (staged / "latest").read_text() == f"global_step{START}"
    names = sorted(p.name for p in (staged / f"global_step{START}").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in names and "mp_rank_00_model_states.pt" in names
    rec = read_source_record(staged)
    assert rec["verified"] is True and rec["verified_against"] == "cache"
    assert not staged.with_name(staged.name + ".partial").exists()


def test_fetch_state_refuses_a_step_without_optimizer_state(published, tmp_path, monkeypatch):
    from retrace.checkpoints.training_state import stage_training_state
    from retrace.errors import RetraceError

    monkeypatch.setenv("HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RetraceError, match="holds no zero_pp_rank"):
        stage_training_state(f"{REPO}@step0", tmp_path / "s0")
    assert not (tmp_path / "s0").exists()


def _segment(world, source: str, out: Path, order_seed: int) -> dict[str, torch.Tensor]:
    return _segment_common(world, source, out, order_seed, COMMON)


def _segment_common(world, source: str, out: Path, order_seed: int, common: dict) -> dict[str, torch.Tensor]:
    res = train(TrainConfig(reference=source, start_step=START, data=str(world / "data" / "tiny"),
                            out=str(out), steps=END, order_seed=order_seed, **common))
    assert res.saved_steps == [START, END]
    run = json.loads((out / "run.json").read_text())
    assert run["optimizer_state_from"]["adam_steps"] == START  # the ZeRO state was read, not a fresh Adam
    return load_ckpt(out / "checkpoints" / f"step{END}.safetensors")


def test_segment_on_the_right_order_lands_on_the_next_published_step_bit_for_bit(world, published, staged,
                                                                                 tmp_path):
    want = load_ckpt(published["run"] / "checkpoints" / f"step{END}.safetensors")
    got = _segment(world, str(staged), tmp_path / "right", 1234)
    assert all(torch.equal(want[k], got[k]) for k in want)

    wrong = _segment(world, str(staged), tmp_path / "wrong", 7)
    differ = [k for k in want if not torch.equal(want[k], wrong[k])]
    assert len(differ) == len(want), f"only {len(differ)} of {len(want)} tensors moved on another order"


def test_a_hub_spec_start_reads_the_state_too(world, published, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want = load_ckpt(published["run"] / "checkpoints" / f"step{END}.safetensors")
    got = _segment(world, f"{REPO}@step{START}", tmp_path / "hub", 1234)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_segment_without_the_optimizer_state_does_not_land(world, published, tmp_path):
    """Control: the same weights as a Hugging Face checkpoint (Adam from zero) miss the next step."""
    from retrace.checkpoints import save_params

    hf = tmp_path / "hf8"
    hf.mkdir()
    (hf / "config.json").write_bytes((world / "ref" / "config.json").read_bytes())
    save_params(load_ckpt(published["run"] / "checkpoints" / f"step{START}.safetensors"), hf / "model.safetensors")
    train(TrainConfig(reference=str(hf), start_step=START, data=str(world / "data" / "tiny"),
                      out=str(tmp_path / "fresh"), steps=END, order_seed=1234, **COMMON))
    want = load_ckpt(published["run"] / "checkpoints" / f"step{END}.safetensors")
    got = load_ckpt(tmp_path / "fresh" / "checkpoints" / f"step{END}.safetensors")
    assert not all(torch.equal(want[k], got[k]) for k in want)


def test_a_run_sharded_over_two_ranks_publishes_and_continues_exactly(world, tmp_path):
    """Builtin ZeRO-1 over 2 real ranks writes one state shard per rank; the NeoX export puts them back
    together, and a 2-rank segment from published step 2 lands on step 4 (few steps: two 2-rank runs)."""
    import subprocess

    from retrace.cli import main
    from test_train_helpers import argv

    run = tmp_path / "run2"
    cmd = argv(world, "run2", 4, gpus=2, pdbs=2, gas=2)
    cmd[cmd.index("--out") + 1] = str(run)
    r = subprocess.run([*cmd, "--keep-states", "100"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (run / "state" / "step2").glob("rank*.safetensors")) == [
        "rank0.safetensors", "rank1.safetensors"]
    cache = tmp_path / "hub"
    assert main(["reference", "publish", "--run", str(run), "--config", str(world / "ref" / "config.json"),
                 "--hub-cache", str(cache), "--repo", REPO, "--format", "neox", "--dp", "2",
                 "--max-elements-per-comm", "3000"]) == 0
    cmd = argv(world, "seg2", 4, gpus=2, pdbs=2, gas=2)
    cmd[cmd.index("--reference") + 1] = f"{REPO}@step2"
    cmd[cmd.index("--out") + 1] = str(tmp_path / "seg2")
    seg = subprocess.run([*cmd, "--start-step", "2"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert seg.returncode == 0, seg.stderr[-2000:]
    want = load_ckpt(run / "checkpoints" / "step4.safetensors")
    got = load_ckpt(tmp_path / "seg2" / "checkpoints" / "step4.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_stage0_run_publishes_fp16_optimizer_state_and_continues_exactly(world, tmp_path):
    """The 14m/31m recipe (ZeRO stage 0): no ZeRO files; FP16_Optimizer's state inside
    mp_rank_00_model_states.pt (pp = 0, sequential module), staged and resumed bit for bit."""
    from retrace.checkpoints.neox import load_client_state, zero_optimizer_files
    from retrace.checkpoints.training_state import stage_training_state
    from retrace.cli import main

    common = {**COMMON, "recipe": "14m"}
    run = tmp_path / "run0"
    train(TrainConfig(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(run), steps=END,
                      order_seed=1234, keep_states=100, **common))
    cache = tmp_path / "hub"
    assert main(["reference", "publish", "--run", str(run), "--config", str(world / "ref" / "config.json"),
                 "--hub-cache", str(cache), "--repo", REPO, "--format", "neox"]) == 0
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    snap = folder / "snapshots" / (folder / "refs" / f"step{START}").read_text().strip()
    d = snap / f"global_step{START}"
    assert zero_optimizer_files(d) == {} and not list(d.glob("layer_*"))
    opt = load_client_state(d, 0)["optimizer"]
    assert opt["optimizer_state_dict"]["param_groups"][0]["step"] == START + 1  # apex counts the init step
    staged = stage_training_state(str(snap), tmp_path / "staged")
    got = _segment_common(world, str(staged), tmp_path / "seg0", 1234, common)
    want = load_ckpt(run / "checkpoints" / f"step{END}.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
