"""The builtin engine's optimizer step against hand-written replays of DeeperSpeed eb7f5cff + apex a651e2c2.

Each expected value is computed here from the source's formula (numpy float32/float16 arithmetic, Python
doubles), never by calling the engine's own helpers. Gradients are planted directly in the engine's flat
``.grad`` buffers, so the replays see exactly the numbers the step sees. Sources (reference §7):
apex csrc/multi_tensor_adam.cu ~105-160, apex/optimizers/fused_adam.py ~110-113, DeeperSpeed
runtime/zero/stage1.py ~313-325 / ~690-797, runtime/utils.py ~114-247, runtime/fp16/fused_optimizer.py
~151-157 / ~296-330 / ~363-393, runtime/fp16/loss_scaler.py ~146-165.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrace.model import GPTNeoX, init_weights
from retrace.pythia.recipes import lr_at, recipe_for
from retrace.train.engine import BuiltinEngine
from retrace.train.scaler import LossScaleAtMinimum
from test_train_helpers import tiny_config

F32, F16 = np.float32, np.float16


def recipe(**over):
    return recipe_for("70m", **{"global_batch": 8, "seq_length": 16, "train_iters": 100, "warmup_iters": 3,
                                **over})


def engine(precision="fp16", seed=0, **kw) -> BuiltinEngine:
    model = GPTNeoX(tiny_config())
    init_weights(model, seed)
    r = kw.pop("recipe", None) or recipe()
    return BuiltinEngine(model, r, precision, gas=1, **kw)


def plant(eng: BuiltinEngine, seed: int, scale: float = 1.0) -> list[np.ndarray]:
    """Random gradients (× scale, in the compute dtype) into the engine's flat buffers; returns them."""
    rng = np.random.default_rng(seed)
    out = []
    for g in eng.groups:
        vals = (rng.standard_normal(g.numel) * 1e-2 * scale).astype(np.float32)
        t = torch.from_numpy(vals).to(g.grad.dtype)
        g.grad[: g.numel].copy_(t)
        out.append(g.grad[: g.numel].float().numpy().copy())
    return out


# -- replays ------------------------------------------------------------------------------------------
class ApexAdamReplay:
    """multi_tensor_adam.cu, ADAM_MODE_1 (AdamW), MATH_T = float, one element at a time in its order."""

    def __init__(self, p: np.ndarray, wd: float, betas=(0.9, 0.95), eps=1e-8):
        self.p = p.astype(F32).copy()
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.b1, self.b2 = F32(betas[0]), F32(betas[1])  # const float beta1, beta2
        self.eps, self.wd = F32(eps), F32(wd)
        self.step = 1  # fused_adam.py: group['step'] = 1 on the ZeRO constructor's step() (zero grads, LR 0)

    def update(self, g: np.ndarray, lr: float) -> None:
        self.step += 1  # group['step'] += 1 on every FusedAdam.step()
        b1, b2 = self.b1, self.b2
        # host: bias_correction = 1 - std::pow(beta, step) — std::pow(float, int) promotes to double
        bc1 = F32(1.0 - math.pow(float(b1), self.step))
        bc2 = F32(1.0 - math.pow(float(b2), self.step))
        lr32 = F32(lr)
        self.m = b1 * self.m + (F32(1) - b1) * g
        self.v = b2 * self.v + (F32(1) - b2) * g * g
        m_hat = self.m / bc1
        v_hat = self.v / bc2
        denom = np.sqrt(v_hat) + self.eps
        update = (m_hat / denom) + (self.wd * self.p)
        self.p = self.p - (lr32 * update)


def deepspeed_get_grad_norm(tensors: list[torch.Tensor]) -> float:
    """runtime/utils.py get_grad_norm, norm_type 2, mp = 1."""
    total_norm = 0.0
    for t in tensors:
        param_norm = torch.linalg.vector_norm(t.float(), 2)  # p.grad.data.float().norm(2)
        total_norm += param_norm.item() ** 2.0
    total_norm = float(np.float32(total_norm)) ** (1.0 / 2.0)  # torch.cuda.FloatTensor([float(total_norm)])
    return -1.0 if not math.isfinite(total_norm) else total_norm


def stage1_total_norm(eng: BuiltinEngine) -> float:
    """stage1.py step: get_grad_norm per group of fp16 params, combined in unscale_and_clip_grads."""
    norm_groups = [deepspeed_get_grad_norm([v for _, v in g.views(g.grad)]) for g in eng.groups]
    return math.sqrt(sum(n**2.0 for n in norm_groups))


