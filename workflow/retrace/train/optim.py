"""Weight-decay groups, flat buffers, and the optimizer step's arithmetic as DeeperSpeed + apex ran it.

Sources (reference/pythia-neox.md §7): DeeperSpeed ``eb7f5cff`` ``deepspeed/runtime/utils.py``,
``runtime/zero/stage1.py``, ``runtime/fp16/fused_optimizer.py``; apex ``a651e2c2``
``apex/optimizers/fused_adam.py`` and ``csrc/multi_tensor_adam.cu``.

Groups follow GPT-NeoX v1.0 ``get_params_for_weight_decay_optimization``: every parameter of a
LayerNorm module (weight and bias) and every parameter named ``bias`` gets no decay; everything else
(word embeddings, QKV / attention dense / MLP weights, the output head) gets ``weight_decay``.
Group 0 is the decay group and group 1 the no-decay group, each in NeoX's module order (a module may
name that order in ``neox_module_order``; retrace.model's layers do, since NeoX registers attention
before ``post_attention_layernorm``).

The update is apex ``FusedAdam(adam_w_mode=True, bias_correction=True)`` as ``multi_tensor_adam.cu``
computes it, in float32 (``MATH_T = float``), one expression per element in the kernel's order::

    m = β1·m + (1−β1)·g ;  v = β2·v + ((1−β2)·g)·g
    p = p − lr·( (m / bc1) / (sqrtf(v / bc2) + eps) + wd·p )

with β1, β2, eps, lr, wd passed to the kernel as C ``float`` (``1 − β1`` = 0.10000002f for 0.9), and
the bias corrections computed on the host as ``float(1 − std::pow(β, step))`` — ``std::pow(float, int)``
is the C++11 promoting overload, i.e. ``pow`` in double of the float β, rounded to float when stored.
``step`` is apex's per-group counter, incremented on *every* ``FusedAdam.step`` call — including the
ZeRO/FP16_Optimizer constructor's initialisation step (see retrace.train.engine).

Here every operation is an IEEE float32 operation (correctly rounded), so the result per element does not
depend on how the tensor is cut into chunks, ranks or SIMD lanes. Not reproduced (GPU only): apex builds
the kernel with ``--use_fast_math`` (setup.py ~186-190), so on the original GPUs the divisions and
``sqrtf`` were the approximate ones, ``a·b + c`` could contract into FMAs, and denormals flushed to zero.

The update runs in chunks of the flat buffers with one reusable float32 workspace, so the step needs
``8·chunk`` bytes beyond the persistent state instead of three full-size float32 temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrace.memory import ADAM_CHUNK_ELEMS, NORM_PIECE_ELEMS

_NORM_TYPES = (nn.LayerNorm,)

#: Elements per chunk of the Adam update (the workspace holds two float32 chunks: 32 MiB), and per piece
#: of a gradient tensor's norm (fixed: the clip norm must not depend on the chunking). Their home is the
#: torch-free memory model, which counts the workspace.
DEFAULT_CHUNK_ELEMS = ADAM_CHUNK_ELEMS


def f32(x: float) -> float:
    """``x`` rounded to float32 (round to nearest even), as a Python float (what a C ``float`` holds)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def is_no_decay(name: str, module: nn.Module | None = None) -> bool:
    """No weight decay for LayerNorm parameters and any parameter named ``bias``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return True
    if module is not None and isinstance(module, _NORM_TYPES):
        return True
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return "norm" in owner.lower()


def modules_in_neox_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()``, but a module's children in its ``neox_module_order`` first (NeoX's
    ``module.modules()`` order, which the optimizer groups follow)."""
    seen: set[int] = set()

    def walk(mod: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        yield name, mod
        children = dict(mod.named_children())
        order = [c for c in getattr(mod, "neox_module_order", ()) if c in children]
        for child in order + [c for c in children if c not in order]:
            yield from walk(children[child], f"{name}.{child}" if name else child)

    yield from walk(module, prefix)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{"names": [...], "params": [...], "weight_decay": wd}, {..., "weight_decay": 0.0}] in NeoX module order."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, module in modules_in_neox_order(model):
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

    ``model`` (compute dtype) backs the module's parameters and ``grad`` their ``.grad``; both hold the
    whole group (``numel`` elements, then zero padding up to ``padded``, a multiple of the number of
    shards). The optimizer state covers ``[lo, hi)`` of the group: all of it when replicated, one rank's
    shard under ZeRO-1. ``master`` (fp32) holds the parameters the optimizer updates over that range (a
    view of ``model`` in fp32); ``exp_avg``/``exp_avg_sq`` are Adam's moments over it.
    """

    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]
    weight_decay: float
    numel: int
    padded: int
    lo: int
    hi: int
    master: torch.Tensor
    model: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def views(self, flat: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, view) of each parameter in a whole-group flat buffer (``model``, ``grad``)."""
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            n = math.prod(shape)
            yield name, flat[off : off + n].view(shape)

    def shard_pieces(self) -> Iterable[tuple[str, int, int, int]]:
        """(name, start in the flattened parameter, start in the shard, length) of every parameter's
        overlap with ``[lo, hi)``."""
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            n = math.prod(shape)
            a, b = max(off, self.lo), min(off + n, self.hi)
            if a < b:
                yield name, a - off, a - self.lo, b - a


