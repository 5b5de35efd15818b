"""retrace.forensics: the step-0 reading of two checkpoints, on tiny models initialised by retrace.model.

Pairs: the same seed (identical), different seeds (same scheme, different RNG — over several pairs, so
the tolerance is shown not to fire on chance), small_wang vs normal_scaled on one shape (different
scheme, every random kind named), one kind rescaled (only that kind named), one tensor perturbed
(partially identical, naming it), noise everywhere (related), and fp16 vs fp32 copies.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from retrace.checkpoints import save_params
from retrace.forensics import (
    DIFFERENT_SCHEME,
    IDENTICAL,
    PARTIAL,
    RELATED,
    SAME_SCHEME,
    forensics,
    tensor_kind,
)
from retrace.model import GPTNeoX, init_weights
from retrace.pythia.sizes import ModelConfig

CFG = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=128, seq_len=32)
RANDOM_KINDS = {"embedding", "qkv", "attn_dense", "mlp_in", "mlp_out", "head"}


def init(seed: int, scheme: str = "small_wang") -> dict[str, torch.Tensor]:
    model = GPTNeoX(CFG.replace(init=scheme), device="meta").to_empty(device="cpu")
    init_weights(model, seed)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def seed1():
    return init(1)


def test_tensor_kinds():
    assert tensor_kind("gpt_neox.embed_in.weight") == "embedding"
    assert tensor_kind("embed_out.weight") == "head"
    assert tensor_kind("gpt_neox.layers.3.attention.query_key_value.weight") == "qkv"
    assert tensor_kind("gpt_neox.layers.3.attention.query_key_value.bias") == "bias"
    assert tensor_kind("gpt_neox.layers.3.attention.dense.weight") == "attn_dense"
    assert tensor_kind("gpt_neox.layers.3.mlp.dense_h_to_4h.weight") == "mlp_in"
    assert tensor_kind("gpt_neox.layers.3.mlp.dense_4h_to_h.weight") == "mlp_out"
    assert tensor_kind("gpt_neox.layers.0.input_layernorm.weight") == "layernorm_weight"
    assert tensor_kind("gpt_neox.layers.0.post_attention_layernorm.bias") == "layernorm_bias"
    assert tensor_kind("gpt_neox.final_layer_norm.weight") == "layernorm_weight"


def test_same_seed_is_identical(seed1):
    report = forensics(seed1, init(1))
    assert report.reading == IDENTICAL
    assert "bitwise equal" in report.headline
    assert {k.verdict for k in report.kinds} == {"equal"}


@pytest.mark.parametrize("seeds", [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)])
def test_different_seeds_same_scheme(seeds):
    report = forensics(init(seeds[0]), init(seeds[1]))
    assert report.reading == SAME_SCHEME, report.render()
    assert report.scheme_differs == []
    for k in report.kinds:
        if k.kind in RANDOM_KINDS:
            assert k.n_equal == 0 and k.verdict == "consistent"
            assert abs(k.std_ratio - 1) <= k.tolerance
            assert k.corr_z < 5
        else:  # LayerNorm ones/zeros and zero biases: deterministic, equal
            assert k.verdict == "equal" and k.n_constant == k.n_tensors
    # the tolerance follows the sampling error: attention.dense has the fewest elements (2·64·64)
    dense = report.kind("attn_dense")
    assert dense.se == pytest.approx(math.sqrt(1 / (2 * 8192) + 1 / (2 * 8192)))
    assert dense.tolerance == pytest.approx(max(0.05, 5 * dense.se))


def test_different_scheme_names_the_kinds(seed1):
    report = forensics(seed1, init(1, scheme="normal_scaled"))
    assert report.reading == DIFFERENT_SCHEME
    assert set(report.scheme_differs) == RANDOM_KINDS
    d = CFG.hidden
    small, wang = math.sqrt(2 / (5 * d)), 2 / CFG.n_layers / math.sqrt(d)
    normal, scaled = 0.02, 0.02 / math.sqrt(2 * CFG.n_layers)
    assert report.kind("embedding").std_ratio == pytest.approx(normal / small, rel=0.05)
    assert report.kind("mlp_out").std_ratio == pytest.approx(scaled / wang, rel=0.05)
    assert f"embedding (embed_in) (B/A {report.kind('embedding').std_ratio:.4g})" in report.headline
    assert report.kind("layernorm_weight").verdict == "equal"


def test_one_kind_rescaled_is_named_alone():
    b = init(2)
    b["gpt_neox.embed_in.weight"] = b["gpt_neox.embed_in.weight"] * 1.1
    report = forensics(init(1), b)
    assert report.reading == DIFFERENT_SCHEME
    assert report.scheme_differs == ["embedding"]
    assert report.kind("embedding").std_ratio == pytest.approx(1.1, abs=0.03)


def test_one_tensor_perturbed(seed1):
    b = dict(seed1)
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    g = torch.Generator().manual_seed(0)
    b[name] = b[name] + 1e-3 * torch.randn(b[name].shape, generator=g)
    report = forensics(seed1, b)
    assert report.reading == PARTIAL
    assert name in report.headline and "1 tensor(s) differ" in report.headline
    assert report.kind("mlp_in").n_equal == 1 and report.kind("qkv").n_equal == 2


def test_moved_everywhere_is_related(seed1):
    g = torch.Generator().manual_seed(0)
    b = {
        k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.std() > 0 else v
        for k, v in seed1.items()
    }
    report = forensics(seed1, b)
    assert report.reading == RELATED
    assert report.kind("qkv").corr_z > 100


def test_zero_bias_made_random_is_a_scheme_difference(seed1):
    b = dict(seed1)
    name = "gpt_neox.layers.0.attention.dense.bias"
    b[name] = 0.01 * torch.randn(b[name].shape, generator=torch.Generator().manual_seed(0))
    report = forensics(init(2), b)
    assert report.reading == DIFFERENT_SCHEME
    assert report.scheme_differs == ["bias"] and report.kind("bias").verdict == "random-vs-constant"


def test_fp16_copy_and_sources_on_disk(seed1, tmp_path):
    half = {k: v.half() for k, v in seed1.items()}
    save_params(half, tmp_path / "a.safetensors")
    save_params(half, tmp_path / "b.safetensors")
    report = forensics(str(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert report.reading == IDENTICAL and "bitwise" in report.headline
    # fp32 vs its fp16 rounding: not equal, clearly the same draw
    assert forensics(seed1, half).reading == RELATED
    text = report.render()
    assert "reading: identical" in text and "attention dense" in text
    json.dumps(report.to_dict(), allow_nan=False)


def test_render_and_dict(seed1):
    report = forensics(seed1, init(1, scheme="normal_scaled"))
    text = report.render()
    assert text.splitlines()[4] == f"reading: {DIFFERENT_SCHEME}"
    assert "ratio-differs" in text and "tolerance per kind" in text
    d = report.to_dict()
    assert d["reading"] == DIFFERENT_SCHEME and set(d["scheme_differs"]) == RANDOM_KINDS
    assert {k["kind"] for k in d["kinds"]} >= RANDOM_KINDS | {"layernorm_weight", "layernorm_bias", "bias"}


def test_same_draws_at_another_scale_are_noticed(seed1):
    """retrace's init draws the same numbers for a seed whatever the scheme: cos = 1, std ratio far from 1."""
    report = forensics(seed1, init(1, scheme="normal_scaled"))
    assert any("same RNG, different scheme" in f for f in report.findings)
    assert not any("same RNG" in f for f in forensics(seed1, init(2, scheme="normal_scaled")).findings)
