"""retrace.model.init_weights: GPT-NeoX v1.0 initialisation laws, per tensor, and seeding."""

from __future__ import annotations

import math

import pytest
import torch

from retrace.errors import RetraceError
from retrace.model import PYTHIA_SIZES, GPTNeoX, ModelConfig, init_plan, init_weights, pythia_config


def expected_std(cfg: ModelConfig, name: str) -> float | None:
    """The formulas of reference §3, written independently of init_plan. None: not a random tensor."""
    d, L = cfg.hidden, cfg.n_layers
    if name.endswith(".bias") or "layernorm" in name or "layer_norm" in name:
        return None
    output_layer = name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight"))
    if cfg.init == "small_wang":
        return 2 / (L * math.sqrt(d)) if output_layer else math.sqrt(2 / (5 * d))
    return 0.02 / math.sqrt(2 * L) if output_layer else 0.02


def check_laws(model: GPTNeoX) -> None:
    cfg = model.config
    for name, p in model.named_parameters():
        t = p.detach().double()
        std = expected_std(cfg, name)
        if std is None:
            fill = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(t == fill), name
            continue
        n = t.numel()
        assert abs(t.std().item() / std - 1) < 0.02, (name, t.std().item(), std)
        assert abs(t.mean().item()) < 5 * std / math.sqrt(n), name  # unbiased, zero mean


def test_pythia_70m_full_shape():
    cfg = pythia_config("70m")
    model = GPTNeoX(cfg)
    init_weights(model, seed=1234)
    check_laws(model)
    # the σ table of reference §3
    plan = init_plan(cfg)
    assert plan["gpt_neox.embed_in.weight"] == ("normal", pytest.approx(0.027951, abs=1e-6))
    assert plan["gpt_neox.layers.5.mlp.dense_4h_to_h.weight"] == ("normal", pytest.approx(0.014731, abs=1e-6))
    assert plan["embed_out.weight"][1] == plan["gpt_neox.layers.0.attention.query_key_value.weight"][1]


def test_normal_scaled_branch_on_a_small_shape():
    cfg = ModelConfig(n_layers=4, hidden=256, heads=4, vocab=1000, seq_len=64, init="normal_scaled")
    model = GPTNeoX(cfg)
    init_weights(model, seed=3)
    check_laws(model)
    plan = init_plan(cfg)
    assert plan["gpt_neox.layers.0.attention.dense.weight"] == ("normal", pytest.approx(0.02 / math.sqrt(8)))
    assert plan["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == ("normal", 0.02)


def test_sigma_table_for_every_size():
    """σ values of reference §3 (small / wang; normal / scaled for 6.9b and 12b), from the plan alone."""
    table = {
        "14m": (0.055902, 0.029463),
        "31m": (0.039528, 0.020833),
        "70m": (0.027951, 0.014731),
        "160m": (0.022822, 0.006014),
        "410m": (0.019764, 0.002604),
        "1b": (0.013975, 0.002762),
        "1.4b": (0.013975, 0.001841),
        "2.8b": (0.0125, 0.001235),
        "6.9b": (0.02, 0.0025),
        "12b": (0.02, 0.002357),
    }
    for name, (std_in, std_out) in table.items():
        plan = init_plan(PYTHIA_SIZES[name])
        assert plan["embed_out.weight"][1] == pytest.approx(std_in, abs=1e-6), name
        assert plan["gpt_neox.embed_in.weight"][1] == pytest.approx(std_in, abs=1e-6), name
        assert plan["gpt_neox.layers.0.attention.dense.weight"][1] == pytest.approx(std_out, abs=1e-6), name
        assert plan["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"][1] == pytest.approx(std_out, abs=1e-6), name
        assert set(plan) == set(PYTHIA_SIZES[name].param_shapes())


def test_seeding_is_deterministic():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=128, seq_len=32)
    a, b, c = GPTNeoX(cfg), GPTNeoX(cfg), GPTNeoX(cfg)
    torch.manual_seed(0)
    init_weights(a, seed=7)
    torch.manual_seed(1)  # the global RNG plays no part
    init_weights(b, seed=7)
    init_weights(c, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if init_plan(cfg)[name][0] == "normal":
            assert not torch.equal(pa, pc), name
    # distinct tensors of one shape get distinct draws
    assert not torch.equal(
        a.gpt_neox.layers[0].attention.dense.weight, a.gpt_neox.layers[1].attention.dense.weight
    )


def test_same_values_on_meta_built_and_half_models():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=128, seq_len=32)
    ref = init_weights(GPTNeoX(cfg), seed=2)
    meta = GPTNeoX(cfg, device="meta").to_empty(device="cpu")
    init_weights(meta, seed=2)
    half = init_weights(GPTNeoX(cfg, dtype=torch.float16), seed=2)
    for (name, p), q, h in zip(ref.named_parameters(), meta.parameters(), half.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(p.half(), h), name


def test_bad_seed():
    model = GPTNeoX(ModelConfig(n_layers=1, hidden=32, heads=2, vocab=10, seq_len=8))
    for seed in (-1, 1.5, True, "1"):
        with pytest.raises(RetraceError, match="seed"):
            init_weights(model, seed=seed)
