"""retrace.model: the network against transformers' GPTNeoXForCausalLM, its backends, numerics and configs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from retrace.errors import RetraceError
from retrace.model import (
    PYTHIA_SIZES,
    GPTNeoX,
    ModelConfig,
    config_from_hf,
    config_to_hf,
    init_weights,
    lm_loss,
    pythia_config,
    pythia_size,
)

transformers = pytest.importorskip("transformers")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402


# -- helpers --------------------------------------------------------------------------------------------
def hf_model(cfg: ModelConfig, attn: str = "eager") -> GPTNeoXForCausalLM:
    hf_cfg = GPTNeoXConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = attn
    return GPTNeoXForCausalLM(hf_cfg).eval()


def to_mine(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x calls the head lm_head in memory (4.x and files: embed_out)."""
    return {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf_state.items()}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random normal everything, biases and LayerNorms included (not init values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def paired(cfg: ModelConfig, seed: int = 0, attn: str = "eager") -> tuple[GPTNeoXForCausalLM, GPTNeoX]:
    hf = hf_model(cfg, attn)
    randomize(hf, seed)
    mine = GPTNeoX(cfg).eval()
    mine.load_state_dict(to_mine(hf.state_dict()), strict=True)
    return hf, mine


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


SHAPES = [
    # (n_layers, hidden, heads, rotary_pct, seq, vocab)
    (1, 32, 2, 0.25, 8, 97),
    (2, 64, 4, 0.5, 33, 128),
    (3, 96, 4, 0.25, 64, 300),
    (2, 48, 3, 1.0, 17, 50),
    (2, 64, 2, 0.125, 40, 77),
    (1, 32, 4, 0.0, 12, 64),
]


# -- against transformers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}h{}a{}r{}T{}V{}".format(*s))
@pytest.mark.parametrize("attention", ["flash", "global"])
def test_logits_and_loss_match_transformers(shape, attention):
    L, h, a, pct, T, V = shape
    cfg = ModelConfig(
        n_layers=L, hidden=h, heads=a, vocab=V, seq_len=64, rotary_pct=pct, gelu="erf", attention=attention
    )
    hf, mine = paired(cfg, seed=L * 1000 + h)
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(h))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        logits = mine(ids)
    assert logits.shape == (3, T, V) and logits.dtype == torch.float32
    assert rel_err(logits, out.logits) < 1e-5
    # transformers shifts labels internally; lm_loss takes them already shifted, as GPT-NeoX does.
    loss = lm_loss(logits[:, :-1], ids[:, 1:])
    assert loss.dtype == torch.float32
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * out.loss.item()


def test_gradients_match_transformers():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=101, seq_len=32, gelu="erf")
    hf, mine = paired(cfg, seed=7)
    hf.train(), mine.train()
    ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(1))
    hf(ids, labels=ids).loss.backward()
    lm_loss(mine(ids)[:, :-1], ids[:, 1:]).backward()
    hf_grads = to_mine({n: p.grad for n, p in hf.named_parameters()})
    for name, p in mine.named_parameters():
        assert rel_err(p.grad, hf_grads[name]) < 1e-4, name


def test_matches_transformers_sdpa():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=90, seq_len=64, gelu="erf")
    hf, mine = paired(cfg, seed=3, attn="sdpa")
    ids = torch.randint(0, 90, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(mine(ids), hf(ids).logits) < 1e-5


def test_published_reference_loads_in_transformers(tmp_path):
    """config_to_hf + our state_dict saved as safetensors is a directory from_pretrained can open."""
    from safetensors.torch import save_file

    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=128, seq_len=64, gelu="erf")
    mine = GPTNeoX(cfg).eval()
    init_weights(mine, seed=5)
    randomize(mine, 11)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype="float32")))
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, tmp_path / "model.safetensors")
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(mine(ids), hf(ids).logits) < 1e-5


