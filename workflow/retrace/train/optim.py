"""Weight-decay groups, flat parameter buffers and Adam in apex FusedAdam's AdamW mode.

Groups follow GPT-NeoX v1.0 ``get_params_for_weight_decay_optimization``: every parameter of a
LayerNorm module (weight and bias) and every parameter named ``bias`` gets no decay; everything else
(word embeddings, QKV / attention dense / MLP weights, the output head) gets ``weight_decay``.
Group 0 is the decay group and group 1 the no-decay group, each in module order, as in NeoX.

The update is apex ``FusedAdam(adam_w_mode=True, bias_correction=True)``::

    m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
    p ← p − lr·( (m/(1−β1^t)) / (√(v/(1−β2^t)) + eps) + wd·p )

with the step counter ``t`` advanced only when an update is applied (a skipped fp16 step never calls
the optimizer). torch.optim.AdamW is the same update written differently (decay applied first), so
the two agree to rounding, not bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm,)


def is_no_decay(name: str, module: nn.Module | None = None) -> bool:
    """No weight decay for LayerNorm parameters and any parameter named ``bias``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return True
    if module is not None and isinstance(module, _NORM_TYPES):
        return True
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return "norm" in owner.lower()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{"names": [...], "params": [...], "weight_decay": wd}, {..., "weight_decay": 0.0}] in module order."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}" if mod_name else pname
            if weight_decay == 0.0 or is_no_decay(full, module):
                no_decay.append((full, p))
            else:
                decay.append((full, p))
    return [
        {"names": [n for n, _ in decay], "params": [p for _, p in decay], "weight_decay": float(weight_decay)},
        {"names": [n for n, _ in no_decay], "params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


@dataclass
class FlatGroup:
    """One parameter group laid out in contiguous buffers.

    ``master`` (fp32) holds the parameters the optimizer updates; ``model`` (compute dtype) backs the
    module's parameters (the same tensor as ``master`` in fp32); ``grad`` backs their ``.grad``.
    """

    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]
    weight_decay: float
    master: torch.Tensor
    model: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    @property
    def numel(self) -> int:
        return self.master.numel()

    def views(self, flat: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            n = math.prod(shape)
            yield name, flat[off : off + n].view(shape)


def flatten_groups(groups: list[dict], dtype: torch.dtype, device: torch.device) -> list[FlatGroup]:
    """Move each group's parameters into flat buffers; the module's parameters become views of them.

    The fp32 master copy starts as the exact upcast of the (possibly fp16) parameters, so the first
    cast back is lossless.
    """
    out = []
    for g in groups:
        params = g["params"]
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        model_flat = torch.empty(total, dtype=dtype, device=device)
        for p, off, n in zip(params, offsets, sizes, strict=True):
            model_flat[off : off + n].copy_(p.detach().reshape(-1))
        if dtype == torch.float32:
            master = model_flat
        else:
            master = model_flat.to(torch.float32)
        grad = torch.zeros(total, dtype=dtype, device=device)
        for p, off, n, shape in zip(params, offsets, sizes, shapes, strict=True):
            p.data = model_flat[off : off + n].view(shape)
            p.grad = grad[off : off + n].view(shape)
        out.append(
            FlatGroup(
                names=list(g["names"]), shapes=shapes, offsets=offsets, weight_decay=g["weight_decay"],
                master=master, model=model_flat, grad=grad,
                exp_avg=torch.zeros(total, dtype=torch.float32, device=device),
                exp_avg_sq=torch.zeros(total, dtype=torch.float32, device=device),
            )
        )
    return out


def adam_step(group: FlatGroup, grad32: torch.Tensor, *, lr: float, step: int, betas: tuple[float, float],
              eps: float) -> None:
    """One apex-FusedAdam (AdamW mode, bias correction) update of ``group.master`` in place.

    ``step`` is the 1-based count of applied updates including this one.
    """
    b1, b2 = betas
    m, v, p = group.exp_avg, group.exp_avg_sq, group.master
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    m.mul_(b1).add_(grad32, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(grad32, grad32, value=1.0 - b2)
    denom = torch.div(v, bc2).sqrt_().add_(eps)
    update = torch.div(m, bc1).div_(denom)
    del denom
    if group.weight_decay != 0.0:
        update.add_(p, alpha=group.weight_decay)
    p.add_(update, alpha=-lr)
