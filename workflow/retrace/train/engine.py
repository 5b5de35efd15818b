"""Training engines: how one optimizer step is computed from ``gas`` micro-batches.

``builtin`` (this file) — plain PyTorch, runs everywhere (CPU fp16 included):
    * the module is cast to the compute dtype (``module.half()`` as DeepSpeed does); parameters and
      their ``.grad`` live in flat buffers; an fp32 master copy exists for fp16/bf16;
    * each micro-batch: loss = token-mean CE in fp32, ``(loss / gas) · loss_scale`` backward, gradients
      accumulate in the compute dtype (fp16 for fp16) in ``.grad``;
    * at the gas boundary: all-reduce (sum) of the fp16 gradients and ×1/world (DeepSpeed's
      post-scaled reduce), global L2 norm over the scaled gradients (per-tensor fp32 norms, summed in
      float64), overflow check (fp16 only), loss-scale update, and — if not skipped — DeepSpeed's
      ``unscale_and_clip_grads`` on the fp32 copy (combined scale = scale·max(1, (norm/scale + 1e-6)/clip)),
      apex-FusedAdam update of the fp32 master, cast back to the module.
    This is the arithmetic of DeeperSpeed's ZeRO-1 optimizer (GPT-NeoX v1.0): ZeRO-1 only partitions
    where the master copy lives and reduce-scatters instead of all-reducing, which changes no value
    (sum of the same fp16 tensors; Adam is elementwise). Differences from the original: the order of
    the all-reduce summation (NCCL ring vs. gloo), and the norm summation order.

    One DeepSpeed quirk is reproduced on purpose: the loss scale is updated *before* the gradients are
    unscaled, so on a step where the scale doubles (after ``window`` good steps) the gradients are
    divided by the new scale (i.e. halved) and the clip coefficient uses it too. The logged grad norm
    uses the scale the backward pass ran with, as DeepSpeed's ``_global_grad_norm`` does.

``deepspeed`` (retrace.train.ds_engine) — the real DeepSpeed ZeRO engine configured like Pythia's
ds_config; fp16 only on GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from retrace.model import lm_loss
from retrace.pythia.recipes import Recipe, lr_at
from retrace.train.optim import FlatGroup, adam_step, decay_groups, flatten_groups
from retrace.train.scaler import LossScaler

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class StepResult:
    lr: float  # the LR of this update (0 for a skipped step's would-be LR is still reported)
    loss_scale: float  # the scale the backward passes of this step ran with
    grad_norm: float  # global L2 norm of the unscaled, unclipped gradient (nan when skipped)
    skipped: bool


def make_scaler(recipe: Recipe, precision: str) -> LossScaler:
    if precision == "fp16":
        return LossScaler(scale=recipe.initial_loss_scale, window=recipe.loss_scale_window,
                          delayed_shift=recipe.hysteresis, min_scale=recipe.min_loss_scale)
    return LossScaler.static(1.0)


class BuiltinEngine:
    name = "builtin"

    def __init__(self, model: nn.Module, recipe: Recipe, precision: str, *, gas: int,
                 device: torch.device | str = "cpu", world_size: int = 1, group=None, lr_iter: int = 0,
                 simulated_ranks: int = 1):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}")
        self.recipe = recipe
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        self.gas = int(gas)
        self.world_size = int(world_size)
        self.group = group
        model.to(device=self.device, dtype=self.dtype)
        self.model = model
        self.groups: list[FlatGroup] = flatten_groups(decay_groups(model, recipe.weight_decay), self.dtype,
                                                      self.device)
        self._grad_views = [v for g in self.groups for _, v in g.views(g.grad)]
        self.scaler = make_scaler(recipe, precision)
        self.adam_steps = 0  # applied updates (apex FusedAdam's per-group 'step')
        self.lr_iter = int(lr_iter)  # AnnealingLR.num_iters: advanced only after an applied update
        self.simulated_ranks = int(simulated_ranks)
        self._reduce: list[torch.Tensor] | None = None

    # -- one micro-batch ---------------------------------------------------------------------------------
    def forward_backward(self, sample: torch.Tensor) -> torch.Tensor:
        """``sample`` int64 [pdbs, seq+1]; returns the unscaled micro-batch loss (detached, fp32)."""
        sample = sample.to(self.device, non_blocking=True)
        tokens, labels = sample[:, :-1], sample[:, 1:]
        loss = lm_loss(self.model(tokens), labels)
        scaled = loss / self.gas if self.gas != 1 else loss
        if self.scaler.scale != 1.0:
            scaled = scaled * self.scaler.scale
        scaled.backward()
        return loss.detach()

    @torch.no_grad()
    def end_rank(self) -> None:
        """Simulated data parallelism: add this rank's accumulated gradients into the reduce buffer
        (in the gradient dtype, ranks in order, like a sequential all-reduce sum) and start the next rank."""
        if self._reduce is None:
            self._reduce = [torch.zeros_like(g.grad) for g in self.groups]
        for acc, g in zip(self._reduce, self.groups, strict=True):
            acc.add_(g.grad)
            g.grad.zero_()

    # -- the optimizer step at the gas boundary ---------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        if self.simulated_ranks > 1:
            if self._reduce is None:
                raise RuntimeError("simulated ranks: end_rank() was never called")
            for acc, g in zip(self._reduce, self.groups, strict=True):
                g.grad.copy_(acc)
                acc.zero_()
                g.grad.mul_(1.0 / self.simulated_ranks)
        if self.world_size > 1:
            for g in self.groups:
                dist.all_reduce(g.grad, group=self.group)
                g.grad.mul_(1.0 / self.world_size)
        norms = torch._foreach_norm(self._grad_views, 2, dtype=torch.float32)
        scaled_norm = math.sqrt(float(torch.stack(norms).double().square().sum())) if norms else 0.0
        overflow = self.precision == "fp16" and not math.isfinite(scaled_norm)
        prev_scale = self.scaler.scale
        lr = lr_at(self.lr_iter, self.recipe)
        self.scaler.update(overflow)
        if overflow:
            self._zero_grad()
            return StepResult(lr=lr, loss_scale=prev_scale, grad_norm=float("nan"), skipped=True)
        scale = self.scaler.scale  # DeepSpeed unscales with the already-updated scale (see module doc)
        combined = scale
        if self.recipe.clip_grad > 0:
            clip = (scaled_norm / scale + 1e-6) / self.recipe.clip_grad
            if clip > 1:
                combined = clip * scale
        self.adam_steps += 1
        for g in self.groups:
            grad32 = g.grad if g.grad.dtype == torch.float32 else g.grad.to(torch.float32)
            if combined != 1.0:
                grad32.mul_(1.0 / combined)
            adam_step(g, grad32, lr=lr, step=self.adam_steps, betas=self.recipe.betas, eps=self.recipe.eps)
            del grad32
            if g.model is not g.master:
                g.model.copy_(g.master)
        self.lr_iter += 1
        self._zero_grad()
        return StepResult(lr=lr, loss_scale=prev_scale, grad_norm=scaled_norm / prev_scale, skipped=False)

    def _zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()

    # -- parameters and state ----------------------------------------------------------------------------
    def export_params(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The module's weights (compute dtype) cast to ``dtype``, by canonical name, on the CPU."""
        out = {}
        for g in self.groups:
            for name, v in g.views(g.model):
                out[name] = v.detach().to(device="cpu", dtype=dtype).clone()
        return out

    def master_params(self) -> dict[str, torch.Tensor]:
        return {name: v for g in self.groups for name, v in g.views(g.master)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        for i, g in enumerate(self.groups):
            t[f"group{i}.master"] = g.master
            t[f"group{i}.exp_avg"] = g.exp_avg
            t[f"group{i}.exp_avg_sq"] = g.exp_avg_sq
        return t

    def state_meta(self) -> dict:
        return {
            "engine": self.name,
            "precision": self.precision,
            "adam_steps": self.adam_steps,
            "lr_iter": self.lr_iter,
            "loss_scaler": self.scaler.state_dict(),
            "groups": [{"names": g.names, "numel": g.numel, "weight_decay": g.weight_decay} for g in self.groups],
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        groups = meta["groups"]
        if [gm["names"] for gm in groups] != [g.names for g in self.groups]:
            raise ValueError("the saved parameter groups do not match this model")
        for i, g in enumerate(self.groups):
            g.master.copy_(tensors[f"group{i}.master"])
            g.exp_avg.copy_(tensors[f"group{i}.exp_avg"])
            g.exp_avg_sq.copy_(tensors[f"group{i}.exp_avg_sq"])
            if g.model is not g.master:
                g.model.copy_(g.master)
        self.adam_steps = int(meta["adam_steps"])
        self.lr_iter = int(meta["lr_iter"])
        self.scaler.load_state_dict(meta["loss_scaler"])
        self._zero_grad()

    @torch.no_grad()
    def load_optimizer_state(self, *, master: dict[str, torch.Tensor] | None = None,
                             exp_avg: dict[str, torch.Tensor] | None = None,
                             exp_avg_sq: dict[str, torch.Tensor] | None = None,
                             adam_steps: int | None = None, lr_iter: int | None = None,
                             loss_scaler: dict | None = None) -> None:
        """Install an optimizer state given per canonical parameter name (e.g. from a NeoX ZeRO checkpoint)."""
        for g in self.groups:
            for src, flat in ((master, g.master), (exp_avg, g.exp_avg), (exp_avg_sq, g.exp_avg_sq)):
                if src is None:
                    continue
                for name, view in g.views(flat):
                    view.copy_(src[name].reshape(view.shape))
            if master is not None and g.model is not g.master:
                g.model.copy_(g.master)
        if adam_steps is not None:
            self.adam_steps = int(adam_steps)
        if lr_iter is not None:
            self.lr_iter = int(lr_iter)
        if loss_scaler:
            self.scaler.load_state_dict(loss_scaler)
