"""A saved step of a ``retrace train`` run → a GPT-NeoX v1.0 training checkpoint with ZeRO-1 optimizer files.

The NeoX-native PolyPythias repos (e.g. EleutherAI/neox-ckpt-pythia-410m-seed8) hold, at every published
step, the weights *and* DeeperSpeed's ZeRO-1 optimizer state, so a cell can start at any step N with the
exact fp32 master weights, Adam moments, loss scale and data position. An offline study needs a local
run published the same way; this module writes one step of it, the inverse of
``retrace.train.neox_state.open_optimizer_state`` (reference/pythia-neox.md §5, DeeperSpeed ``eb7f5cff``):

    out/global_step{N}/layer_XX-model_00-model_states.pt      weights (``retrace.neox.export``), fp16
    out/global_step{N}/mp_rank_00_model_states.pt              client state: iteration, global_steps,
        skipped_steps, dp_world_size and the LR scheduler's ``num_iters`` (GPT-NeoX's AnnealingLR
        ``state_dict``: ``megatron/learning_rates.py`` ~95-104 at v1.0)
    out/global_step{N}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt   for r < dp:
        {"optimizer_state_dict": <stage-1 elastic state_dict>, "param_shapes": <NeoX module names>}
        (the file ``DeepSpeedEngine._save_zero_checkpoint`` writes, ``runtime/engine.py`` ~1560-1575)
    out/latest                                                 "global_step{N}", written last

The stage-1 ``state_dict`` (``runtime/zero/stage1.py`` ~1000-1040, elastic is the default,
``zero/constants.py`` ~75): ``loss_scaler`` (the ``DynamicLossScaler`` object, pickled by class path),
``dynamic_loss_scale``, ``overflow``, ``base_optimizer_state`` (``_get_base_optimizer_state`` ~885-899:
per group, per sub-partition ``{"exp_avg", "exp_avg_sq"}`` without padding; apex FusedAdam keeps its
step counter in the param group, which is not saved), ``zero_stage`` 1, ``partition_count`` dp,
``num_comm_intervals_per_group`` and ``local_sub_partitions_of_fp32_groups`` (the fp32 master,
padding removed). The partitioning is ``flatten_dense_tensors_sub_partition_aligned`` and
``get_data_parallel_sub_partitions`` (~50-110, ~450-500): a group of n elements is cut into
``count`` comm intervals of ``size`` elements per rank, where ``size = ceil(n/dp)`` if that is at most
``max_elements_per_comm // dp`` (one interval) and ``max_elements_per_comm // dp`` otherwise; rank r
holds sub-partition ``j·dp + r`` of every interval j. Pythia's ``max_elements_per_comm`` is the
config's ``reduce_bucket_size`` (5e8 up to 2.8b).

``param_shapes`` is written as one ``OrderedDict`` of layer-spec names (``"3.attention.dense.weight"``)
in NeoX module order, which the reader maps back to the two weight-decay groups. **Inferred**, not
checked against a published file: whether eb7f5cff writes this single dict or one per group (the reader
takes both).

A replicated retrace state (one ``tensors.safetensors``) and one sharded over ranks by the builtin
ZeRO-1 (``rank{r}.safetensors``: rank r holds the r-th equal slice of each padded flat group) are both
read back to whole groups first. A stage-0 recipe (14m/31m) is written as those runs saved it: no ZeRO
files, ``FP16_Optimizer``'s state inside ``mp_rank_00_model_states.pt`` (``_export_stage0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from retrace.errors import RetraceError
from retrace.io import atomic_path
from retrace.pythia.recipes import Recipe
from retrace.pythia.sizes import ModelConfig

#: Pythia's gradient clipping (the recipe's), which FP16_Optimizer saves with its state.
_RECIPE_CLIP = next(f.default for f in dataclasses.fields(Recipe) if f.name == "clip_grad")
#: DeeperSpeed's pickled loss-scaler class (``runtime/fp16/loss_scaler.py``).
SCALER_MODULE = "deepspeed.runtime.fp16.loss_scaler"
SCALER_CLASS = "DynamicLossScaler"
#: retrace.train.scaler.LossScaler field → DynamicLossScaler attribute (the inverse of neox_state's map).
_SCALER_ATTRS = {"scale": "cur_scale", "window": "scale_window", "delayed_shift": "delayed_shift",
                 "min_scale": "min_scale", "factor": "scale_factor", "hysteresis": "cur_hysteresis",
                 "cur_iter": "cur_iter", "last_overflow_iter": "last_overflow_iter",
                 "consecutive_hysteresis": "consecutive_hysteresis"}


def sub_partitions(flat: torch.Tensor, dp: int, max_elements_per_comm: int) -> list[list[torch.Tensor]]:
    """One group's elastic ZeRO-1 sub-partitions, ``[rank][comm interval]``, padding removed (see module doc)."""
    if dp < 1 or max_elements_per_comm < dp:
        raise RetraceError(f"ZeRO-1 partitioning needs dp ≥ 1 and max_elements_per_comm ≥ dp, got {dp}, "
                           f"{max_elements_per_comm}")
    n = flat.numel()
    per_param, per_comm = math.ceil(n / dp), max_elements_per_comm // dp
    count, size = (1, per_param) if per_param <= per_comm else (math.ceil(per_param / per_comm), per_comm)
    out: list[list[torch.Tensor]] = []
    for r in range(dp):
        parts = []
        for j in range(count):
            start = (j * dp + r) * size
            stop = min(start + size, n)
            parts.append(flat[start:stop].clone() if stop > start else flat.new_zeros(0))
        out.append(parts)
    return out


