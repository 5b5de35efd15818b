"""The builtin engine's optimizer step: groups, Adam against torch.optim.AdamW, fp16 semantics, skips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from retrace.model import GPTNeoX, init_weights, lm_loss
from retrace.pythia.recipes import lr_at, recipe_for
from retrace.train.engine import BuiltinEngine
from retrace.train.optim import decay_groups
from test_train_helpers import tiny_config


def tiny_model(seed: int = 0) -> GPTNeoX:
    model = GPTNeoX(tiny_config(gelu="tanh"))
    init_weights(model, seed)
    return model


def batch(seed: int, n: int = 4, t: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, t + 1), generator=g)


def recipe(**over):
    return recipe_for("70m", **{"global_batch": 8, "seq_length": 16, "train_iters": 100, "warmup_iters": 2, **over})


def test_weight_decay_groups():
    groups = decay_groups(tiny_model(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    want_decay = {"gpt_neox.embed_in.weight", "embed_out.weight"}
    for i in range(2):
        p = f"gpt_neox.layers.{i}."
        want_decay |= {p + "attention.query_key_value.weight", p + "attention.dense.weight",
                       p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_4h_to_h.weight"}
    assert set(decay["names"]) == want_decay
    assert all(n.endswith(".bias") or "layernorm" in n or "layer_norm" in n for n in no_decay["names"])
    assert {"gpt_neox.final_layer_norm.weight", "gpt_neox.layers.1.input_layernorm.weight",
            "gpt_neox.layers.0.attention.dense.bias"} <= set(no_decay["names"])
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(tiny_model().parameters()))


def test_first_update_is_a_noop():
    model = tiny_model()
    before = {k: v.clone().half() for k, v in model.state_dict().items()}
    eng = BuiltinEngine(model, recipe(), "fp16", gas=1)
    eng.forward_backward(batch(1))
    res = eng.step()
    assert res.lr == 0.0 and not res.skipped and eng.adam_steps == 1 and eng.lr_iter == 1
    after = eng.export_params()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(g.exp_avg.abs().sum() > 0 for g in eng.groups)  # the moments did move
    eng.forward_backward(batch(2))
    assert eng.step().lr == lr_at(1, eng.recipe) > 0


def test_adam_step_matches_torch_adamw_fp32():
    """Independent reference: torch.optim.AdamW on the same groups, clip 1.0, the v1.0 LR, gas 2."""
    r = recipe(lr=3e-3, warmup_iters=1)
    model_a, model_b = tiny_model(), tiny_model()
    eng = BuiltinEngine(model_a, r, "fp32", gas=2)
    groups = decay_groups(model_b, r.weight_decay)
    opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                            lr=0.0, betas=r.betas, eps=r.eps, foreach=False)
    # DeeperSpeed's ZeRO constructor steps the optimizer once on zero gradients at LR 0 (stage1.py
    # _initialize_optimizer_states): weights and moments unchanged, Adam's step counter at 1.
    for p in model_b.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    for step in range(6):
        for k in range(2):
            x = batch(10 * step + k)
            eng.forward_backward(x)
            (lm_loss(model_b(x[:, :-1]), x[:, 1:]) / 2).backward()
        res = eng.step()
        norm = torch.nn.utils.clip_grad_norm_(model_b.parameters(), r.clip_grad)
        assert res.grad_norm == pytest.approx(float(norm), rel=1e-5)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        opt.step()
        opt.zero_grad()
    a, b = eng.master_params(), dict(model_b.named_parameters())
    # The key bias has an exactly-zero true gradient (softmax is shift invariant), so Adam turns pure
    # rounding noise into full-size steps there: leave those 8·heads entries out of the comparison.
    cfg = tiny_config()
    d = cfg.head_dim
    key_bias = torch.zeros(3 * cfg.hidden, dtype=torch.bool).view(cfg.heads, 3, d)
    key_bias[:, 1] = True
    key_bias = key_bias.reshape(-1)
    for name, t in a.items():
        ref = b[name].detach()
        if name.endswith("query_key_value.bias"):
            t, ref = t[~key_bias], ref[~key_bias]
        torch.testing.assert_close(t, ref, rtol=2e-5, atol=2e-7)
    moved = sum(float((a[n] - tiny_model().state_dict()[n]).abs().max()) for n in a)
    assert moved > 1e-3  # the comparison is not vacuous


def test_fp16_grads_accumulate_in_fp16_over_gas():
    model = tiny_model()
    eng = BuiltinEngine(model, recipe(), "fp16", gas=2)
    x1, x2 = batch(1), batch(2)
    eng.forward_backward(x1)
    g1 = [g.grad.clone() for g in eng.groups]
    eng._zero_grad()
    eng.forward_backward(x2)
    g2 = [g.grad.clone() for g in eng.groups]
    eng._zero_grad()
    eng.forward_backward(x1)
    eng.forward_backward(x2)
    for g, a, b in zip(eng.groups, g1, g2, strict=True):
        assert g.grad.dtype == torch.float16 and a.dtype == torch.float16
        assert torch.equal(g.grad, a + b)  # fp16 + fp16 rounded to fp16, as in the .grad buffers
    # and the loss was scaled by 2^12 and divided by gas before backward
    assert eng.scaler.scale == 4096


def test_fp16_unscale_and_clip_follow_deepspeed():
    r = recipe(lr=1e-3, warmup_iters=0, clip_grad=1.0)
    model = tiny_model()
    eng = BuiltinEngine(model, r, "fp16", gas=1, lr_iter=10)
    eng.forward_backward(batch(3))
    grads = [g.grad.clone() for g in eng.groups]
    masters = [g.master.clone() for g in eng.groups]
    scale = eng.scaler.scale
    norm = math.sqrt(sum(float(v.float().norm()) ** 2 for g in eng.groups for _, v in g.views(g.grad)))
    res = eng.step()
    assert res.grad_norm == pytest.approx(norm / scale, rel=1e-6)
    clip = (norm / scale + 1e-6) / 1.0
    combined = scale * clip if clip > 1 else scale
    lr = lr_at(10, r)
    b1, b2 = r.betas
    t = 2  # the first applied update runs with apex's counter at 2 (the ZeRO constructor's init step)
    for g, grad, m0 in zip(eng.groups, grads, masters, strict=True):
        g32 = grad.float() * (1.0 / combined)
        m = (1 - b1) * g32
        v = (1 - b2) * g32 * g32
        upd = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + r.eps) + g.weight_decay * m0
        torch.testing.assert_close(g.master, m0 - lr * upd, rtol=1e-6, atol=1e-9)
        assert torch.equal(g.model, g.master.half())  # fp16 weights are the cast of the master


def test_overflow_skips_the_step_without_advancing_adam_or_lr():
    model = tiny_model()
    eng = BuiltinEngine(model, recipe(), "fp16", gas=1, lr_iter=5)
    eng.forward_backward(batch(1))
    eng.step()
    state0 = ([g.master.clone() for g in eng.groups], [g.exp_avg.clone() for g in eng.groups],
              eng.adam_steps, eng.lr_iter)
    eng.forward_backward(batch(2))
    eng.groups[0].grad[3] = float("inf")
    res = eng.step()
    assert res.skipped and math.isnan(res.grad_norm) and res.loss_scale == 4096
    assert eng.adam_steps == state0[2] == 1 and eng.lr_iter == state0[3] == 6
    assert eng.scaler.scale == 4096 and eng.scaler.hysteresis == 1  # hysteresis absorbs the first
    assert all(torch.equal(a, g.master) for a, g in zip(state0[0], eng.groups, strict=True))
    assert all(torch.equal(a, g.exp_avg) for a, g in zip(state0[1], eng.groups, strict=True))
    assert all(float(g.grad.abs().sum()) == 0 for g in eng.groups)  # grads cleared
    eng.forward_backward(batch(2))
    eng.groups[1].grad[0] = float("nan")
    assert eng.step().skipped and eng.scaler.scale == 2048  # second overflow halves
    eng.forward_backward(batch(3))
    res = eng.step()
    assert not res.skipped and eng.adam_steps == 2 and res.lr == lr_at(6, eng.recipe)


def test_scale_doubling_step_unscales_with_the_new_scale():
    """DeepSpeed updates the scale before unscaling: on a doubling step the grads are halved."""
    r = recipe(warmup_iters=0, clip_grad=0.0)
    eng_a = BuiltinEngine(tiny_model(), r, "fp16", gas=1, lr_iter=10)
    eng_b = BuiltinEngine(copy.deepcopy(tiny_model()), r, "fp16", gas=1, lr_iter=10)
    eng_b.scaler.cur_iter = 999  # the next good step is the 1000th: the scale doubles
    x = batch(7)
    eng_a.forward_backward(x)
    eng_b.forward_backward(x)
    ga = [g.grad.clone() for g in eng_a.groups]
    eng_a.step()
    eng_b.step()
    assert eng_b.scaler.scale == 8192 and eng_a.scaler.scale == 4096
    # Adam moments saw g/4096 in A and g/8192 in B (clipping off)
    for g_a, g_b, grad in zip(eng_a.groups, eng_b.groups, ga, strict=True):
        torch.testing.assert_close(g_a.exp_avg, (1 - r.betas[0]) * grad.float() / 4096, rtol=1e-6, atol=0)
        torch.testing.assert_close(g_b.exp_avg * 2, g_a.exp_avg, rtol=1e-6, atol=0)


def test_bf16_and_fp32_never_skip_and_keep_scale_one():
    for precision in ("bf16", "fp32"):
        eng = BuiltinEngine(tiny_model(), recipe(), precision, gas=1)
        eng.forward_backward(batch(1))
        res = eng.step()
        assert not res.skipped and res.loss_scale == 1.0
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        assert eng.groups[0].grad.dtype == dt and eng.groups[0].master.dtype == torch.float32
