"""The ZeRO-1 optimizer state of a GPT-NeoX v1.0 native checkpoint, reassembled per canonical parameter.

``retrace.checkpoints.neox.load_zero_optimizer_state`` returns each ``zero_pp_rank_{dp}_mp_rank_00``
file raw; this module puts the partitions back together (DeeperSpeed ``eb7f5cff`` ``zero/stage1.py``):

* Optimizer groups are GPT-NeoX's weight-decay groups, in NeoX module order
  (``get_params_for_weight_decay_optimization`` walks ``module.modules()``):
    group 0 (decay):    embedding; per layer qkv.w, attention.dense.w, dense_h_to_4h.w, dense_4h_to_h.w;
                        final_linear.w
    group 1 (no decay): per layer input_layernorm.{w,b}, qkv.b, attention.dense.b,
                        post_attention_layernorm.{w,b}, dense_h_to_4h.b, dense_4h_to_h.b; final norm {w,b}
  (NeoX registers attention before post_attention_layernorm; Hugging Face's order differs.) When the
  file carries ``param_shapes`` (NeoX module names per group) that order is used instead.
* Each group's parameters are flattened in that order, zero-padded at the end, cut into comm intervals
  of ``max_elements_per_comm`` and each interval into ``dp`` equal sub-partitions; rank r keeps
  sub-partition (interval j, rank r) for every j. So the flat group is the concatenation over j, then
  over r, of the sub-partitions, truncated to the group's true size (elastic checkpoints have the
  padding already removed).
* ``base_optimizer_state``: elastic — ``[[{"exp_avg", "exp_avg_sq", ("step")} per interval] per group]``;
  rigid — the wrapped optimizer's ``state_dict()`` whose state index enumerates (group, interval).
* Adam's step counter: apex FusedAdam keeps it in the param group, which elastic checkpoints do not
  save; then it is taken as the LR scheduler's ``num_iters`` (both advance only on applied updates).

ZeRO stage 0 (14m/31m): no ``zero_pp_rank`` files; DeepSpeed's engine saves ``FP16_Optimizer.state_dict()``
as the client state's ``optimizer`` (``runtime/fp16/fused_optimizer.py`` ``state_dict``): ``cur_scale``,
``cur_iter``, ``last_overflow_iter``, ``scale_factor``, ``scale_window``, ``fp32_groups_flat`` (one flat
fp32 master per weight-decay group, in group order) and ``optimizer_state_dict`` (the wrapped FusedAdam's
``state_dict()``: ``state[i]`` = the i-th flat group's ``exp_avg``/``exp_avg_sq``, ``param_groups`` with
apex's ``step``, which this form does save). ``_stage0_state`` reads it.

Tensor-parallel checkpoints (mp > 1) are not reassembled (moments cannot be merged like weights).
Not verified against a published checkpoint; built from the DeeperSpeed source as described.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrace.errors import RetraceError


@dataclass
class NeoXOptimizerState:
    master: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int | None
    lr_iter: int | None
    iteration: int | None
    loss_scaler: dict = field(default_factory=dict)
    source: str = ""


def neox_group_order(n_layers: int) -> list[list[str]]:
    """Canonical names of GPT-NeoX's two weight-decay groups, in NeoX module order."""
    decay = ["gpt_neox.embed_in.weight"]
    no_decay: list[str] = []
    for i in range(n_layers):
        p = f"gpt_neox.layers.{i}."
        decay += [p + "attention.query_key_value.weight", p + "attention.dense.weight",
                  p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_4h_to_h.weight"]
        no_decay += [p + "input_layernorm.weight", p + "input_layernorm.bias",
                     p + "attention.query_key_value.bias", p + "attention.dense.bias",
                     p + "post_attention_layernorm.weight", p + "post_attention_layernorm.bias",
                     p + "mlp.dense_h_to_4h.bias", p + "mlp.dense_4h_to_h.bias"]
    decay.append("embed_out.weight")
    no_decay += ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"]
    return [decay, no_decay]


def _neox_name_to_canonical(name: str, n_layers: int) -> str:
    """'sequential.3.attention.dense.weight' / '3.attention.dense.weight' → canonical HF name."""
    from retrace.checkpoints.names import neox_rule

    parts = name.split(".")
    if parts[0] in ("sequential", "module"):
        parts = parts[1:]
    idx, key = int(parts[0]), ".".join(parts[1:])
    rule = neox_rule(idx, key, n_layers)
    if rule is None:
        raise KeyError(name)
    return rule[0]


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def _concat_partitions(per_rank: list[list[torch.Tensor]], numel: int) -> torch.Tensor:
    """Sub-partitions [rank][interval] → the flat group: interval-major, then rank; truncated to numel."""
    n_int = len(per_rank[0])
    pieces = [per_rank[r][j].reshape(-1).float() for j in range(n_int) for r in range(len(per_rank))]
    flat = torch.cat(pieces) if pieces else torch.zeros(0)
    if flat.numel() < numel:
        raise RetraceError(f"ZeRO optimizer state holds {flat.numel()} elements for a group of {numel}")
    return flat[:numel]


def _split(flat: torch.Tensor, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n in names:
        k = 1
        for d in shapes[n]:
            k *= d
        out[n] = flat[off : off + k].reshape(shapes[n]).clone()
        off += k
    return out


def _scaler_state(obj: Any) -> dict:
    st = getattr(obj, "state", None)
    if callable(st):
        st = None
    if st is None:
        st = getattr(obj, "__dict__", {}) if obj is not None else {}
    if not isinstance(st, dict):
        return {}
    m = {"cur_scale": "scale", "scale_window": "window", "delayed_shift": "delayed_shift",
         "min_scale": "min_scale", "scale_factor": "factor", "cur_hysteresis": "hysteresis",
         "cur_iter": "cur_iter", "last_overflow_iter": "last_overflow_iter",
         "consecutive_hysteresis": "consecutive_hysteresis"}
    return {v: st[k] for k, v in m.items() if k in st}


def open_optimizer_state(source: str, shapes: dict[str, tuple[int, ...]] | None = None,
                         n_layers: int | None = None) -> NeoXOptimizerState | None:
    """The reassembled ZeRO-1 state of a local GPT-NeoX checkpoint, or None when ``source`` has none."""
    from retrace.checkpoints.neox import (
        is_neox_dir,
        load_client_state,
        load_zero_optimizer_state,
        resolve_neox_dir,
        zero_optimizer_files,
    )

    path = Path(source)
    if not (path.is_dir() and is_neox_dir(path)):
        return None
    step_dir = resolve_neox_dir(path)
    files = zero_optimizer_files(step_dir)
    if not files:
        return _stage0_state(step_dir, shapes, n_layers)
    mps = sorted({mp for _, mp in files})
    if mps != [0]:
        warnings.warn(f"{step_dir}: tensor-parallel (mp={len(mps)}) ZeRO optimizer state is not reassembled; "
                      "starting Adam from zero", RuntimeWarning, stacklevel=2)
        return None
    dps = sorted(dp for dp, _ in files)
    if dps != list(range(len(dps))):
        raise RetraceError(f"{step_dir}: ZeRO optimizer files for dp ranks {dps} are not 0..{len(dps) - 1}")
    if shapes is None or n_layers is None:
        from retrace.checkpoints import open_params

        with open_params(str(step_dir)) as reader:
            shapes = {n: tuple(reader.shape(n)) for n in reader.names()}
        n_layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("gpt_neox.layers."))
    raw = [load_zero_optimizer_state(step_dir, dp=dp, mp=0) for dp in dps]
    osd = [r.get("optimizer_state_dict", r) for r in raw]

    order = neox_group_order(n_layers)
    ps = raw[0].get("param_shapes")
    if ps:
        groups = ps if isinstance(ps, (list, tuple)) else None
        if groups is None:  # one dict for all groups: split by our default group membership
            names = [_neox_name_to_canonical(k, n_layers) for k in ps]
            member = {n: g for g, grp in enumerate(order) for n in grp}
            order = [[n for n in names if member[n] == g] for g in range(len(order))]
        else:
            order = [[_neox_name_to_canonical(k, n_layers) for k in grp] for grp in groups]
    missing = set(shapes) - {n for grp in order for n in grp}
    if missing:
        raise RetraceError(f"{step_dir}: optimizer groups do not cover {sorted(missing)[:3]}")

    master: dict[str, torch.Tensor] = {}
    exp_avg: dict[str, torch.Tensor] = {}
    exp_avg_sq: dict[str, torch.Tensor] = {}
    step: int | None = None
    for g, names in enumerate(order):
        numel = sum(int(torch.Size(shapes[n]).numel()) for n in names)
        fp32 = [_as_list(o["local_sub_partitions_of_fp32_groups"][g]) for o in osd]
        master.update(_split(_concat_partitions(fp32, numel), names, shapes))
        n_int = len(fp32[0])
        base = [o["base_optimizer_state"] for o in osd]
        if isinstance(base[0], dict):  # rigid: a torch optimizer state_dict over (group, interval) params
            offset = sum(len(_as_list(osd[0]["local_sub_partitions_of_fp32_groups"][i])) for i in range(g))
            per = [[b["state"][offset + j] for j in range(n_int)] for b in base]
            for pg in base[0].get("param_groups", []):
                if "step" in pg:
                    step = int(pg["step"])
        else:
            per = [_as_list(b[g]) for b in base]
        for key, dest in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            parts = [[s[key] for s in rank] for rank in per]
            dest.update(_split(_concat_partitions(parts, numel), names, shapes))
        s0 = per[0][0].get("step") if per and per[0] else None
        if s0 is not None:
            step = int(s0.item() if isinstance(s0, torch.Tensor) else s0)

    client: dict[str, Any] = {}
    try:
        client = load_client_state(step_dir, 0)
    except RetraceError:
        pass
    lr_state = client.get("lr_scheduler") or {}
    lr_iter = lr_state.get("num_iters") if isinstance(lr_state, dict) else None
    iteration = client.get("iteration", client.get("global_steps"))
    if step is None and lr_iter is not None:
        step = int(lr_iter)
    return NeoXOptimizerState(master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step,
                              lr_iter=int(lr_iter) if lr_iter is not None else None,
                              iteration=int(iteration) if iteration is not None else None,
                              loss_scaler=_scaler_state(osd[0].get("loss_scaler")), source=str(step_dir))


def _stage0_state(step_dir: Path, shapes: dict[str, tuple[int, ...]] | None,
                  n_layers: int | None) -> NeoXOptimizerState | None:
    """The ``FP16_Optimizer`` state of a ZeRO stage-0 checkpoint (module doc), or None when it has none."""
    from retrace.checkpoints.neox import load_client_state

    try:
        client = load_client_state(step_dir, 0)
    except RetraceError:
        return None
    osd = client.get("optimizer")
    if not isinstance(osd, dict) or "fp32_groups_flat" not in osd:
        return None
    if shapes is None or n_layers is None:
        from retrace.checkpoints import open_params

        with open_params(str(step_dir)) as reader:
            shapes = {n: tuple(reader.shape(n)) for n in reader.names()}
        n_layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("gpt_neox.layers."))
    order = neox_group_order(n_layers)
    flats = _as_list(osd["fp32_groups_flat"])
    inner = osd.get("optimizer_state_dict") or {}
    state, groups = inner.get("state", {}), inner.get("param_groups", [])
    if len(flats) != len(order):
        raise RetraceError(f"{step_dir}: FP16_Optimizer state holds {len(flats)} groups, GPT-NeoX has {len(order)}")
    master: dict[str, torch.Tensor] = {}
    exp_avg: dict[str, torch.Tensor] = {}
    exp_avg_sq: dict[str, torch.Tensor] = {}
    for g, names in enumerate(order):
        numel = sum(int(torch.Size(shapes[n]).numel()) for n in names)
        index = groups[g]["params"][0] if g < len(groups) and groups[g].get("params") else g
        moments = state.get(index, {})
        for dest, flat in ((master, flats[g]), (exp_avg, moments.get("exp_avg")), (exp_avg_sq, moments.get("exp_avg_sq"))):
            if flat is None:
                raise RetraceError(f"{step_dir}: FP16_Optimizer state of group {g} has no Adam moments")
            if flat.numel() < numel:
                raise RetraceError(f"{step_dir}: FP16_Optimizer group {g} holds {flat.numel()} elements for {numel}")
            dest.update(_split(flat.reshape(-1).float()[:numel], names, shapes))
    # apex counts every FusedAdam.step call, the constructor's init step included (reference §7 item 1):
    # after k applied updates it holds k + 1
    step = next((int(pg["step"]) - 1 for pg in groups if "step" in pg), None)
    lr_state = client.get("lr_scheduler") or {}
    lr_iter = lr_state.get("num_iters") if isinstance(lr_state, dict) else None
    if step is None and lr_iter is not None:
        step = int(lr_iter)
    iteration = client.get("iteration", client.get("global_steps"))
    scaler = {"scale": osd.get("cur_scale"), "cur_iter": osd.get("cur_iter"),
              "last_overflow_iter": osd.get("last_overflow_iter"), "factor": osd.get("scale_factor"),
              "window": osd.get("scale_window")}
    return NeoXOptimizerState(master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step,
                              lr_iter=int(lr_iter) if lr_iter is not None else None,
                              iteration=int(iteration) if iteration is not None else None,
                              loss_scaler={k: v for k, v in scaler.items() if v is not None}, source=str(step_dir))
