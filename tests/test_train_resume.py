"""Resume: a real SIGTERM mid-run then a restart ends bit-identical; a corrupt state falls back; a
GPT-NeoX native checkpoint with ZeRO-1 optimizer files continues exactly."""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrace.train import TrainConfig, train
from test_train_helpers import (
    check_sigterm_then_restart,
    load_ckpt,
    make_reference,
    masters,
    tiny_config,
)

B, SEQ = 8, 32


def test_sigterm_then_restart_is_bit_identical(world):
    check_sigterm_then_restart(world, gpus=1)


def test_corrupt_newest_state_falls_back_to_the_previous(world):
    cfg = TrainConfig(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / "fb"),
                      steps=20, recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, pdbs=8,
                      gas=1, precision="fp16", threads=1, progress=False)
    train(cfg)
    out = world / "fb"
    want = load_ckpt(out / "checkpoints" / "step20.safetensors")
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step16", "step20"]
    (out / "checkpoints" / "manifest.json").unlink()
    f = out / "state" / "step20" / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="step20 is unusable"):
        res = train(cfg)
    assert res.final_step == 20
    got = load_ckpt(out / "checkpoints" / "step20.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    run = json.loads((out / "run.json").read_text())
    assert run["attempts"][-1]["resumed_from"] == 16


# ---- GPT-NeoX native checkpoint with ZeRO-1 optimizer state ------------------------------------------------

def _neox_layer_key(name: str) -> tuple[int, str]:
    """Canonical name → (layer-spec index, NeoX key) for a pipeline checkpoint (L = 2)."""
    L = tiny_config().n_layers
    if name == "gpt_neox.embed_in.weight":
        return 0, "word_embeddings.weight"
    if name == "embed_out.weight":
        return L + 4, "final_linear.weight"
    if name.startswith("gpt_neox.final_layer_norm."):
        return L + 3, "norm." + name.rsplit(".", 1)[1]
    i, key = name[len("gpt_neox.layers."):].split(".", 1)
    return int(i) + 2, key


def _partition(flat: torch.Tensor, dp: int, max_elems: int) -> list[list[torch.Tensor]]:
    """DeeperSpeed stage-1 sub-partitions [rank][comm interval], elastic (tail padding removed)."""
    n = flat.numel()
    aligned_param, aligned_comm = math.ceil(n / dp), max_elems // dp
    if aligned_param <= aligned_comm:
        count, size = 1, aligned_param
    else:
        count, size = math.ceil(aligned_param / aligned_comm), aligned_comm
    padded = torch.cat([flat, torch.zeros(count * size * dp - n, dtype=flat.dtype)])
    out = []
    for r in range(dp):
        parts = []
        for j in range(count):
            start = (j * dp + r) * size
            parts.append(padded[start:start + size][: max(0, min(size, n - start))].clone())
        out.append(parts)
    return out


class _FakeDynamicLossScaler:  # pickled under DeepSpeed's class path when deepspeed is not installed
    pass


def _loss_scaler_object(state: dict):
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

        obj = DynamicLossScaler.__new__(DynamicLossScaler)
        fake = None
    except ImportError:
        import types

        fake = {}
        for mod in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler"):
            fake[mod] = types.ModuleType(mod)
        cls = type("DynamicLossScaler", (), {"__module__": "deepspeed.runtime.fp16.loss_scaler"})
        fake["deepspeed.runtime.fp16.loss_scaler"].DynamicLossScaler = cls
        obj = cls.__new__(cls)
    obj.__dict__.update({"cur_scale": state["scale"], "cur_iter": state["cur_iter"],
                         "last_overflow_iter": state["last_overflow_iter"], "scale_factor": state["factor"],
                         "scale_window": state["window"], "min_scale": state["min_scale"],
                         "delayed_shift": state["delayed_shift"], "cur_hysteresis": state["hysteresis"],
                         "consecutive_hysteresis": False, "raise_error_at_min_scale": True, "dynamic": True})
    return obj, fake


def write_neox_checkpoint(dest: Path, step: int, state_dir: Path, weights: dict[str, torch.Tensor],
                          dp: int = 2, max_elems: int = 3000) -> Path:
    """A GPT-NeoX v1.0 pipeline checkpoint dir with DeeperSpeed ZeRO-1 (elastic) optimizer files, built
    from one of our resume states (so that continuing from it can be checked exactly)."""
    from retrace.model import config_to_hf
    from retrace.train.neox_state import neox_group_order

    meta = json.loads((state_dir / "state.json").read_text())
    eng = meta["engine"]
    tensors = load_file(str(state_dir / "tensors.safetensors"))
    shapes = {n: tuple(s) for n, s in tiny_config().param_shapes().items()}
    per_name = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for gi, g in enumerate(eng["groups"]):
        off = 0
        for n in g["names"]:
            k = math.prod(shapes[n])
            for key in per_name:
                per_name[key][n] = tensors[f"group{gi}.{key}"][off:off + k]
            off += k
    d = dest / f"global_step{step}"
    d.mkdir(parents=True)
    (dest / "latest").write_text(f"global_step{step}")
    (d / "config.json").write_text(json.dumps(config_to_hf(tiny_config(), dtype="float16", hidden_act="gelu")))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in weights.items():
        idx, key = _neox_layer_key(name)
        layers.setdefault(idx, {})[key] = t
    for idx, sd in layers.items():
        torch.save(sd, d / f"layer_{idx:02d}-model_00-model_states.pt")
    torch.save({"iteration": step, "global_steps": step, "skipped_steps": 0, "module": None, "optimizer": None,
                "lr_scheduler": {"num_iters": eng["lr_iter"], "start_lr": 2e-3, "warmup_iter": 1,
                                 "decay_style": "cosine", "end_iter": 100, "min_lr": 1e-4},
                "dp_world_size": dp, "mp_world_size": 1}, d / "mp_rank_00_model_states.pt")
    order = neox_group_order(tiny_config().n_layers)
    parts = {key: [_partition(torch.cat([per_name[key][n] for n in names]), dp, max_elems) for names in order]
             for key in per_name}
    assert any(len(p[0]) > 1 for p in parts["master"]), "fixture should span several comm intervals"
    # param_shapes as DeepSpeed records them: pipeline-module names in NeoX module order (attention is
    # registered before post_attention_layernorm there, unlike Hugging Face's order)
    L = tiny_config().n_layers
    module_order = ["gpt_neox.embed_in.weight"]
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        module_order += [p + k for k in ("input_layernorm.weight", "input_layernorm.bias",
                                         "attention.query_key_value.weight", "attention.query_key_value.bias",
                                         "attention.dense.weight", "attention.dense.bias",
                                         "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                                         "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                                         "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")]
    module_order += ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]
    param_shapes = OrderedDict()
    for n in module_order:
        idx, key = _neox_layer_key(n)
        param_shapes[f"{idx}.{key}"] = torch.Size(shapes[n])
    scaler, fake = _loss_scaler_object(eng["loss_scaler"])
    saved = {m: sys.modules.get(m) for m in (fake or {})}
    sys.modules.update(fake or {})
    try:
        for r in range(dp):
            osd = {
                "loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False,
                "base_optimizer_state": [[{"exp_avg": parts["exp_avg"][g][r][j], "exp_avg_sq": parts["exp_avg_sq"][g][r][j]}
                                          for j in range(len(parts["master"][g][r]))] for g in range(2)],
                "local_sub_partitions_of_fp32_groups": [parts["master"][g][r] for g in range(2)],
                "zero_stage": 1, "partition_count": dp,
                "num_comm_intervals_per_group": [len(parts["master"][g][r]) for g in range(2)],
            }
            torch.save({"optimizer_state_dict": osd, "param_shapes": param_shapes},
                       d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v
    return d


def test_resume_from_neox_checkpoint_with_zero_state_continues_exactly(world):
    common = dict(data=str(world / "data" / "tiny"), recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100,
                  lr=2e-3, pdbs=4, gas=2, precision="fp16", threads=1, progress=False)
    full = world / "neox_full"
    train(TrainConfig(reference=str(world / "ref"), out=str(full), steps=16, **common))
    weights8 = load_ckpt(full / "checkpoints" / "step8.safetensors")
    neox = write_neox_checkpoint(world / "neox_ckpt", 8, full / "state" / "step8", weights8)

    from retrace.train.neox_state import open_optimizer_state

    opt = open_optimizer_state(str(neox))
    assert opt is not None and opt.lr_iter == 8 and opt.step == 8 and opt.loss_scaler["scale"] == 4096

    cont = world / "neox_cont"
    res = train(TrainConfig(reference=str(neox), start_step=8, out=str(cont), steps=16, **common))
    assert res.saved_steps == [8, 16]
    a, b = load_ckpt(full / "checkpoints" / "step16.safetensors"), load_ckpt(cont / "checkpoints" / "step16.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = masters(full, 16), masters(cont, 16)
    assert all(torch.equal(ma[k], mb[k]) for k in ("group0.master", "group1.master", "group0.exp_avg_sq"))
    run = json.loads((cont / "run.json").read_text())
    src = run["optimizer_state_from"]
    assert src["adam_steps"] == 8 and src["adam_resume"] == "continue" and src["adam_t"] == 8 + 1
    assert run["arguments"]["adam_resume"] == "continue"

    # "As GPT-NeoX resumes" (reference §7 item 2): DeeperSpeed's elastic checkpoint restores the moments
    # but not apex's counter, which stays at the constructor's init step: t = 1, so the first update after
    # the restart uses t = 2, larger than the original's t = 10; the run is recorded as such.
    restarted = world / "neox_restarted"
    train(TrainConfig(reference=str(neox), start_step=8, out=str(restarted), steps=16, adam_resume="neox", **common))
    run = json.loads((restarted / "run.json").read_text())
    assert run["optimizer_state_from"]["adam_resume"] == "neox" and run["optimizer_state_from"]["adam_t"] == 1
    r = load_ckpt(restarted / "checkpoints" / "step16.safetensors")
    assert not all(torch.equal(a[k], r[k]) for k in a)

    # Control: the same weights without the optimizer state (HF layout: fresh Adam) do not continue exactly.
    hf8 = world / "hf8"
    make_reference(hf8)  # for config.json
    from retrace.checkpoints import save_params

    save_params(weights8, hf8 / "model.safetensors")
    ctrl = world / "hf_cont"
    train(TrainConfig(reference=str(hf8), start_step=8, out=str(ctrl), steps=16, **common))
    c = load_ckpt(ctrl / "checkpoints" / "step16.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)

    # A start step the NeoX directory does not have is refused before any compute.
    from retrace.errors import RetraceError

    with pytest.raises(RetraceError, match="not --start-step 4"):
        train(TrainConfig(reference=str(neox), start_step=4, out=str(world / "neox_bad"), steps=16, **common))
