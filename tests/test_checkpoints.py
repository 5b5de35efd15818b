"""retrace.checkpoints: every checkpoint format reads as the same canonical parameters, safely.

Tiny checkpoints of each format are built here from one set of hand-made GPT-NeoX tensor-parallel
shards; the expected canonical tensors are merged by hand (cat / sum / mean written out), never by
the code under test.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from retrace.checkpoints import (
    BUFFER_SUFFIXES,
    NeoXReader,
    OpaqueObject,
    ParamReader,
    SafetensorsReader,
    TorchBinReader,
    check_fits,
    is_buffer_name,
    load_client_state,
    load_params,
    load_zero_optimizer_state,
    open_config,
    open_params,
    parse_source,
    save_params,
    zero_optimizer_files,
)
from retrace.errors import RetraceError
from retrace.pythia.sizes import ModelConfig, config_to_hf

CFG = ModelConfig(n_layers=2, hidden=32, heads=4, vocab=64, seq_len=32)
MP = 2

LAYER_KEYS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.rotary_emb.inv_freq",
    "attention.dense.weight",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)


# --- builders -------------------------------------------------------------------------------------


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    # Multiples of 1/64 in [-2, 2]: sums and means of two shards are exact in fp16.
    return (torch.randint(-128, 129, shape, generator=gen).float() / 64).half()


def neox_shards(
    cfg: ModelConfig = CFG, mp: int = MP, seed: int = 0
) -> dict[int, list[dict[str, torch.Tensor]]]:
    """layer-spec index → per-rank state dicts, as GPT-NeoX v1.0 saves a tensor-parallel model."""
    gen = torch.Generator().manual_seed(seed)
    h, f, v = cfg.hidden, cfg.intermediate, cfg.vocab
    L = cfg.n_layers
    out: dict[int, list[dict[str, torch.Tensor]]] = {}
    out[0] = [{"word_embeddings.weight": _rand(gen, v // mp, h)} for _ in range(mp)]
    for i in range(L):
        ranks = []
        for _ in range(mp):
            ranks.append(
                {
                    "input_layernorm.weight": _rand(gen, h),
                    "input_layernorm.bias": _rand(gen, h),
                    "attention.query_key_value.weight": _rand(gen, 3 * h // mp, h),
                    "attention.query_key_value.bias": _rand(gen, 3 * h // mp),
                    "attention.rotary_emb.inv_freq": torch.ones(cfg.rotary_dims // 2, dtype=torch.float16),
                    "attention.dense.weight": _rand(gen, h, h // mp),
                    "attention.dense.bias": _rand(gen, h),
                    "post_attention_layernorm.weight": _rand(gen, h),
                    "post_attention_layernorm.bias": _rand(gen, h),
                    "mlp.dense_h_to_4h.weight": _rand(gen, f // mp, h),
                    "mlp.dense_h_to_4h.bias": _rand(gen, f // mp),
                    "mlp.dense_4h_to_h.weight": _rand(gen, h, f // mp),
                    "mlp.dense_4h_to_h.bias": _rand(gen, h),
                }
            )
        out[i + 2] = ranks
    out[L + 3] = [{"norm.weight": _rand(gen, h), "norm.bias": _rand(gen, h)} for _ in range(mp)]
    out[L + 4] = [{"final_linear.weight": _rand(gen, v // mp, h)} for _ in range(mp)]
    return out


def merge_by_hand(shards: dict[int, list[dict[str, torch.Tensor]]], n_layers: int) -> dict[str, torch.Tensor]:
    """The GPT-NeoX v1.0 converter's rules, written out independently of retrace."""

    def ranks(idx, key):
        return [st[key] for st in shards[idx]]

    def total(ts):
        acc = ts[0]
        for t in ts[1:]:
            acc = acc + t
        return acc

    out = {"gpt_neox.embed_in.weight": torch.cat(ranks(0, "word_embeddings.weight"), 0)}
    for i in range(n_layers):
        idx, p = i + 2, f"gpt_neox.layers.{i}."
        for key in (
            "input_layernorm.weight",
            "input_layernorm.bias",
            "post_attention_layernorm.weight",
            "post_attention_layernorm.bias",
        ):
            out[p + key] = total(ranks(idx, key)) / len(shards[idx])
        for key in (
            "attention.query_key_value.weight",
            "attention.query_key_value.bias",
            "mlp.dense_h_to_4h.weight",
            "mlp.dense_h_to_4h.bias",
        ):
            out[p + key] = torch.cat(ranks(idx, key), 0)
        for key in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
            out[p + key] = torch.cat(ranks(idx, key), 1)
        for key in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
            out[p + key] = total(ranks(idx, key))
    L = n_layers
    out["gpt_neox.final_layer_norm.weight"] = total(ranks(L + 3, "norm.weight")) / len(shards[L + 3])
    out["gpt_neox.final_layer_norm.bias"] = total(ranks(L + 3, "norm.bias")) / len(shards[L + 3])
    out["embed_out.weight"] = torch.cat(ranks(L + 4, "final_linear.weight"), 0)
    return out