def stage0_total_norm(eng: BuiltinEngine) -> float:
    """FP16_Optimizer.step: get_grad_norm over the fp32 flat groups (one tensor per group)."""
    return math.sqrt(deepspeed_get_grad_norm([g.grad[: g.numel].float() for g in eng.groups]) ** 2.0)


def dynamic_loss_scaler(scale, window, hysteresis, min_scale):
    """loss_scaler.py DynamicLossScaler.update_scale, delayed_shift = hysteresis, consecutive off."""
    st = {"cur_scale": scale, "cur_iter": 0, "last_overflow_iter": -1, "cur_hysteresis": hysteresis}

    def update(overflow):
        if overflow:
            if hysteresis == 1 or st["cur_hysteresis"] == 1:
                if st["cur_scale"] == min_scale:
                    raise RuntimeError("Current loss scale already at minimum")
                st["cur_scale"] = max(st["cur_scale"] / 2.0, min_scale)
            else:
                st["cur_hysteresis"] -= 1
            st["last_overflow_iter"] = st["cur_iter"]
        else:
            if (st["cur_iter"] - st["last_overflow_iter"]) % window == 0:
                st["cur_hysteresis"] = hysteresis
                st["cur_scale"] *= 2.0
        st["cur_iter"] += 1
        return st["cur_scale"]

    return update


def fp16_optimizer_scaler(scale, window, min_scale):
    """fused_optimizer.py FP16_Optimizer._update_scale (dynamic)."""
    st = {"cur_scale": scale, "cur_iter": 0, "last_overflow_iter": -1}

    def update(skip):
        if skip:
            st["cur_scale"] = max(st["cur_scale"] / 2, min_scale)
            st["last_overflow_iter"] = st["cur_iter"]
        else:
            stable_interval = (st["cur_iter"] - st["last_overflow_iter"]) - 1
            if stable_interval > 0 and stable_interval % window == 0:
                st["cur_scale"] *= 2
        st["cur_iter"] += 1
        return st["cur_scale"]

    return update


# -- Adam: apex's kernel and the ZeRO constructor's init step -------------------------------------------
@pytest.mark.parametrize("chunk", [7, 1 << 22])
@pytest.mark.parametrize("start", [0, 500])
def test_adam_is_apex_kernel_with_init_step_bitwise(chunk, start):
    """Update k runs with t = k + 1, from step 0 and from a Hugging Face step N (fresh moments, LR counter
    N); float β, 1−β, bias corrections and the kernel's expression order; any chunk size."""
    r = recipe(clip_grad=0.0)  # no clipping: the Adam arithmetic alone
    eng = engine("fp16", recipe=r, lr_iter=start, chunk_elems=chunk)
    replays = [ApexAdamReplay(g.master.numpy(), g.weight_decay) for g in eng.groups]
    for k in range(1, 6):
        grads = plant(eng, seed=k, scale=4096.0)
        lr = lr_at(eng.lr_iter, r)
        res = eng.step()
        assert not res.skipped and eng.adam_t == k + 1 and eng.adam_steps == k
        for rep, g32 in zip(replays, grads, strict=True):
            rep.update(g32 * F32(1.0 / 4096.0), lr)  # grad.mul_(1/combined_scale) on the fp32 copy
    for g, rep in zip(eng.groups, replays, strict=True):
        assert np.array_equal(g.master.numpy(), rep.p)
        assert np.array_equal(g.exp_avg.numpy(), rep.m)
        assert np.array_equal(g.exp_avg_sq.numpy(), rep.v)
        assert np.array_equal(g.model.float().numpy(), rep.p.astype(F16).astype(F32))  # fp32 → fp16 copy_


