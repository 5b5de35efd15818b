"""The optional DeepSpeed engine (ZeRO-1, gloo on CPU): runs only where deepspeed imports."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from retrace.compare.similarity import compare_params  # noqa: E402
from retrace.errors import RetraceError  # noqa: E402
from retrace.train import TrainConfig, train  # noqa: E402
from test_train_helpers import SEQ, B, load_ckpt, masters  # noqa: E402


def cfg(root, out, steps, **over):
    kw = dict(reference=str(root / "ref"), data=str(root / "data" / "tiny"), out=str(root / out), steps=steps,
              recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, gpus=1, pdbs=4, gas=2,
              precision="fp32", threads=1, progress=False, engine="deepspeed")
    kw.update(over)
    return TrainConfig(**kw)


def test_deepspeed_zero1_two_ranks_matches_builtin(world):
    ds = train(cfg(world, "ds2", 6, gpus=2, pdbs=2, gas=2))
    bi = train(cfg(world, "bi2", 6, gpus=2, pdbs=2, gas=2, engine="builtin"))
    a = load_ckpt(world / "ds2" / "checkpoints" / "step6.safetensors")
    b = load_ckpt(world / "bi2" / "checkpoints" / "step6.safetensors")
    r = compare_params(a, b)
    assert r.one_minus_cos < 1e-8  # the same arithmetic up to rounding (torch AdamW vs apex formula)
    assert ds.final_loss == pytest.approx(bi.final_loss, rel=1e-5)
    import json

    run = json.loads((world / "ds2" / "run.json").read_text())
    assert run["engine"] == "deepspeed" and run["environment"]["deepspeed"]


def test_deepspeed_resume_is_bit_identical(world):
    train(cfg(world, "dsfull", 10))
    train(cfg(world, "dspart", 6))  # stops at 6 with a state there ...
    train(cfg(world, "dspart", 10))  # ... and the same cell to 10 resumes from it
    a = load_ckpt(world / "dsfull" / "checkpoints" / "step10.safetensors")
    b = load_ckpt(world / "dspart" / "checkpoints" / "step10.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = masters(world / "dsfull", 10, "rank0"), masters(world / "dspart", 10, "rank0")
    assert all(torch.equal(ma[k], mb[k]) for k in ma if not k.startswith("rng."))


def test_deepspeed_refuses_fp16_on_cpu_clearly(world):
    with pytest.raises(RetraceError, match="fp16 on CPU"):
        train(cfg(world, "dsfp16", 2, precision="fp16"))
