"""Re-anchored segments: the published weights at every saved step, the run's own optimizer state kept.

A "published" run is trained here by the builtin engine in the original layout; reproductions then
re-anchor to its checkpoints. Distances are 1 - cos over all parameters in float64, computed here
independently of retrace.compare.
"""

from __future__ import annotations

import pytest
import torch

from retrace.errors import RetraceError
from retrace.train import TrainConfig, train
from test_train_helpers import SEQ, B, load_ckpt, make_data

STEPS = 16  # saved: 0, 1, 2, 4, 8, 16
SAVED = (1, 2, 4, 8, 16)


def cell(root, out, gpus, pdbs, gas, data="tiny", **over):
    kw = dict(reference=str(root / "ref"), data=str(root / "data" / data), out=str(root / out), steps=STEPS,
              recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, gpus=gpus, pdbs=pdbs,
              gas=gas, precision="fp16", threads=1, progress=False, simulate_ranks=True)
    kw.update(over)
    return TrainConfig(**kw)


def one_minus_cos(a: dict, b: dict) -> float:
    x = torch.cat([a[k].double().flatten() for k in sorted(a)])
    y = torch.cat([b[k].double().flatten() for k in sorted(a)])
    return float(1 - (x @ y) / (x.norm() * y.norm()))


@pytest.fixture(scope="module")
def runs(world):
    make_data(world / "data" / "other", SEQ, 40 * B, seed=1)
    pub = world / "pub"
    train(cell(world, "pub", 4, 2, 1))
    anchor = str(pub / "checkpoints")
    made = {
        "same": cell(world, "same", 4, 2, 1, reanchor=anchor),
        "gas4": cell(world, "gas4", 1, 2, 4, reanchor=anchor),
        "gas4_free": cell(world, "gas4_free", 1, 2, 4),
        "wrong": cell(world, "wrong", 1, 2, 4, data="other", reanchor=anchor),
        "wrong_free": cell(world, "wrong_free", 1, 2, 4, data="other"),
        # two real ranks (gloo, ZeRO-1: each rank re-anchors its shard of the master) and the same simulated
        "wrong_2ranks": cell(world, "wrong_2ranks", 2, 4, 1, data="other", reanchor=anchor, simulate_ranks=False),
        "wrong_2sim": cell(world, "wrong_2sim", 2, 4, 1, data="other", reanchor=anchor),
    }
    for c in made.values():
        train(c)
    dist = {
        name: {s: one_minus_cos(load_ckpt(world / name / "checkpoints" / f"step{s}.safetensors"),
                                load_ckpt(pub / "checkpoints" / f"step{s}.safetensors")) for s in SAVED}
        for name in made
    }
    return world, dist


@pytest.mark.slow
def test_original_layout_right_data_is_bit_identical_at_every_step(runs):
    world, _ = runs
    for s in (0, *SAVED):
        a = load_ckpt(world / "same" / "checkpoints" / f"step{s}.safetensors")
        b = load_ckpt(world / "pub" / "checkpoints" / f"step{s}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {s}"


@pytest.mark.slow
def test_segments_do_not_compound_and_wrong_data_stays_far(runs):
    _, d = runs
    print({k: {s: f"{v:.3g}" for s, v in x.items()} for k, x in d.items()})
    # anchored at the other layout: never farther than free-running (which compounds every update)
    assert all(d["gas4"][s] <= d["gas4_free"][s] for s in SAVED)
    # the wrong data: above the right data's segment distances at every step after the first update
    # (LR 0 on the first), and below its own free run from the second segment on (no compounding)
    assert all(d["wrong"][s] > d["gas4"][s] for s in SAVED if s > 1)
    assert all(d["wrong"][s] < d["wrong_free"][s] for s in SAVED if s > 2)


@pytest.mark.slow
def test_real_ranks_reanchor_their_shards_like_simulated_ranks(runs):
    world, d = runs
    assert d["wrong_2ranks"][2] > 0  # the wrong data moved it away from the published run
    for s in SAVED:
        a = load_ckpt(world / "wrong_2ranks" / "checkpoints" / f"step{s}.safetensors")
        b = load_ckpt(world / "wrong_2sim" / "checkpoints" / f"step{s}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {s}"


def test_missing_published_step_fails_before_training(world, tmp_path):
    from retrace.train.reanchor import Reanchor

    (tmp_path / "step1.safetensors").write_bytes(b"")
    with pytest.raises(RetraceError, match="no published checkpoint for step"):
        Reanchor(tmp_path, [1, 2])


def test_one_simulated_rank_trains_like_one_real_rank(world):
    # regression: with --simulate-ranks and --gpus 1 end_rank() moved the gradients into the reduce
    # buffer and the step (which reduces only for 2+ ranks) applied zeros
    sim = train(cell(world, "sim1", 1, 8, 1, steps=2))
    real = train(cell(world, "real1", 1, 8, 1, steps=2, simulate_ranks=False))
    a, b = (load_ckpt(r.out / "checkpoints" / "step2.safetensors") for r in (sim, real))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_ckpt(sim.out / "checkpoints" / "step0.safetensors")[k]) for k in a)