def test_second_update_ratio_against_the_old_counter():
    """With t = k (no init step) update 2 would be ≈1.18× the apex+DeeperSpeed one; the engine's is 1.0×."""
    r = recipe(clip_grad=0.0, warmup_iters=1, weight_decay=0.0)
    eng = engine("fp32", recipe=r)
    p0 = [g.master.numpy().copy() for g in eng.groups]
    good, old = ([ApexAdamReplay(p, 0.0) for p in p0] for _ in range(2))
    for rep in old:
        rep.step = 0  # t = k: the counter without the ZeRO constructor's step
    deltas = {"engine": 0.0, "good": 0.0, "old": 0.0}
    for _ in range(2):
        grads = plant(eng, seed=3)  # the same gradient twice: update 2 = bias-corrected ratio only
        lr = lr_at(eng.lr_iter, r)
        before = [g.master.numpy().copy() for g in eng.groups]
        eng.step()
        pg = [rep.p.copy() for rep in good]
        po = [rep.p.copy() for rep in old]
        for rg, ro, g32 in zip(good, old, grads, strict=True):
            rg.update(g32, lr)
            ro.update(g32, lr)
    deltas["engine"] = sum(float(np.abs(g.master.numpy() - b).sum()) for g, b in zip(eng.groups, before, strict=True))
    deltas["good"] = sum(float(np.abs(rg.p - p).sum()) for rg, p in zip(good, pg, strict=True))
    deltas["old"] = sum(float(np.abs(ro.p - p).sum()) for ro, p in zip(old, po, strict=True))
    assert deltas["engine"] == deltas["good"] > 0
    assert deltas["old"] / deltas["good"] == pytest.approx(1.179, abs=0.005)


@pytest.mark.parametrize("mode", ["continue", "neox"])
def test_resume_modes_set_apex_counter(mode):
    """load_optimizer_state(adam_t_mode=...): "neox" restarts t at 1 (DeeperSpeed's elastic checkpoint keeps
    only the moments; the constructor's init step set t = 1), "continue" keeps t = applied updates + 1."""
    r = recipe(clip_grad=0.0)
    a = engine("fp32", recipe=r)
    for k in range(4):
        plant(a, seed=10 + k)
        a.step()
    state = {key: {n: v.clone() for g in a.groups for n, v in g.views(getattr(g, key))}
             for key in ("master", "exp_avg", "exp_avg_sq")}
    b = engine("fp32", recipe=r, seed=1)
    b.load_optimizer_state(**state, adam_steps=a.adam_steps, lr_iter=a.lr_iter, adam_t_mode=mode)
    reps = [ApexAdamReplay(g.master.numpy(), g.weight_decay) for g in b.groups]
    for rep, g in zip(reps, b.groups, strict=True):
        rep.m, rep.v = g.exp_avg.numpy().copy(), g.exp_avg_sq.numpy().copy()
        rep.step = 1 if mode == "neox" else 5
    grads = plant(b, seed=20)
    lr = lr_at(b.lr_iter, r)
    b.step()
    assert b.adam_t == (2 if mode == "neox" else 6)
    for rep, g32, g in zip(reps, grads, b.groups, strict=True):
        rep.update(g32, lr)
        assert np.array_equal(g.master.numpy(), rep.p)


# -- clip norm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 0])
def test_clip_norm_and_unscale_follow_the_stage(stage):
    """Stage 1: per weight-decay group, squares of per-tensor fp32 norms summed in double, rounded to fp32,
    groups combined; stage 0: one norm over the fp32 flat groups. Clip coefficient from that norm."""
    r = recipe(zero_stage=stage, clip_grad=1.0, warmup_iters=0)
    eng = engine("fp16", recipe=r, lr_iter=5)
    grads = plant(eng, seed=4, scale=4096.0 * 50)  # a norm well above clip 1.0
    want = stage1_total_norm(eng) if stage == 1 else stage0_total_norm(eng)
    naive = math.sqrt(sum(float(torch.linalg.vector_norm(v.float())) ** 2 for v in eng._grad_views))
    assert want != naive  # the fp32 rounding of the group sums is visible
    reps = [ApexAdamReplay(g.master.numpy(), g.weight_decay) for g in eng.groups]
    lr = lr_at(eng.lr_iter, r)
    res = eng.step()
    assert res.grad_norm == want / 4096.0
    clip = ((want / 4096.0) + 1e-6) / 1.0
    assert clip > 1
    inv = F32(1.0 / (clip * 4096.0))
    for rep, g32, g in zip(reps, grads, eng.groups, strict=True):
        rep.update(g32 * inv, lr)
        assert np.array_equal(g.master.numpy(), rep.p)