# -- the module's own contract ------------------------------------------------------------------------------
def test_state_dict_is_the_canonical_parameter_dict():
    cfg = ModelConfig(n_layers=3, hidden=64, heads=4, vocab=96, seq_len=32)
    model = GPTNeoX(cfg)
    model(torch.zeros(1, 8, dtype=torch.long))  # fills the rotary cache: still no buffers
    sd = model.state_dict()
    shapes = cfg.param_shapes()
    assert list(sd) == list(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert list(model.buffers()) == []
    assert [n for n, _ in model.named_parameters()] == list(shapes)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params
    # same names as transformers (whose head is lm_head in memory)
    assert set(to_mine(hf_model(cfg).state_dict())) == set(shapes)


def test_flash_and_global_agree_fp32_forward_and_backward():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=80, seq_len=64)
    model = GPTNeoX(cfg)
    init_weights(model, seed=1)
    randomize(model, 2)
    ids = torch.randint(0, 80, (2, 64), generator=torch.Generator().manual_seed(3))
    results = {}
    for kind in ("flash", "global"):
        model.set_attention(kind)
        assert model.attention == kind and model.config.attention == kind
        model.zero_grad()
        logits = model(ids)
        lm_loss(logits, ids).backward()
        results[kind] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel_err(results["flash"][0], results["global"][0]) < 1e-5
    for name, grad in results["global"][1].items():
        assert rel_err(results["flash"][1][name], grad) < 1e-4, name
    with pytest.raises(RetraceError):
        model.set_attention("sparse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_stays_close(dtype):
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=80, seq_len=64)
    ref = GPTNeoX(cfg)
    init_weights(ref, seed=4)
    ids = torch.randint(0, 80, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids)
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    for kind in ("flash", "global"):
        model = GPTNeoX(cfg.replace(attention=kind))
        model.load_state_dict(ref.state_dict())
        model.to(dtype)
        logits = model(ids)
        assert logits.dtype == dtype
        assert rel_err(logits.detach(), want) < tol
        loss = lm_loss(logits, ids)
        assert loss.dtype == torch.float32
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())


def test_autocast_uses_the_autocast_dtype_for_rotary():
    cfg = ModelConfig(n_layers=1, hidden=32, heads=2, vocab=40, seq_len=16)
    model = GPTNeoX(cfg)
    ids = torch.randint(0, 40, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert (16, torch.device("cpu"), torch.bfloat16) in model.rotary._cache


def test_gelu_tanh_formula_and_difference_from_erf():
    from retrace.model import MLP

    mlp = MLP(ModelConfig(n_layers=1, hidden=16, heads=2, vocab=10))
    x = torch.linspace(-6, 6, 2001)
    hand = 0.5 * x.double() * (1 + torch.tanh(0.79788456 * x.double() * (1 + 0.044715 * x.double() ** 2)))
    got = torch.nn.functional.gelu(x, approximate=mlp.approximate)
    assert mlp.approximate == "tanh"
    assert (got.double() - hand).abs().max().item() < 1e-6
    # whole network: tanh vs erf differ measurably but slightly
    erf_cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=80, seq_len=32, gelu="erf")
    a = GPTNeoX(erf_cfg)
    init_weights(a, seed=6)
    b = GPTNeoX(erf_cfg.replace(gelu="tanh"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 80, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = rel_err(b(ids), a(ids))
    assert 1e-6 < diff < 1e-2


def test_rotary_tables():
    cfg = ModelConfig(n_layers=1, hidden=256, heads=2, vocab=10, seq_len=2048)  # head 128, rotary 32
    model = GPTNeoX(cfg)
    r = cfg.rotary_dims
    assert r == 32
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    ang = torch.arange(2048).float()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    cos, sin = model.rotary.get(2048, torch.device("cpu"), torch.float32)
    assert torch.equal(cos, ang.cos()) and torch.equal(sin, ang.sin())
    cos16, _ = model.rotary.get(2048, torch.device("cpu"), torch.float16)
    assert torch.equal(cos16, ang.cos().half())
    # GPT-NeoX v1.0 under DeepSpeed: inv_freq and positions in fp16, angles rounded to fp16.
    neox = GPTNeoX(cfg.replace(rotary_angles="neox"))
    pos16 = torch.arange(2048).half()
    ang16 = pos16[:, None] * inv.half()[None, :]
    want = torch.cat((ang16, ang16), dim=-1).float().cos().half()
    got, _ = neox.rotary.get(2048, torch.device("cpu"), torch.float16)
    assert torch.equal(got, want)
    assert not torch.equal(got, cos16)  # the rounding is real at large positions
    assert torch.equal(neox.rotary.get(2048, torch.device("cpu"), torch.float32)[0], cos)


def test_rotation_is_half_split():
    """Dim i pairs with dim i + r/2 (GPT-NeoX layout), not with dim i+1 (interleaved)."""
    from retrace.model import rotate_half

    x = torch.arange(8.0)
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=80, seq_len=32)
    plain = GPTNeoX(cfg)
    init_weights(plain, seed=8)
    ckpt = GPTNeoX(cfg, checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 80, (2, 32), generator=torch.Generator().manual_seed(0))
    la, lb = lm_loss(plain(ids), ids), lm_loss(ckpt(ids), ids)
    la.backward(), lb.backward()
    assert torch.equal(la, lb)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-8), n