def client_state(iteration: int = 7) -> dict:
    """GPT-NeoX v1.0's client state + DeeperSpeed's engine state (numpy RNG state included)."""
    import random

    return {
        "iteration": iteration,
        "args": {
            "num_layers": CFG.n_layers,
            "hidden_size": CFG.hidden,
            "padded_vocab_size": CFG.vocab,
            "model_parallel_size": MP,
        },
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.RandomState(1234).get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
        "lr_scheduler": {
            "start_lr": 1e-3,
            "warmup_iter": 1430,
            "num_iters": iteration,
            "decay_style": "cosine",
            "end_iter": 143000,
            "min_lr": 1e-4,
        },
        "optimizer": None,
        "csr_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 1024,
        "dp_world_size": 1,
        "mp_world_size": MP,
    }


NEOX_YML = {
    "num-layers": CFG.n_layers,
    "hidden-size": CFG.hidden,
    "num-attention-heads": CFG.heads,
    "max-position-embeddings": CFG.seq_len,
    "rotary-pct": 0.25,
    "no-weight-tying": True,
    "gpt-j-residual": True,
    "activation": "gelu",
    "model-parallel-size": MP,
}


def write_neox_pipeline(root: Path, shards, step: int = 7) -> Path:
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    for idx, ranks in shards.items():
        for r, st in enumerate(ranks):
            torch.save(st, d / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
    for r in range(len(shards[0])):
        torch.save({"module": None, **client_state(step)}, d / f"mp_rank_{r:02d}_model_states.pt")
    write_neox_yml(d)
    (root / "latest").write_text(f"global_step{step}")
    return d


def write_neox_yml(step_dir: Path) -> None:
    import yaml

    (step_dir / "configs").mkdir()
    (step_dir / "configs" / "pythia-tiny.yml").write_text(yaml.safe_dump(NEOX_YML))


def write_neox_sequential(root: Path, shards, step: int = 7) -> Path:
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    for r in range(len(shards[0])):
        module = {f"sequential.{idx}.{k}": v for idx, ranks in shards.items() for k, v in ranks[r].items()}
        torch.save({"module": module, **client_state(step)}, d / f"mp_rank_{r:02d}_model_states.pt")
    write_neox_yml(d)
    (root / "latest").write_text(f"global_step{step}\n")
    return d


def with_buffers(params: dict[str, torch.Tensor], n_layers: int, seq: int = 8) -> dict[str, torch.Tensor]:
    """A 2023-era HF state dict: the per-layer uint8 mask, masked_bias and inv_freq buffers added."""
    out = dict(params)
    for i in range(n_layers):
        p = f"gpt_neox.layers.{i}.attention."
        out[p + "bias"] = torch.tril(torch.ones(seq, seq, dtype=torch.uint8)).view(1, 1, seq, seq)
        out[p + "masked_bias"] = torch.tensor(-1e9)
        out[p + "rotary_emb.inv_freq"] = torch.ones(2, dtype=torch.float16)
    return out


def write_bin(d: Path, state: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "pytorch_model.bin")
    return d


def write_sharded(d: Path, state: dict[str, torch.Tensor], n: int, kind: str) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for k in range(n):
        part = {name: state[name].contiguous() for name in names[k::n]}
        if kind == "bin":
            fname = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
            torch.save(part, d / fname)
        else:
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, d / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    (d / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return d


def write_config(d: Path, cfg: ModelConfig = CFG) -> None:
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype="float16", hidden_act="gelu")))


