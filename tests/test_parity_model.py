"""The training network's bias arithmetic against a per-operation replay of GPT-NeoX v1.0 (gpt-neox 71df4d50).

megatron/model/transformer.py ~102/~112/~305 build attention.dense, dense_h_to_4h and dense_4h_to_h with
``skip_bias_add=True``; megatron/mpu/layers.py ~458-466/~589-601 return the bias-free GEMM and the bias;
fused_bias_dropout.py ~31-33 adds it (dropout 0) and activations.py ~62-96 puts the dense_h_to_4h bias
into ``bias_gelu`` with its hand-written ``bias_gelu_back``. The replays below do each of those operations
in numpy: an fp16 operation is the float32 operation on the fp16 inputs, rounded to fp16 (what PyTorch's
half kernels compute). A Python constant *multiplied* into an fp16 tensor enters as float32 (PyTorch's
mul "casts the scalar to acc_type", BinaryMulDivKernel.cu); one *added* to it is first rounded to fp16
(the add kernel takes both operands as the tensor's dtype) — so ``0.79788456 + …`` in ``bias_gelu_back``
adds fp16(0.79788456). Only the GEMM itself and tanh are taken from torch (primitives).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrace.model import MLP, GPTNeoX, ModelConfig, NeoXBiasGeLU, config_from_hf, config_to_hf, init_weights

F32, F16 = np.float32, np.float16


def op(x) -> np.ndarray:
    """Round a float32 result to fp16 (one fp16 operation)."""
    return np.asarray(x, dtype=F32).astype(F16)


def up(x: np.ndarray) -> np.ndarray:
    return x.astype(F32)


def tanh16(x16: np.ndarray) -> np.ndarray:
    return op(torch.tanh(torch.from_numpy(up(x16))).numpy())


def replay_bias_gelu(bias: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x = bias + y; x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x))), left to right."""
    x = op(up(bias) + up(y))
    a = op(up(x) * F32(0.5))
    inner = op(up(op(F32(0.79788456) * up(x))) * up(op(F32(1) + up(op(up(op(F32(0.044715) * up(x))) * up(x))))))
    return op(up(a) * up(op(F32(1.0) + up(tanh16(inner)))))


def replay_bias_gelu_back(g: np.ndarray, bias: np.ndarray, y: np.ndarray) -> np.ndarray:
    """bias_gelu_back: ff = 0.5*x*((1 - t*t)*(0.79788456 + 0.1070322243*x*x)) + 0.5*(1 + t); ff * g."""
    x = op(up(bias) + up(y))
    inner = op(up(op(F32(0.79788456) * up(x))) * up(op(F32(1) + up(op(up(op(F32(0.044715) * up(x))) * up(x))))))
    t = tanh16(inner)
    one_minus = op(F32(1) - up(op(up(t) * up(t))))
    poly = op(F32(F16(0.79788456)) + up(op(up(op(F32(0.1070322243) * up(x))) * up(x))))  # added: fp16 constant
    left = op(up(op(F32(0.5) * up(x))) * up(op(up(one_minus) * up(poly))))
    ff = op(up(left) + up(op(F32(0.5) * up(op(F32(1) + up(t))))))
    return op(up(ff) * up(g))


def cfg(**over) -> ModelConfig:
    return ModelConfig(**{"n_layers": 1, "hidden": 32, "heads": 2, "vocab": 64, "seq_len": 16, **over})


def test_training_path_is_neox_and_hf_path_is_transformers():
    hub = config_to_hf(cfg(gelu="erf"), hidden_act="gelu")
    assert config_from_hf(hub).arithmetic_kind == "hf"  # what transformers runs (logits test)
    assert config_from_hf(hub, gelu="tanh").arithmetic_kind == "neox"  # what `retrace train` builds
    assert cfg().arithmetic_kind == "neox" and cfg(gelu="tanh", arithmetic="hf").arithmetic_kind == "hf"
    a, b = GPTNeoX(cfg()), GPTNeoX(cfg(arithmetic="hf"))
    assert list(a.state_dict()) == list(b.state_dict()) == list(cfg().param_shapes())  # HF names in both
    from retrace.errors import RetraceError

    with pytest.raises(RetraceError, match="needs gelu='tanh'"):
        cfg(gelu="erf", arithmetic="neox")


def test_bias_gelu_forward_and_backward_replay_fp16():
    rng = np.random.default_rng(0)
    y = (rng.standard_normal((4, 8, 128)) * 2).astype(F16)  # numel a multiple of 64: no tail in tanh's loop
    bias = (rng.standard_normal(128) * 0.5).astype(F16)
    g = rng.standard_normal((4, 8, 128)).astype(F16)
    ty, tb = torch.from_numpy(y).requires_grad_(), torch.from_numpy(bias).requires_grad_()
    out = NeoXBiasGeLU.apply(ty, tb)
    out.backward(torch.from_numpy(g))
    assert np.array_equal(out.detach().numpy(), replay_bias_gelu(bias, y))
    tmp = replay_bias_gelu_back(g, bias, y)
    assert np.array_equal(ty.grad.numpy(), tmp)  # GeLUFunction.backward returns tmp for the input ...
    want_bias = tmp.astype(np.float64).sum(axis=(0, 1))  # ... and for the bias, summed over tokens
    assert np.abs(tb.grad.numpy().astype(np.float64) - want_bias).max() <= np.abs(want_bias).max() * 2e-3
    # not vacuous: PyTorch's tanh GELU on the biased input rounds differently
    ref = F.gelu(torch.from_numpy(y) + torch.from_numpy(bias), approximate="tanh").numpy()
    assert (ref != out.detach().numpy()).sum() > 0


def test_dense_layers_add_their_bias_after_the_gemm_in_fp16():
    torch.manual_seed(0)
    mlp = MLP(cfg()).half()
    x = torch.randn(4, 8, 32).half()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        got = mlp(x)
        w1, b1 = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias
        w2, b2 = mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias
        h = replay_bias_gelu(b1.numpy(), F.linear(x, w1).numpy())  # GEMM without bias, then bias_gelu
        mm = F.linear(torch.from_numpy(h), w2).numpy()
        want = op(up(mm) + up(b2.numpy()))  # dense_4h_to_h: GEMM, then + bias in fp16
        assert np.array_equal(got.numpy(), want)
        hf = MLP(cfg(arithmetic="hf")).half()
        hf.load_state_dict(mlp.state_dict())
        assert (hf(x) != got).sum() > 0  # bias inside the GEMM and F.gelu round differently


def test_attention_dense_adds_its_bias_after_the_gemm():
    torch.manual_seed(1)
    neox = GPTNeoX(cfg()).half()
    init_weights(neox, 3)
    with torch.no_grad():
        for name, p in neox.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.5)
    hf = GPTNeoX(cfg(arithmetic="hf")).half()
    hf.load_state_dict(neox.state_dict())
    a_neox, a_hf = neox.gpt_neox.layers[0].attention, hf.gpt_neox.layers[0].attention
    captured = {}

    def grab(_module, args):
        captured["ctx"] = args[0]

    a_hf.dense.register_forward_pre_hook(grab)
    x = torch.randn(2, 16, 32).half()
    cos, sin = neox.rotary.get(16, x.device, x.dtype)
    with torch.no_grad():
        got, ref = a_neox(x, cos, sin), a_hf(x, cos, sin)  # QKV (bias in its GEMM) is the same in both
        mm = F.linear(captured["ctx"], a_neox.dense.weight).numpy()
    assert np.array_equal(got.numpy(), op(up(mm) + up(a_neox.dense.bias.detach().numpy())))
    assert (got != ref).sum() > 0
