"""Data-parallel layouts of one global batch: same samples each step, nearly the same weights.

Runs real 2-process gloo training (the trainer starts its own local ranks), plus the CLI's input checks.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch

from retrace.cli import main
from retrace.train import TrainConfig, train
from test_train_helpers import load_ckpt

B, SEQ, STEPS = 8, 32, 12


def cell(root: Path, out: str, gpus: int, pdbs: int, gas: int, **over) -> TrainConfig:
    kw = dict(reference=str(root / "ref"), data=str(root / "data" / "tiny"), out=str(root / out), steps=STEPS,
              recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, gpus=gpus, pdbs=pdbs,
              gas=gas, precision="fp32", threads=1, progress=False, extra={"trace_items": True})
    kw.update(over)
    return TrainConfig(**kw)


def read_items(out: Path) -> dict[tuple[int, int, int], list[int]]:
    items = {}
    for f in out.glob("items.rank*.jsonl"):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            items[d["step"], d["micro"], d["rank"]] = d["ids"]
    return items


def masters(out: Path, step: int) -> torch.Tensor:
    """The whole fp32 master at ``step``: the replicated state, or the ranks' ZeRO-1 shards put together
    (each group padded to dp equal shards, rank order; retrace.train.zero1)."""
    from safetensors.torch import load_file

    d = out / "state" / f"step{step}"
    files = sorted(d.glob("rank*.safetensors"), key=lambda p: int(p.stem[4:])) or [d / "tensors.safetensors"]
    shards = [load_file(str(f)) for f in files]
    groups = json.loads((d / "state.json").read_text())["engine"]["groups"]
    return torch.cat([torch.cat([t[f"group{i}.master"] for t in shards])[: g["numel"]]
                      for i, g in enumerate(groups)]).double()


def test_three_layouts_same_samples_close_weights(world):
    layouts = {"2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2), "1x2x4": (1, 2, 4)}
    results = {name: train(cell(world, name, *lay)) for name, lay in layouts.items()}
    for name, (gpus, pdbs, gas) in layouts.items():
        assert results[name].final_step == STEPS
        items = read_items(world / name)
        assert len(items) == STEPS * gas * gpus
        for s in range(STEPS):
            seen = []
            for k in range(gas):
                for r in range(gpus):
                    ids = items[s, k, r]
                    # GPT-NeoX: B·s + k·pdbs·gpus + r·pdbs + [0, pdbs)
                    assert ids == list(range(B * s + k * pdbs * gpus + r * pdbs, B * s + k * pdbs * gpus + (r + 1) * pdbs))
                    seen += ids
            assert sorted(seen) == list(range(B * s, B * (s + 1)))  # the same global batch every step
        run = json.loads((world / name / "run.json").read_text())
        assert run["layout"] == {"gpus": gpus, "pdbs": pdbs, "gas": gas, "global_batch": B, "seq_length": SEQ}
        assert run["distributed"]["world_size"] == gpus
        assert run["distributed"]["backend"] == ("gloo" if gpus > 1 else None)
        assert run["attempts"][-1]["rank_hosts"] == [socket.gethostname()] * gpus  # every rank's host

    from retrace.compare.similarity import compare_params

    base = world / "2x4x1"
    for other in ("2x2x2", "1x2x4"):
        ck = compare_params(load_ckpt(base / "checkpoints" / f"step{STEPS}.safetensors"),
                            load_ckpt(world / other / "checkpoints" / f"step{STEPS}.safetensors"))
        assert ck.one_minus_cos < 1e-6
        a, b = masters(base, STEPS), masters(world / other, STEPS)
        one_minus_cos = 1 - float(a @ b) / float(a.norm() * b.norm())
        l2 = float((a - b).norm())
        assert one_minus_cos < 1e-6
        assert l2 > 0, f"{other}: bitwise identical to 2x4x1 (expected rounding differences)"
    # and they did train: the weights moved away from the start
    start = load_ckpt(base / "checkpoints" / "step0.safetensors")
    end = load_ckpt(base / "checkpoints" / f"step{STEPS}.safetensors")
    assert compare_params(start, end).l2 > 1e-2


def test_outputs_and_log(world):
    out = world / "2x4x1"
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert manifest["steps"] == [0, 1, 2, 4, 8, STEPS]
    for f in manifest["files"]:
        import hashlib

        assert hashlib.sha256((out / "checkpoints" / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    ck = load_ckpt(out / "checkpoints" / "step4.safetensors")
    assert all(t.dtype == torch.float16 for t in ck.values())
    assert "embed_out.weight" in ck and not any(k.endswith("inv_freq") for k in ck)
    import pandas as pd

    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log["step"]) == list(range(1, STEPS + 1))
    assert {"loss", "lr", "loss_scale", "grad_norm", "skipped", "tokens_per_s"} <= set(log.columns)
    assert log["lr"].iloc[0] == 0.0 and not log["skipped"].any()
    assert np.isfinite(log["loss"]).all() and log["loss"].iloc[-1] < log["loss"].iloc[0]
    run = json.loads((out / "run.json").read_text())
    for key in ("python", "torch", "cuda", "cudnn", "gpus", "gpu_count", "host", "git_commit"):
        assert key in run["environment"]
    assert run["engine"] == "builtin" and run["precision"] == "fp32" and run["finished"]
    assert run["arguments"]["gpus"] == 2 and run["threads_per_rank"] == 1
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step12", "step8"]  # the newest two


def _cli(root: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--reference", str(root / "ref"), "--data", str(root / "data" / "tiny"),
            "--data-kind", "preshuffled", "--recipe", "70m", "--global-batch", str(B), "--seq-length", str(SEQ),
            "--train-iters", "100", "--attention", "flash", "--precision", "fp32", "--engine", "builtin",
            "--threads", "1", "--no-progress", "--out", str(root / out), *extra]


def test_bad_input_is_one_clear_error_before_compute(world, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (_cli(world, "bad1", "--gpus", "2", "--pdbs", "2", "--gas", "1", "--steps", "4"), "impossible layout"),
        (_cli(world, "bad2", "--gpus", "1", "--pdbs", "8", "--gas", "1", "--steps", "50"), "need"),
        (_cli(world, "bad3", "--gpus", "1", "--pdbs", "8", "--gas", "1", "--steps", "4", "--start-step", "4"),
         "--steps"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and msg in err, err
    for name in ("bad1", "bad2", "bad3"):
        assert not (world / name / "checkpoints").exists()
    # a start step the source does not have: a Hub repo without that branch (offline: not in the cache)
    argv = _cli(world, "bad4", "--gpus", "1", "--pdbs", "8", "--gas", "1", "--steps", "8", "--start-step", "3")
    argv[argv.index("--reference") + 1] = "EleutherAI/pythia-70m-nonexistent"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "step3" in err, err
    assert not (world / "bad4" / "checkpoints").exists()


def test_cli_trains_with_gpus_2(world):
    """`retrace train --gpus 2` outside torchrun starts its own two ranks (fp16, NeoX global attention)."""
    argv = _cli(world, "cli2", "--gpus", "2", "--pdbs", "2", "--gas", "2", "--steps", "3")
    argv[argv.index("--attention") + 1] = "global"
    argv[argv.index("--precision") + 1] = "fp16"
    assert main(argv) == 0
    m = json.loads((world / "cli2" / "checkpoints" / "manifest.json").read_text())
    assert m["steps"] == [0, 1, 2, 3]
    run = json.loads((world / "cli2" / "run.json").read_text())
    assert run["model"]["attention"] == "global" and run["precision"] == "fp16"
    import pandas as pd

    log = pd.read_parquet(world / "cli2" / "train_log.parquet")
    assert (log["loss_scale"] == 4096).all()


def test_simulated_ranks_match_real_ranks_bitwise(world):
    """--simulate-ranks: the two ranks' work in one process; with 2 ranks the fp16 sum is the same sum."""
    real = train(cell(world, "real2", 2, 2, 2, steps=4, precision="fp16"))
    sim = train(cell(world, "sim2", 2, 2, 2, steps=4, precision="fp16", simulate_ranks=True))
    assert real.final_loss == sim.final_loss
    assert read_items(world / "real2") == read_items(world / "sim2")
    a, b = masters(world / "real2", 4), masters(world / "sim2", 4)
    assert torch.equal(a, b)
    assert json.loads((world / "sim2" / "run.json").read_text())["distributed"]["world_size"] == 1