def test_training_after_inference_mode():
    """Rotary tables cached under inference_mode must still be usable for backward."""
    cfg = ModelConfig(n_layers=1, hidden=32, heads=2, vocab=40, seq_len=16)
    model = GPTNeoX(cfg)
    ids = torch.randint(0, 40, (1, 16))
    with torch.inference_mode():
        model(ids)
    lm_loss(model(ids), ids).backward()
    assert model.gpt_neox.layers[0].attention.query_key_value.weight.grad is not None


def test_meta_device_construction():
    cfg = pythia_config("1b")
    model = GPTNeoX(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params


def test_bad_inputs():
    cfg = ModelConfig(n_layers=1, hidden=32, heads=2, vocab=40, seq_len=16)
    model = GPTNeoX(cfg)
    with pytest.raises(RetraceError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(RetraceError, match="batch, seq"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(RetraceError, match="do not match"):
        lm_loss(torch.zeros(1, 4, 40), torch.zeros(1, 5, dtype=torch.long))


# -- ModelConfig ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"heads": 3}, "divisible"),
        ({"hidden": 0}, "positive integer"),
        ({"n_layers": 2.0}, "positive integer"),
        ({"vocab": True}, "positive integer"),
        ({"rotary_pct": 1.5}, r"\[0, 1\]"),
        ({"hidden": 36, "rotary_pct": 0.3}, "even"),  # head 18 · 0.3 → int 5
        ({"gelu": "relu"}, "gelu"),
        ({"attention": "sparse"}, "attention"),
        ({"init": "xavier"}, "init"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"rotary_base": float("nan")}, "rotary_base"),
        ({"rotary_angles": "fp16"}, "rotary_angles"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(RetraceError, match=message):
        ModelConfig(**{"n_layers": 2, "hidden": 32, "heads": 2, "vocab": 10, **changes})


def test_config_properties():
    cfg = pythia_config("2.8b")
    assert (cfg.head_dim, cfg.rotary_dims, cfg.intermediate) == (80, 20, 10240)
    assert pythia_config("1b").rotary_dims == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden = 3


# -- registry ---------------------------------------------------------------------------------------------
KNOWN_PARAMS = {
    "14m": 14_067_712,
    "31m": 30_494_720,
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}


def test_registry_parameter_counts():
    assert list(PYTHIA_SIZES) == list(KNOWN_PARAMS)
    for name, cfg in PYTHIA_SIZES.items():
        L, h, V = cfg.n_layers, cfg.hidden, cfg.vocab
        assert cfg.n_params == KNOWN_PARAMS[name], name
        assert cfg.n_params == 2 * V * h + L * (12 * h * h + 13 * h) + 2 * h, name
        assert cfg.seq_len == 2048 and cfg.rotary_pct == 0.25 and cfg.rotary_base == 10000
        assert cfg.gelu == "tanh" and cfg.norm_eps == 1e-5
    assert {n: c.vocab for n, c in PYTHIA_SIZES.items() if c.vocab != 50304} == {"6.9b": 50432, "12b": 50688}
    assert {n for n, c in PYTHIA_SIZES.items() if c.init == "normal_scaled"} == {"6.9b", "12b"}
    assert (PYTHIA_SIZES["12b"].n_layers, PYTHIA_SIZES["12b"].heads) == (36, 40)


def test_pythia_names():
    assert pythia_size("70m") == "70m"
    assert pythia_size("pythia-1.4b") == "1.4b"
    assert pythia_size("EleutherAI/pythia-410m-deduped") == "410m"
    assert pythia_size("EleutherAI/pythia-160m-seed3") == "160m"
    assert pythia_size("EleutherAI/pythia-12b-deduped-v0") == "12b"
    assert pythia_size("EleutherAI/neox-ckpt-pythia-70m-deduped-v1") == "70m"
    assert pythia_config("pythia-70m", attention="global").attention == "global"
    for bad in ("13b", "pythia-70m-chat", "gpt2", "70"):
        with pytest.raises(RetraceError, match="known sizes"):
            pythia_size(bad)


# -- Hugging Face config.json ------------------------------------------------------------------------------
PYTHIA_70M_HUB_CONFIG = {  # EleutherAI/pythia-70m config.json (2023 layout)
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}


def test_config_from_published_hf_config(tmp_path):
    assert config_from_hf(PYTHIA_70M_HUB_CONFIG) == pythia_config("70m", gelu="erf")
    assert config_from_hf(PYTHIA_70M_HUB_CONFIG, gelu="tanh") == pythia_config("70m")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PYTHIA_70M_HUB_CONFIG))
    assert config_from_hf(path, gelu="tanh", attention="global") == pythia_config("70m", attention="global")
    # transformers 5 layout: rope_parameters instead of the old keys
    new = {k: v for k, v in PYTHIA_70M_HUB_CONFIG.items() if k not in ("rotary_pct", "rotary_emb_base")}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert config_from_hf(new) == pythia_config("70m", gelu="erf", rotary_pct=0.5)
    # 12b shape → its registry init
    big = {
        **PYTHIA_70M_HUB_CONFIG,
        "hidden_size": 5120,
        "intermediate_size": 20480,
        "num_attention_heads": 40,
        "num_hidden_layers": 36,
        "vocab_size": 50688,
    }
    assert config_from_hf(big, gelu="tanh") == pythia_config("12b")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_parallel_residual": False}, "use_parallel_residual"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"intermediate_size": 1000}, "intermediate_size"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000}}, "rope_type"),
        ({"num_attention_heads": 7}, "divisible"),
        ({"hidden_dropout": 0.1}, "hidden_dropout"),
    ],
)
def test_config_from_hf_rejects(changes, message):
    with pytest.raises(RetraceError, match=message):
        config_from_hf({**PYTHIA_70M_HUB_CONFIG, **changes})
    broken = dict(PYTHIA_70M_HUB_CONFIG)
    del broken["num_hidden_layers"]
    with pytest.raises(RetraceError, match="num_hidden_layers"):
        config_from_hf(broken)