@pytest.fixture(scope="module")
def shards():
    return neox_shards()


@pytest.fixture(scope="module")
def expected(shards):
    return merge_by_hand(shards, CFG.n_layers)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, shards, expected) -> dict[str, Path]:
    """Every format, written from the same parameters: name → path to open."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    st = root / "safetensors"
    save_params(expected, st / "model.safetensors")
    write_config(st)
    out["safetensors"] = st
    out["safetensors-file"] = st / "model.safetensors"
    out["safetensors-sharded"] = write_sharded(root / "st-sharded", expected, 3, "safetensors")
    legacy = with_buffers(expected, CFG.n_layers)
    legacy["lm_head.weight"] = legacy.pop("embed_out.weight")  # transformers 5.x in-memory name
    out["bin"] = write_bin(root / "bin", legacy)
    out["bin-sharded"] = write_sharded(root / "bin-sharded", with_buffers(expected, CFG.n_layers), 3, "bin")
    out["neox-pipeline"] = write_neox_pipeline(root / "neox-pipe", shards).parent  # via `latest`
    out["neox-pipeline-step"] = root / "neox-pipe" / "global_step7"
    out["neox-sequential"] = write_neox_sequential(root / "neox-seq", shards)
    return out


def assert_same(reader: ParamReader, expected: dict[str, torch.Tensor]) -> None:
    assert reader.names() == list(CFG.param_shapes()), reader
    for name in reader.names():
        got = reader.get(name)
        want = expected[name]
        assert got.dtype == want.dtype == reader.dtype(name), name
        assert tuple(got.shape) == reader.shape(name) == CFG.param_shapes()[name], name
        assert torch.equal(got, want), name


# --- every format, same tensors ---------------------------------------------------------------------

FORMAT_READERS = {
    "safetensors": SafetensorsReader,
    "safetensors-file": SafetensorsReader,
    "safetensors-sharded": SafetensorsReader,
    "bin": TorchBinReader,
    "bin-sharded": TorchBinReader,
    "neox-pipeline": NeoXReader,
    "neox-pipeline-step": NeoXReader,
    "neox-sequential": NeoXReader,
}


@pytest.mark.parametrize("fmt", list(FORMAT_READERS))
def test_every_format_reads_the_same_canonical_tensors(formats, expected, fmt):
    with open_params(formats[fmt]) as reader:
        assert isinstance(reader, FORMAT_READERS[fmt])
        assert_same(reader, expected)
        check_fits(reader, CFG)


@pytest.mark.parametrize("fmt", ["safetensors", "bin-sharded", "neox-sequential"])
def test_load_params_and_str_sources(formats, expected, fmt):
    params = load_params(str(formats[fmt]))
    assert list(params) == list(CFG.param_shapes())
    assert all(torch.equal(params[k], expected[k]) for k in params)


def test_neox_layout_detection(formats):
    with open_params(formats["neox-pipeline"]) as r:
        assert (r.layout, r.num_layers, r.mp) == ("pipeline", CFG.n_layers, MP)
        assert r.dir.name == "global_step7"
        assert "layer_02-model_00-model_states.pt" in r.location("gpt_neox.layers.0.attention.dense.bias")
    with open_params(formats["neox-sequential"] / "mp_rank_01_model_states.pt") as r:
        assert (r.layout, r.num_layers, r.mp) == ("sequential", CFG.n_layers, MP)


def test_neox_merge_rules_on_hand_built_shards(tmp_path):
    """Two ranks with readable numbers: cat on the right dims, biases summed, norms averaged."""
    h = 2
    cfg = ModelConfig(n_layers=1, hidden=h, heads=1, vocab=4, seq_len=8)
    t = torch.tensor
    layer = [
        {
            "input_layernorm.weight": t([1.0, 3.0]),
            "input_layernorm.bias": t([0.0, 2.0]),
            "post_attention_layernorm.weight": t([5.0, 5.0]),
            "post_attention_layernorm.bias": t([1.0, 1.0]),
            "attention.query_key_value.weight": t([[1.0, 1.0]] * 3),
            "attention.query_key_value.bias": t([1.0] * 3),
            "attention.rotary_emb.inv_freq": t([1.0]),
            "attention.dense.weight": t([[1.0], [2.0]]),
            "attention.dense.bias": t([1.0, 2.0]),
            "mlp.dense_h_to_4h.weight": t([[3.0, 3.0]] * 4),
            "mlp.dense_h_to_4h.bias": t([3.0] * 4),
            "mlp.dense_4h_to_h.weight": t([[1.0] * 4, [2.0] * 4]),
            "mlp.dense_4h_to_h.bias": t([0.5, 0.5]),
        },
        {
            "input_layernorm.weight": t([3.0, 5.0]),
            "input_layernorm.bias": t([2.0, 2.0]),
            "post_attention_layernorm.weight": t([1.0, 1.0]),
            "post_attention_layernorm.bias": t([1.0, 3.0]),
            "attention.query_key_value.weight": t([[2.0, 2.0]] * 3),
            "attention.query_key_value.bias": t([2.0] * 3),
            "attention.rotary_emb.inv_freq": t([9.0]),
            "attention.dense.weight": t([[3.0], [4.0]]),
            "attention.dense.bias": t([10.0, 20.0]),
            "mlp.dense_h_to_4h.weight": t([[4.0, 4.0]] * 4),
            "mlp.dense_h_to_4h.bias": t([4.0] * 4),
            "mlp.dense_4h_to_h.weight": t([[5.0] * 4, [6.0] * 4]),
            "mlp.dense_4h_to_h.bias": t([0.25, 1.5]),
        },
    ]
    shards = {
        0: [
            {"word_embeddings.weight": t([[1.0, 1.0], [2.0, 2.0]])},
            {"word_embeddings.weight": t([[3.0, 3.0], [4.0, 4.0]])},
        ],
        2: layer,
        4: [
            {"norm.weight": t([2.0, 4.0]), "norm.bias": t([0.0, 0.0])},
            {"norm.weight": t([4.0, 4.0]), "norm.bias": t([1.0, -1.0])},
        ],
        5: [
            {"final_linear.weight": t([[7.0, 7.0], [8.0, 8.0]])},
            {"final_linear.weight": t([[9.0, 9.0], [1.0, 1.0]])},
        ],
    }
    write_neox_pipeline(tmp_path, shards, step=3)
    with open_params(tmp_path) as r:
        check_fits(r, cfg)
        p = "gpt_neox.layers.0."
        assert r.get(p + "attention.dense.bias").tolist() == [11.0, 22.0]  # summed
        assert r.get(p + "mlp.dense_4h_to_h.bias").tolist() == [0.75, 2.0]  # summed
        assert r.get(p + "input_layernorm.weight").tolist() == [2.0, 4.0]  # averaged
        assert r.get(p + "input_layernorm.bias").tolist() == [1.0, 2.0]
        assert r.get(p + "post_attention_layernorm.weight").tolist() == [3.0, 3.0]
        assert r.get(p + "post_attention_layernorm.bias").tolist() == [1.0, 2.0]
        assert r.get("gpt_neox.final_layer_norm.weight").tolist() == [3.0, 4.0]
        assert r.get("gpt_neox.final_layer_norm.bias").tolist() == [0.5, -0.5]
        assert r.get(p + "attention.dense.weight").tolist() == [[1.0, 3.0], [2.0, 4.0]]  # cat dim 1
        assert r.get(p + "mlp.dense_4h_to_h.weight").tolist() == [
            [1.0] * 4 + [5.0] * 4,
            [2.0] * 4 + [6.0] * 4,
        ]
        assert r.get(p + "attention.query_key_value.weight").tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 3
        assert r.get(p + "attention.query_key_value.bias").tolist() == [1.0] * 3 + [2.0] * 3  # cat dim 0
        assert r.get(p + "mlp.dense_h_to_4h.bias").tolist() == [3.0] * 4 + [4.0] * 4
        assert r.get("gpt_neox.embed_in.weight").tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]
        assert r.get("embed_out.weight").tolist() == [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0], [1.0, 1.0]]
        assert not any("inv_freq" in n for n in r.names())


def test_neox_single_rank_passes_tensors_through(tmp_path):
    shards = neox_shards(mp=1, seed=3)
    write_neox_sequential(tmp_path, shards)
    with open_params(tmp_path) as r:
        assert r.mp == 1
        assert torch.equal(
            r.get("gpt_neox.layers.1.input_layernorm.weight"), shards[3][0]["input_layernorm.weight"]
        )


def test_neox_broken_layouts_are_named(tmp_path, shards):
    d = write_neox_pipeline(tmp_path / "a", shards)
    (d / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(RetraceError, match=r"missing layer_03-model_01-model_states.pt"):
        open_params(d)
    d = write_neox_pipeline(tmp_path / "b", shards)
    for r in range(MP):
        (d / f"layer_03-model_{r:02d}-model_states.pt").unlink()
    with pytest.raises(RetraceError, match=r"not a whole GPT-NeoX model.*missing \[3\]"):
        open_params(d)
    odd = {k: [dict(st) for st in v] for k, v in shards.items()}
    for st in odd[2]:
        st["attention.mystery.weight"] = torch.zeros(2)
    d = write_neox_pipeline(tmp_path / "c", odd)
    with pytest.raises(RetraceError, match=r"layer_02-model_00.*'attention.mystery.weight'.*no known"):
        open_params(d)
    write_neox_sequential(tmp_path / "d", shards, step=1)
    write_neox_sequential(tmp_path / "d", shards, step=2)
    (tmp_path / "d" / "latest").unlink()
    with pytest.raises(RetraceError, match="no 'latest' file and 2 checkpoints.*global_step1, global_step2"):
        NeoXReader(tmp_path / "d")
    write_neox_sequential(tmp_path / "e", shards, step=5)
    (tmp_path / "e" / "latest").unlink()
    with open_params(tmp_path / "e") as r:  # the only checkpoint
        assert r.dir.name == "global_step5"


def test_neox_training_state(formats, tmp_path, monkeypatch):
    state = load_client_state(formats["neox-pipeline"], mp=1)
    assert state["iteration"] == 7 and state["args"]["model_parallel_size"] == MP
    assert state["np_rng_state"][0] == "MT19937" and isinstance(state["np_rng_state"][1], np.ndarray)
    assert "module" not in state
    assert zero_optimizer_files(formats["neox-pipeline"]) == {}

    # A ZeRO-1 optimizer file as DeeperSpeed writes it: the loss scaler pickled by value.
    fake = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")

    class DynamicLossScaler:
        def __init__(self):
            self.cur_scale, self.cur_iter, self.cur_hysteresis = 4096.0, 12, 2

    DynamicLossScaler.__module__ = fake.__name__
    DynamicLossScaler.__qualname__ = "DynamicLossScaler"
    fake.DynamicLossScaler = DynamicLossScaler
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    step = formats["neox-pipeline-step"]
    zero = {
        "optimizer_state_dict": {
            "loss_scaler": DynamicLossScaler(),
            "dynamic_loss_scale": True,
            "overflow": False,
            "base_optimizer_state": [[{"step": 7, "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}]],
            "local_sub_partitions_of_fp32_groups": [[torch.arange(3.0)]],
            "zero_stage": 1,
            "partition_count": 1,
            "num_comm_intervals_per_group": [1],
        },
        "param_shapes": {"a": torch.Size([3])},
    }
    target = tmp_path / "global_step7"
    target.mkdir()
    for f in step.iterdir():
        if f.is_file():
            (target / f.name).symlink_to(f)
    torch.save(zero, target / "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    monkeypatch.delitem(sys.modules, fake.__name__)  # loading must not need (or import) DeepSpeed
    assert list(zero_optimizer_files(target)) == [(0, 1)]
    loaded = load_zero_optimizer_state(target, dp=0, mp=1)
    scaler = loaded["optimizer_state_dict"]["loss_scaler"]
    assert isinstance(scaler, OpaqueObject) and scaler.qualname.endswith("loss_scaler.DynamicLossScaler")
    assert scaler.cur_scale == 4096.0 and scaler.cur_hysteresis == 2
    assert torch.equal(
        loaded["optimizer_state_dict"]["local_sub_partitions_of_fp32_groups"][0][0], torch.arange(3.0)
    )
    with pytest.raises(RetraceError, match="no zero_pp_rank_3_mp_rank_00"):
        load_zero_optimizer_state(target, dp=3, mp=0)


# --- names and buffers -----------------------------------------------------------------------------


def test_buffer_suffixes_keep_real_biases():
    assert is_buffer_name("gpt_neox.layers.3.attention.bias")
    assert is_buffer_name("gpt_neox.layers.3.attention.masked_bias")
    assert is_buffer_name("gpt_neox.layers.3.attention.rotary_emb.inv_freq")
    assert is_buffer_name("gpt_neox.rotary_emb.inv_freq")
    for real in (
        "gpt_neox.layers.3.attention.dense.bias",
        "gpt_neox.layers.3.attention.query_key_value.bias",
        "gpt_neox.layers.3.mlp.dense_4h_to_h.bias",
        "gpt_neox.final_layer_norm.bias",
    ):
        assert not is_buffer_name(real), real
    assert BUFFER_SUFFIXES == (".attention.bias", ".masked_bias", "inv_freq")


def test_bin_with_buffers_and_lm_head(formats):
    raw = torch.load(formats["bin"] / "pytorch_model.bin", weights_only=True)
    assert raw["gpt_neox.layers.0.attention.bias"].dtype == torch.uint8  # ByteStorage, accepted
    assert "lm_head.weight" in raw and "embed_out.weight" not in raw
    with open_params(formats["bin"]) as r:
        names = r.names()
        assert "embed_out.weight" in names and "lm_head.weight" not in names
        assert "gpt_neox.layers.1.attention.dense.bias" in names
        assert "gpt_neox.layers.1.attention.query_key_value.bias" in names
        assert not [n for n in names if n.endswith(BUFFER_SUFFIXES)]
        assert torch.equal(r.get("embed_out.weight"), raw["lm_head.weight"])


def test_head_under_two_names_is_refused(tmp_path, expected):
    state = dict(expected)
    state["lm_head.weight"] = state["embed_out.weight"].clone()
    write_bin(tmp_path, state)
    with pytest.raises(RetraceError, match="both parameter embed_out.weight"):
        open_params(tmp_path)


# --- refusing unsafe or broken files -----------------------------------------------------------------


class _CreatesFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "sharded", "neox-mp_rank", "neox-layer"])
def test_malicious_pickle_is_refused_without_running(tmp_path, expected, how):
    marker = tmp_path / "PWNED"
    evil = _CreatesFile(marker)
    d = tmp_path / "ckpt"
    d.mkdir()
    if how == "pickle":
        bad = d / "pytorch_model.bin"
        bad.write_bytes(pickle.dumps({"gpt_neox.embed_in.weight": evil}))
    elif how == "torch.save":
        bad = d / "pytorch_model.bin"
        torch.save({"gpt_neox.embed_in.weight": torch.zeros(2), "x": evil}, bad)
    elif how == "sharded":
        write_sharded(d, dict(expected), 2, "bin")
        bad = d / "pytorch_model-00002-of-00002.bin"
        torch.save({"gpt_neox.embed_in.weight": evil}, bad)
    elif how == "neox-mp_rank":
        bad = d / "mp_rank_00_model_states.pt"
        torch.save({"module": {"sequential.0.word_embeddings.weight": torch.zeros(2)}, "args": evil}, bad)
    else:
        write_neox_pipeline(d, neox_shards())
        bad = d / "global_step7" / "layer_03-model_01-model_states.pt"
        torch.save({"input_layernorm.weight": evil}, bad)
    with pytest.raises(RetraceError) as err:
        with open_params(d) as r:
            r.to_dict()
    assert str(bad) in str(err.value)
    assert "refused to unpickle" in str(err.value)
    assert not marker.exists()


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "fmt, victim",
    [
        ("safetensors", "model.safetensors"),
        ("safetensors-sharded", "model-00002-of-00003.safetensors"),
        ("bin", "pytorch_model.bin"),
        ("bin-sharded", "pytorch_model-00003-of-00003.bin"),
        ("neox-pipeline-step", "layer_03-model_01-model_states.pt"),
        ("neox-sequential", "mp_rank_01_model_states.pt"),
    ],
)
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_is_one_clear_error(tmp_path, formats, fmt, victim, keep):
    import shutil

    src = formats[fmt]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    _cut(d / victim, keep)
    with pytest.raises(RetraceError) as err:
        with open_params(d) as r:
            for name in r.names():
                r.get(name)
    assert str(d / victim) in str(err.value)
    assert "truncated or corrupt" in str(err.value)


def test_missing_shard_is_named(tmp_path, expected):
    d = write_sharded(tmp_path, dict(expected), 3, "safetensors")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(RetraceError, match="shard model-00002-of-00003.safetensors is missing"):
        open_params(d)


# --- shapes ---------------------------------------------------------------------------------------


def test_check_fits_names_file_tensor_and_shapes(formats):
    with open_params(formats["safetensors"]) as r:
        check_fits(r, CFG)
        with pytest.raises(RetraceError) as err:
            check_fits(r, CFG.replace(vocab=128))
        msg = str(err.value)
        assert (
            "model.safetensors: tensor gpt_neox.embed_in.weight has shape [64, 32], expected [128, 32]" in msg
        )
        assert "embed_out.weight" in msg
        with pytest.raises(
            RetraceError,
            match=r"model.safetensors: tensor gpt_neox.layers.2.input_layernorm.weight is missing",
        ):
            check_fits(r, CFG.replace(n_layers=3))
        with pytest.raises(RetraceError, match=r"unexpected tensor gpt_neox.layers.1"):
            check_fits(r, CFG.replace(n_layers=1))
        check_fits(r, CFG.replace(n_layers=1), allow_extra=True)
    with open_params(formats["neox-pipeline"]) as r:
        with pytest.raises(
            RetraceError,
            match=r"layer_02-model_00-model_states.pt.*dense.weight has shape \[32, 32\], expected \[64, 64\]",
        ):
            check_fits(r, CFG.replace(hidden=64))


# --- saving ---------------------------------------------------------------------------------------


def test_save_params_roundtrip(tmp_path, expected):
    from safetensors import safe_open

    params = with_buffers(expected, CFG.n_layers)
    params["lm_head.weight"] = params.pop("embed_out.weight")
    w = params["gpt_neox.layers.0.attention.dense.weight"]
    params["gpt_neox.layers.0.attention.dense.weight"] = w.t().contiguous().t()  # non-contiguous view
    assert not params["gpt_neox.layers.0.attention.dense.weight"].is_contiguous()
    params["gpt_neox.layers.1.attention.dense.bias"] = torch.zeros(CFG.hidden, dtype=torch.float32)
    out = save_params(params, tmp_path / "sub" / "p.safetensors", metadata={"step": "7"})
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["p.safetensors"]
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}
        assert sorted(f.keys()) == sorted(CFG.param_shapes())
        for k in f.keys():
            want = params["lm_head.weight" if k == "embed_out.weight" else k]
            assert torch.equal(f.get_tensor(k), want), k
            assert f.get_tensor(k).dtype == want.dtype
    # and from a reader, streamed
    with open_params(out) as r:
        save_params(r, tmp_path / "copy.safetensors")
    assert load_params(tmp_path / "copy.safetensors").keys() == load_params(out).keys()


def test_failing_save_leaves_nothing(tmp_path, expected):
    class Broken(ParamReader):
        source = "broken"

        def names(self):
            return list(expected)

        def shape(self, name):
            return tuple(expected[name].shape)

        def dtype(self, name):
            return expected[name].dtype

        def get(self, name):
            if name.startswith("gpt_neox.layers.1"):
                raise OSError("disk vanished")
            return expected[name]

    d = tmp_path / "out"
    with pytest.raises(RetraceError, match="could not write parameters.*disk vanished"):
        save_params(Broken(), d / "p.safetensors")
    assert list(d.iterdir()) == []
    with pytest.raises(RetraceError, match="not a tensor"):
        save_params({"a": [1, 2]}, d / "q.safetensors")
    with pytest.raises(RetraceError, match="metadata"):
        save_params(expected, d / "q.safetensors", metadata={"step": 7})
    assert list(d.iterdir()) == []


# --- transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_transformers_saved_model_loads(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not is_buffer_name(k)}
    model.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    # transformers 5 writes safetensors either way; 4.x wrote pytorch_model.bin for safe=False, which
    # is also what torch.save(model.state_dict()) gives (in-memory names, lm_head included).
    torch.save(model.state_dict(), tmp_path / "state_dict.bin")
    for source in (tmp_path / "hf", tmp_path / "state_dict.bin"):
        with open_params(source) as r:
            assert r.names() == list(CFG.param_shapes())
            for name in r.names():
                assert torch.equal(r.get(name), sd[name]), (source, name)
            check_fits(r, CFG)
    from retrace.pythia.sizes import config_from_hf

    assert config_from_hf(open_config(tmp_path / "hf")).param_shapes() == CFG.param_shapes()


def test_saved_params_load_in_transformers(tmp_path, formats, expected):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "out"
    with open_params(formats["neox-pipeline"]) as r:
        save_params(r, d / "model.safetensors")
    write_config(d)
    model = transformers.GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float16)
    sd = model.state_dict()
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    for name, want in expected.items():
        assert torch.equal(sd[name], want), name


# --- sources and configs ---------------------------------------------------------------------------


def test_parse_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("EleutherAI/pythia-70m@step1000").revision == "step1000"
    s = parse_source("EleutherAI/pythia-70m")
    assert (s.kind, s.repo_id, s.revision, s.explicit) == ("hub", "EleutherAI/pythia-70m", "main", False)
    assert parse_source("hf://EleutherAI/pythia-70m").explicit
    (tmp_path / "EleutherAI").mkdir()
    (tmp_path / "EleutherAI" / "pythia-70m").mkdir()
    with pytest.raises(RetraceError, match=r"ambiguous.*'\./EleutherAI/pythia-70m'"):
        parse_source("EleutherAI/pythia-70m")  # a folder named like the repo never stands in for it
    assert parse_source("./EleutherAI/pythia-70m").kind == "local"
    assert parse_source(tmp_path / "EleutherAI" / "pythia-70m").kind == "local"
    assert parse_source("hf://EleutherAI/pythia-70m").kind == "hub"
    assert parse_source(tmp_path / "x.safetensors").kind == "local"
    assert parse_source("./not/here/model.safetensors").kind == "local"
    with pytest.raises(RetraceError, match="no such file"):
        open_params("./missing.safetensors")
    with pytest.raises(RetraceError, match="conflicting revisions"):
        open_params("a/b@step1", revision="step2")


def test_open_config(formats):
    assert open_config(formats["safetensors"])["hidden_size"] == CFG.hidden
    assert open_config(formats["safetensors-file"])["num_hidden_layers"] == CFG.n_layers
    neox = open_config(formats["neox-pipeline"])
    from retrace.pythia.sizes import config_from_hf

    assert config_from_hf(neox).param_shapes() == CFG.param_shapes()
    assert neox["vocab_size"] == CFG.vocab and neox["use_parallel_residual"] is True
    with pytest.raises(RetraceError, match="no config.json"):
        open_config(formats["bin"])


def test_training_state_allowlist_reads_numpy_1x_pickles(tmp_path):
    """2023 files pickled numpy under numpy.core.*; numpy 2 calls it numpy._core. Both load, data only."""
    import io

    from retrace.checkpoints import safe_torch_load

    buf = io.BytesIO()
    torch.save(
        {"np_rng_state": np.random.RandomState(1).get_state(), "lr": np.float64(2.5)},
        buf,
        _use_new_zipfile_serialization=False,
    )
    data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n" in data
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(data)
    state = safe_torch_load(path, training_state=True)
    assert np.array_equal(state["np_rng_state"][1], np.random.RandomState(1).get_state()[1])
    assert state["lr"] == 2.5
    with pytest.raises(RetraceError, match=r"refused to unpickle.*numpy.core.multiarray._reconstruct"):
        safe_torch_load(path)  # weights files get no numpy allowlist