def neox_module_order(n_layers: int) -> list[str]:
    """Canonical names in GPT-NeoX's ``module.named_parameters()`` order (attention before
    post_attention_layernorm, unlike Hugging Face's)."""
    names = ["gpt_neox.embed_in.weight"]
    for i in range(n_layers):
        p = f"gpt_neox.layers.{i}."
        names += [p + k for k in ("input_layernorm.weight", "input_layernorm.bias",
                                  "attention.query_key_value.weight", "attention.query_key_value.bias",
                                  "attention.dense.weight", "attention.dense.bias",
                                  "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                                  "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                                  "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")]
    return [*names, "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]


def layer_spec_name(name: str, n_layers: int) -> str:
    """Canonical name → the pipeline module's ``"{idx}.{key}"`` (reference §5's layer-spec indices)."""
    if name == "gpt_neox.embed_in.weight":
        return "0.word_embeddings.weight"
    if name == "embed_out.weight":
        return f"{n_layers + 4}.final_linear.weight"
    if name.startswith("gpt_neox.final_layer_norm."):
        return f"{n_layers + 3}.norm.{name.rsplit('.', 1)[1]}"
    i, key = name[len("gpt_neox.layers."):].split(".", 1)
    return f"{int(i) + 2}.{key}"


@contextlib.contextmanager
def _scaler_class() -> Iterator[type]:
    """DeeperSpeed's ``DynamicLossScaler`` class for pickling: the real one when it is already imported,
    else a bare class registered under its module path for the duration (pickle records a class by
    module and name only; retrace's reader never imports it)."""
    real = sys.modules.get(SCALER_MODULE)
    if real is not None and hasattr(real, SCALER_CLASS):
        yield getattr(real, SCALER_CLASS)
        return
    parts = SCALER_MODULE.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {m: sys.modules.get(m) for m in names}
    cls = type(SCALER_CLASS, (), {"__module__": SCALER_MODULE, "__qualname__": SCALER_CLASS})
    try:
        for m in names:
            sys.modules[m] = types.ModuleType(m)
        setattr(sys.modules[SCALER_MODULE], SCALER_CLASS, cls)
        yield cls
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v


def _scaler_object(cls: type, state: Mapping[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update({_SCALER_ATTRS[k]: v for k, v in state.items() if k in _SCALER_ATTRS})
    obj.__dict__.update({"dynamic": bool(state.get("dynamic", True)),
                         "raise_error_at_min_scale": bool(state.get("raise_at_min", True))})
    return obj


def read_run_step(run_dir: str | os.PathLike, step: int) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """(fp16 weights, engine meta, per-name fp32 tensors {"master"|"exp_avg"|"exp_avg_sq": {name: t}})
    of a run's saved ``step``; every file checked against its recorded sha256."""
    from safetensors.torch import load_file

    from retrace.io import sha256_file
    from retrace.train import state as st

    run = Path(run_dir)
    d = st.state_dir(run / "state", step)
    try:
        meta, tensors = st.read_state(d)
    except (OSError, ValueError, KeyError) as exc:
        raise RetraceError(f"{d}: no intact resume state of step {step} ({exc}); the run must keep every "
                           "state it publishes (--keep-states)") from exc
    eng = meta["engine"]
    files = sorted(meta["files"])
    if files != ["tensors.safetensors"]:
        # ZeRO-1 shards (rank{r}.safetensors): rank r holds the r-th equal slice of each padded flat group
        world = int(eng.get("partition", {}).get("world_size", 1))
        want_files = sorted(f"rank{r}.safetensors" for r in range(world))
        if files != want_files:
            raise RetraceError(f"{d}: state files {files} are neither one replicated file nor {world} rank shards")
        shards = [load_file(str(d / f"rank{r}.safetensors")) for r in range(world)]
        tensors = {f"group{gi}.{key}": torch.cat([sh[f"group{gi}.{key}"] for sh in shards])[: int(g["numel"])]
                   for gi, g in enumerate(eng["groups"]) for key in ("master", "exp_avg", "exp_avg_sq")}
    ckpt = run / "checkpoints" / f"step{step}.safetensors"
    want = (meta.get("checkpoints") or {}).get(str(step))
    if not ckpt.is_file():
        raise RetraceError(f"{ckpt}: the run saved no checkpoint of step {step}")
    if want and sha256_file(ckpt) != want:
        raise RetraceError(f"{ckpt}: sha256 differs from the one its state recorded")
    weights = load_file(str(ckpt))
    per_name: dict[str, dict[str, torch.Tensor]] = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for gi, g in enumerate(eng["groups"]):
        off = 0
        for n in g["names"]:
            k = weights[n].numel()
            for key, dest in per_name.items():
                dest[n] = tensors[f"group{gi}.{key}"][off:off + k].reshape(weights[n].shape)
            off += k
    return weights, eng, per_name


def export_training_checkpoint(run_dir: str | os.PathLike, step: int, out_dir: str | os.PathLike, *,
                               cfg: ModelConfig, dp: int = 1, max_elements_per_comm: int = 500_000_000,
                               lr_scheduler: Mapping[str, Any] | None = None,
                               neox_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/global_step{step}/`` (weights + ZeRO-1 files for ``dp`` ranks) and ``out_dir/latest``
    from a ``retrace train`` run's saved ``step``; returns the step directory.

    ``lr_scheduler`` adds AnnealingLR's other fields (start_lr, warmup_iter, end_iter, decay_style,
    min_lr) to the saved ``num_iters``.
    """
    from retrace.neox.export import export_neox_checkpoint
    from retrace.train.neox_state import neox_group_order

    weights, eng, per_name = read_run_step(run_dir, step)
    rules = eng["loss_scaler"].get("rules")
    if eng.get("engine") not in (None, "builtin") or rules not in ("dynamic_loss_scaler", "fp16_optimizer"):
        raise RetraceError(f"{run_dir}: step {step} was trained with {eng.get('engine')} / {rules}; only the "
                           "builtin engine's state is written in the DeeperSpeed layout")
    if rules == "fp16_optimizer":  # ZeRO stage 0 (14m/31m): FP16_Optimizer's state in the client state
        return _export_stage0(weights, eng, per_name, out_dir, step=step, cfg=cfg, lr_scheduler=lr_scheduler,
                              neox_args=neox_args)
    step_dir = Path(out_dir) / f"global_step{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    order = neox_group_order(cfg.n_layers)
    parts = {key: [sub_partitions(torch.cat([per_name[key][n].reshape(-1) for n in names]).float(), dp,
                                  max_elements_per_comm) for names in order]
             for key in per_name}
    param_shapes = OrderedDict((layer_spec_name(n, cfg.n_layers), torch.Size(weights[n].shape))
                               for n in neox_module_order(cfg.n_layers))
    with _scaler_class() as cls:
        scaler = _scaler_object(cls, eng["loss_scaler"])
        for r in range(dp):
            osd = {
                "loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False,
                "base_optimizer_state": [[{"exp_avg": parts["exp_avg"][g][r][j],
                                           "exp_avg_sq": parts["exp_avg_sq"][g][r][j]}
                                          for j in range(len(parts["master"][g][r]))] for g in range(len(order))],
                "zero_stage": 1, "partition_count": dp,
                "num_comm_intervals_per_group": [len(parts["master"][g][r]) for g in range(len(order))],
                "local_sub_partitions_of_fp32_groups": [parts["master"][g][r] for g in range(len(order))],
            }
            with atomic_path(step_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") as tmp:
                torch.save({"optimizer_state_dict": osd, "param_shapes": param_shapes}, str(tmp))
    sched = {**dict(lr_scheduler or {}), "num_iters": int(eng["lr_iter"])}
    client = {"lr_scheduler": sched, "dp_world_size": dp,
              "skipped_steps": int(step) - int(eng["adam_steps"])}
    return export_neox_checkpoint(weights, out_dir, step=step, cfg=cfg, neox_args=neox_args, client=client)


def _export_stage0(weights, eng, per_name, out_dir, *, step: int, cfg: ModelConfig, lr_scheduler, neox_args) -> Path:
    """ZeRO stage 0 as the 14m/31m runs saved it: DeepSpeed's engine stores ``FP16_Optimizer.state_dict()``
    (``runtime/fp16/fused_optimizer.py`` ``state_dict``) as the client state's ``optimizer``, beside the
    ``sequential.*`` module of a pp = 0 model; no ZeRO files. apex's ``step`` is in the param groups
    (the constructor's init step counted: ``adam_t``)."""
    from retrace.neox.export import export_neox_checkpoint
    from retrace.train.neox_state import neox_group_order

    order = neox_group_order(cfg.n_layers)
    flat = {key: [torch.cat([per_name[key][n].reshape(-1) for n in names]).float() for names in order]
            for key in per_name}
    sc = eng["loss_scaler"]
    optimizer = {
        "dynamic_loss_scale": bool(sc.get("dynamic", True)), "cur_scale": sc["scale"], "cur_iter": sc["cur_iter"],
        "last_overflow_iter": sc["last_overflow_iter"], "scale_factor": sc["factor"], "scale_window": sc["window"],
        "optimizer_state_dict": {
            "state": {g: {"exp_avg": flat["exp_avg"][g], "exp_avg_sq": flat["exp_avg_sq"][g]} for g in range(len(order))},
            "param_groups": [{"params": [g], "step": int(eng["adam_t"])} for g in range(len(order))],
        },
        "fp32_groups_flat": flat["master"],
        "clip_grad": _RECIPE_CLIP,
    }
    sched = {**dict(lr_scheduler or {}), "num_iters": int(eng["lr_iter"])}
    client = {"optimizer": optimizer, "lr_scheduler": sched, "skipped_steps": int(step) - int(eng["adam_steps"])}
    return export_neox_checkpoint(weights, out_dir, step=step, cfg=cfg, neox_args=neox_args, client=client,
                                  layout="sequential")