def test_config_hf_round_trip_and_transformers_loads_it():
    tiny = ModelConfig(
        n_layers=2, hidden=48, heads=3, vocab=70, seq_len=128, rotary_pct=0.5, rotary_base=500, norm_eps=1e-6
    )
    for cfg in [*PYTHIA_SIZES.values(), tiny, tiny.replace(gelu="erf")]:
        hf_dict = config_to_hf(cfg, dtype="float16")
        assert config_from_hf(json.loads(json.dumps(hf_dict)), init=cfg.init) == cfg
        hf_cfg = GPTNeoXConfig.from_dict(hf_dict)
        assert (hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.vocab_size) == (
            cfg.n_layers,
            cfg.hidden,
            cfg.vocab,
        )
        assert hf_cfg.rope_parameters["partial_rotary_factor"] == cfg.rotary_pct
        assert hf_cfg.rope_parameters["rope_theta"] == cfg.rotary_base
        assert hf_cfg.use_parallel_residual and not hf_cfg.tie_word_embeddings
    # the published-config spelling of the activation
    assert config_to_hf(pythia_config("70m"), hidden_act="gelu")["hidden_act"] == "gelu"
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(config_to_hf(tiny)))
    shapes = {k: tuple(v.shape) for k, v in to_mine(hf.state_dict()).items()}
    assert shapes == tiny.param_shapes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_attention_is_neox_global_in_half(dtype):
    """scores = baddbmm(q, kᵀ, alpha) in the half type, softmax computed in fp32 and rounded (what NeoX's
    fused upper-triangular softmax kernel does), probs @ v in the half type."""
    from retrace.model import _global_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    scale = 1 / math.sqrt(D)
    scores = torch.baddbmm(
        torch.zeros(B * H, T, T, dtype=dtype),
        q.reshape(B * H, T, D),
        k.reshape(B * H, T, D).transpose(1, 2),
        beta=0.0,
        alpha=scale,
    )
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.float().masked_fill(causal, float("-inf")), dim=-1).to(dtype)
    want = torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, T, D)
    assert torch.equal(_global_attention(q, k, v, scale), want)