def flatten_groups(groups: list[dict], dtype: torch.dtype, device: torch.device, *, shards: int = 1,
                   rank: int = 0) -> list[FlatGroup]:
    """Move each group's parameters into flat buffers; the module's parameters become views of them.

    With ``shards`` > 1 (ZeRO-1) each group is padded to ``shards·⌈numel/shards⌉`` and this rank's
    optimizer state covers ``[rank·s, (rank+1)·s)``. The fp32 master starts as the exact upcast of the
    (possibly fp16) parameters, so the first cast back is lossless.
    """
    out = []
    for g in groups:
        params = g["params"]
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        shard = -(-total // shards)
        padded = shard * shards
        lo, hi = rank * shard, (rank + 1) * shard
        model_flat = torch.zeros(padded, dtype=dtype, device=device)
        for p, off, n in zip(params, offsets, sizes, strict=True):
            model_flat[off : off + n].copy_(p.detach().reshape(-1))
        master = model_flat[lo:hi] if dtype == torch.float32 else model_flat[lo:hi].to(torch.float32)
        grad = torch.zeros(padded, dtype=dtype, device=device)
        for p, off, n, shape in zip(params, offsets, sizes, shapes, strict=True):
            p.data = model_flat[off : off + n].view(shape)
            p.grad = grad[off : off + n].view(shape)
        out.append(
            FlatGroup(
                names=list(g["names"]), shapes=shapes, offsets=offsets, weight_decay=g["weight_decay"],
                numel=total, padded=padded, lo=lo, hi=hi, master=master, model=model_flat, grad=grad,
                exp_avg=torch.zeros(hi - lo, dtype=torch.float32, device=device),
                exp_avg_sq=torch.zeros(hi - lo, dtype=torch.float32, device=device),
            )
        )
    return out


# -- overflow check and clip norm ----------------------------------------------------------------------
def _pieces(views: list[torch.Tensor], piece: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each tensor flattened and cut into pieces of at most ``piece`` elements (so that a float32
    reduction of an fp16 tensor never upcasts more than one piece at a time); and the piece count of each."""
    out, counts = [], []
    for v in views:
        flat = v.reshape(-1)
        parts = list(flat.split(piece)) if flat.numel() > piece else [flat]
        out += parts
        counts.append(len(parts))
    return out, counts


def has_inf_or_nan(views: list[torch.Tensor], *, norms: list[float] | None = None) -> bool:
    """DeepSpeed ``CheckOverflow.has_overflow_serial`` (runtime/utils.py ~114-176): a tensor overflowed
    when the float32 sum of its elements, ``float(x.float().sum())``, is ±inf or NaN. Run on the
    (all-reduced) gradients whatever their dtype (stage1.py ~690-701), so a bf16/fp32 inf/NaN step is
    skipped too.

    Without the float32 copy DeepSpeed makes: for fp16 a float32 sum (≤ 65504·n) or sum of squares
    (≤ 65504²·n) of finite values cannot overflow, so "the sum is not finite" is "an element is not
    finite" is "the float32 norm is not finite" — the per-tensor ``norms`` when given. fp32 tensors are
    summed as they are (exactly DeepSpeed's sum); bf16 in their own dtype (float accumulation, the
    verdict differing only for a finite sum within 0.4% of float32's maximum).
    """
    if not views:
        return False
    if views[0].dtype == torch.float16:
        if norms is None:
            norms = tensor_norms(views)
        return not all(math.isfinite(n) for n in norms)
    sums = torch.stack([v.sum() for v in views])
    return not bool(torch.isfinite(sums).all())


def tensor_norms(views: list[torch.Tensor], *, workspace: torch.Tensor | None = None,
                 piece: int = NORM_PIECE_ELEMS) -> list[float]:
    """Each tensor's float32 L2 norm, ``p.grad.data.float().norm(2)``, as a Python float.

    A non-float32 tensor is upcast piece by piece into ``workspace`` (a float32 buffer of at least
    ``min(piece, largest numel)`` elements) instead of into a fresh float32 copy: PyTorch's
    ``norm(dtype=float32)`` on fp16 allocates one per call, and those blocks stay resident. A tensor
    longer than ``piece`` is reduced piece by piece (the piece norms combined in double, rounded to
    float32): another summation order, not another value beyond rounding. ``piece`` must not depend on
    the partition (ZeRO-1 ranks and the replicated engine compute the same norms). One host
    synchronisation for all the norms.
    """
    if not views:
        return []
    need = min(piece, max(v.numel() for v in views))
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, dtype=torch.float32, device=views[0].device)
    parts, counts = _pieces(views, piece)
    norms = []
    for t in parts:
        if t.dtype != torch.float32:
            buf = workspace[: t.numel()]
            buf.copy_(t)
            t = buf
        norms.append(torch.linalg.vector_norm(t, 2))
    values = torch.stack(norms).tolist()
    out, i = [], 0
    for c in counts:
        out.append(values[i] if c == 1 else f32(math.sqrt(sum(x * x for x in values[i : i + c]))))
        i += c
    return out


def _deepspeed_get_grad_norm(norms: list[float]) -> float:
    """The tail of ``get_grad_norm`` (runtime/utils.py ~224-247) given each tensor's fp32 L2 norm:
    ``Σ norm**2`` in Python double, rounded to float32 (``torch.cuda.FloatTensor([float(total)])``),
    ``** (1/2)``; -1 when not finite."""
    total = 0.0
    for n in norms:
        total += n**2.0
    total = f32(total) ** (1.0 / 2.0)
    if total in (float("inf"), -float("inf")) or total != total:
        return -1.0
    return total


def _combine(norm_groups: list[float]) -> float:
    """``unscale_and_clip_grads`` (stage1.py ~785-797, fused_optimizer.py ~323-330): √(Σ norm_g**2)."""
    total = 0.0
    for n in norm_groups:
        total += n**2.0
    return math.sqrt(total)


def group_tensor_norms(groups: list[FlatGroup], *, piece: int = NORM_PIECE_ELEMS,
                       workspace: torch.Tensor | None = None) -> list[list[float]]:
    """Per weight-decay group, each gradient tensor's float32 L2 norm (``tensor_norms``)."""
    return [tensor_norms([v for _, v in g.views(g.grad)], piece=piece, workspace=workspace) for g in groups]


def zero1_grad_norm(norms: list[list[float]]) -> float:
    """ZeRO stage 1's clip norm of the (scaled) gradients from ``group_tensor_norms``: per weight-decay
    group ``get_grad_norm`` over that group's fp16 gradient tensors (each ``p.grad.float().norm(2)``),
    the groups combined as stage1.py ~719-724 / ~785-797 does. Every rank computes it from the whole
    all-reduced gradient, so every rank gets the same value."""
    return _combine([_deepspeed_get_grad_norm(group) for group in norms])


def fp16_optimizer_grad_norm(groups: list[FlatGroup], *, piece: int = NORM_PIECE_ELEMS,
                             workspace: torch.Tensor | None = None) -> float:
    """ZeRO stage 0 (``FP16_Optimizer.step``, fused_optimizer.py ~296-306): one ``get_grad_norm`` over the
    fp32 copies of the flat groups — one tensor norm per whole group — combined as a single group."""
    return _combine([_deepspeed_get_grad_norm(tensor_norms([g.grad[: g.numel] for g in groups if g.numel],
                                                           piece=piece, workspace=workspace))])


def clip_combined_scale(total_norm: float, loss_scale: float, clip_grad: float) -> float:
    """``unscale_and_clip_grads``: the factor the fp32 gradients are divided by (scale·max(1, clip))."""
    combined = loss_scale
    if clip_grad > 0.0:
        clip = ((total_norm / loss_scale) + 1e-6) / clip_grad
        if clip > 1:
            combined = clip * loss_scale
    return combined


# -- apex FusedAdam ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApexAdamScalars:
    """The kernel's float arguments (multi_tensor_adam.cu ``multi_tensor_adam_cuda`` ~131-160)."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    bias_correction1: float
    bias_correction2: float
    eps: float
    lr: float
    weight_decay: float

    @classmethod
    def for_step(cls, *, step: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> ApexAdamScalars:
        b1, b2 = f32(betas[0]), f32(betas[1])
        return cls(beta1=b1, beta2=b2, one_minus_beta1=f32(1 - b1), one_minus_beta2=f32(1 - b2),
                   bias_correction1=f32(1 - b1**step), bias_correction2=f32(1 - b2**step),
                   eps=f32(eps), lr=f32(lr), weight_decay=f32(weight_decay))


def _ieee_sqrt_(t: torch.Tensor) -> None:
    """Correctly rounded float32 square root in place (what ``sqrtf`` means). PyTorch's vectorised CPU
    ``sqrt`` is not correctly rounded (measured: ~16% of random float32 inputs off by one ulp on an
    AVX-512 build); numpy's float32 ``sqrt`` is (the hardware instruction), and CUDA's ``sqrt`` is IEEE."""
    if t.device.type == "cpu":
        a = t.numpy()
        np.sqrt(a, out=a)
    else:
        t.sqrt_()


def apex_adam_(*, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
               inv_scale: float, s: ApexAdamScalars, workspace: torch.Tensor) -> None:
    """One apex FusedAdam (AdamW mode) update of ``master`` in place, chunk by chunk.

    ``grad`` is the compute-dtype gradient over the same elements; it is upcast exactly and multiplied by
    ``inv_scale`` (DeepSpeed's ``grad.mul_(1/combined_scale)`` on the fp32 copy, skipped when 1) before
    the kernel's expression. ``workspace`` is a float32 buffer of even length; each chunk uses its halves.
    """
    n = master.numel()
    chunk = workspace.numel() // 2
    if n == 0:
        return
    if chunk == 0:
        raise ValueError("the Adam workspace is empty")
    dev = master.device
    # Divisors as 1-element tensors: a true elementwise division (a CPU scalar divisor may be turned
    # into a multiplication by its reciprocal).
    bc1 = torch.full((1,), s.bias_correction1, dtype=torch.float32, device=dev)
    bc2 = torch.full((1,), s.bias_correction2, dtype=torch.float32, device=dev)
    inv = f32(inv_scale)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        k = b - a
        p, m, v = master[a:b], exp_avg[a:b], exp_avg_sq[a:b]
        g, tmp = workspace[:k], workspace[chunk : chunk + k]
        g.copy_(grad[a:b])
        if inv != 1.0:
            g.mul_(inv)
        m.mul_(s.beta1)  # r_m = beta1 * r_m + (1-beta1) * r_g
        torch.mul(g, s.one_minus_beta1, out=tmp)
        m.add_(tmp)
        v.mul_(s.beta2)  # r_v = beta2 * r_v + (1-beta2) * r_g * r_g
        torch.mul(g, s.one_minus_beta2, out=tmp)
        tmp.mul_(g)
        v.add_(tmp)
        torch.div(v, bc2, out=tmp)  # denom = sqrtf(r_v / beta2_correction) + epsilon
        _ieee_sqrt_(tmp)
        tmp.add_(s.eps)
        torch.div(m, bc1, out=g)  # update = (r_m / beta1_correction) / denom + decay * r_p
        g.div_(tmp)
        torch.mul(p, s.weight_decay, out=tmp)
        g.add_(tmp)
        g.mul_(s.lr)  # r_p = r_p - lr * update
        p.sub_(g)