# -- overflow, loss scale, skips --------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 0])
def test_overflow_sequence_through_both_rule_sets(stage):
    """A scripted overflow sequence: scale, skips, Adam's counter and the LR counter follow DeepSpeed's
    DynamicLossScaler (stage 1) or FP16_Optimizer (stage 0) replayed from the source."""
    r = recipe(zero_stage=stage, loss_scale_window=3, clip_grad=0.0)
    eng = engine("fp16", recipe=r)
    pattern = "..X...X.XX....X...."
    rule = dynamic_loss_scaler(4096.0, 3, 2, 1.0) if stage == 1 else fp16_optimizer_scaler(4096.0, 3, 1.0)
    scales, want = [], []
    applied = 0
    for i, c in enumerate(pattern):
        plant(eng, seed=100 + i, scale=eng.scaler.scale)
        if c == "X":
            eng.groups[i % 2].grad[i] = float("inf") if i % 3 else float("nan")
        res = eng.step()
        assert res.skipped == (c == "X")
        applied += c != "X"
        assert eng.adam_steps == applied and eng.adam_t == applied + 1 and eng.lr_iter == applied
        scales.append(eng.scaler.scale)
        want.append(rule(c == "X"))
    assert scales == want
    other = fp16_optimizer_scaler(4096.0, 3, 1.0) if stage == 1 else dynamic_loss_scaler(4096.0, 3, 2, 1.0)
    assert [other(c == "X") for c in pattern] != want  # the two rule sets do differ on this sequence


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_overflow_skips_in_every_precision(precision):
    eng = engine(precision)
    plant(eng, seed=1)
    eng.step()
    before = [(g.master.clone(), g.exp_avg.clone()) for g in eng.groups]
    plant(eng, seed=2)
    eng.groups[1].grad[5] = float("nan")
    res = eng.step()
    assert res.skipped and eng.adam_steps == 1 and eng.lr_iter == 1 and eng.scaler.scale == 1.0
    for (m, e), g in zip(before, eng.groups, strict=True):
        assert torch.equal(m, g.master) and torch.equal(e, g.exp_avg)


def test_overflow_at_minimum_scale_stops_with_the_step_named():
    """Stage 1 raises where DeepSpeed's DynamicLossScaler raises (hysteresis exhausted, scale at min);
    stage 0's FP16_Optimizer has no such error and keeps skipping at the minimum."""
    r = recipe(min_loss_scale=2048.0, hysteresis=2)
    eng = engine("fp16", recipe=r)
    for step in (7, 8):  # the first overflow uses up the hysteresis, the second halves 4096 → 2048
        plant(eng, seed=step, scale=4096)
        eng.groups[0].grad[0] = float("inf")
        assert eng.step(step=step).skipped
    assert eng.scaler.scale == 2048.0
    plant(eng, seed=9)
    eng.groups[0].grad[0] = float("inf")
    with pytest.raises(LossScaleAtMinimum, match=r"step 9: .*minimum \(2048\)") as info:
        eng.step(step=9)
    assert info.value.step == 9
    s0 = engine("fp16", recipe=recipe(zero_stage=0, min_loss_scale=4096.0))
    for step in range(3):
        plant(s0, seed=step)
        s0.groups[0].grad[0] = float("inf")
        assert s0.step(step=step).skipped and s0.scaler.scale == 4096.0


# -- data-parallel reduction -------------------------------------------------------------------------------
def test_simulated_ranks_sum_then_post_scale():
    """runtime/engine.py allreduce_bucket (postscale_gradients): fp16 sum over ranks, then × (1/dp) in
    fp16 with the float scalar; three ranks so that 1/dp is not a power of two."""
    eng = engine("fp16", simulated_ranks=3, recipe=recipe(clip_grad=0.0))
    per_rank = []
    for k in range(3):
        per_rank.append(plant(eng, seed=50 + k, scale=4096.0))
        eng.end_rank()
    eng._reduce_gradients()
    for gi, g in enumerate(eng.groups):
        acc = np.zeros(g.numel, dtype=F16)
        for rank in per_rank:
            acc = (acc.astype(F32) + rank[gi].astype(F32)).astype(F16)
        want = (acc.astype(F32) * F32(1.0 / 3.0)).astype(F16)
        assert np.array_equal(g.grad[: g.numel].numpy(), want)


def test_sqrt_in_the_update_is_correctly_rounded():
    """sqrtf is IEEE: float64 sqrt rounded to float32 is the correctly rounded float32 sqrt (53 ≥ 2·24 + 2)."""
    from retrace.train.optim import _ieee_sqrt_

    x = np.abs(np.random.default_rng(0).standard_normal(100_003)).astype(F32) * F32(1e-6)
    t = torch.from_numpy(x.copy())
    _ieee_sqrt_(t)
    assert np.array_equal(t.numpy(), np.sqrt(x.astype(np.float64)).astype(F32))
