"""Training engines: how one optimizer step is computed from ``gas`` micro-batches.

``builtin`` (this file) — plain PyTorch, runs everywhere (CPU fp16 included), and performs the
operations of GPT-NeoX v1.0 + DeeperSpeed ``eb7f5cff`` + apex ``a651e2c2`` in their precision and order
(reference/pythia-neox.md §2, §7):

* the module is cast to the compute dtype (``module.half()`` as DeepSpeed does); parameters and their
  ``.grad`` live in flat buffers per weight-decay group; an fp32 master copy exists for fp16/bf16;
* each micro-batch: loss = token-mean CE in fp32, ``(loss / gas) · loss_scale`` backward, gradients
  accumulate in the compute dtype in ``.grad``;
* at the gas boundary (``step``):
    1. data parallelism: all-reduce (sum) of the compute-dtype gradients, then ``× 1/dp`` — the pipeline
       engine's post-scaled all-reduce (``runtime/engine.py`` ``allreduce_bucket`` ~1323-1347; for
       Pythia's pp = 1 the gradients are all-reduced, not reduce-scattered: §7 items 4-5);
    2. overflow check in every precision: a tensor whose float32 sum is inf/NaN skips the step
       (``CheckOverflow``, stage1.py ~690-701);
    3. loss-scale update *before* unscaling (so on a doubling step the gradients are divided by the new
       scale) with the recipe's ZeRO stage's rules: stage 1 ``DynamicLossScaler`` (hysteresis; raises
       at the minimum scale, as DeepSpeed does), stage 0 ``FP16_Optimizer`` (14m/31m; see
       retrace.train.scaler);
    4. if not skipped: the clip norm of the scaled gradients — stage 1 per weight-decay group, squares
       summed in double, each group's total rounded to fp32, groups combined (``get_grad_norm``,
       stage1.py ~719-724); stage 0 one norm over the fp32 flat groups — and
       ``combined = scale · max(1, (norm/scale + 1e-6)/clip)``;
    5. apex FusedAdam (AdamW mode) on the fp32 master, in chunks with one reusable workspace
       (retrace.train.optim), with apex's step counter ``adam_t`` (below); the master cast back to the
       module (and, under ZeRO-1, the compute-dtype shards all-gathered);
    6. the LR counter advances only after an applied update (no ``lr_scheduler.step()`` on a skip).

Adam's step counter (§7 item 1). DeeperSpeed's ZeRO-1 constructor (``stage1.py``
``_initialize_optimizer_states`` ~313-325) and stage 0's ``FP16_Optimizer.initialize_optimizer_states``
(``fused_optimizer.py`` ~151-157) call ``optimizer.step()`` once on zero gradients at LR 0, and apex
increments its per-group ``step`` on every call (``fused_adam.py`` ~110-113): applied update k therefore
runs with t = k + 1. ``adam_t`` is that counter (1 after construction); ``adam_steps`` counts applied
updates. Starting from a Hugging Face checkpoint (weights only) is the same construction: zero moments,
t = 1, the first applied update uses t = 2.

Resuming from a GPT-NeoX native checkpoint with ZeRO optimizer state (§7 item 2): DeeperSpeed's elastic
checkpoint (default) saves only the moments, so GPT-NeoX resumes with t back at 1 (the constructor's init
step) whatever the step. ``load_optimizer_state(adam_t_mode=...)`` offers both models of a resumed
published step: ``"neox"`` (t restarts: what GPT-NeoX + DeeperSpeed compute given that checkpoint) and
``"continue"`` (t = applied updates + 1, as if the original never restarted). The default is
``"continue"``: a published run almost surely did not restart exactly at the step being resumed, and
any restart more than a few hundred updates earlier is numerically indistinguishable from none (the
bias corrections are ≈ 1 by then), so "continue" is the better model of the original trajectory; use
"neox" to compare against GPT-NeoX itself resuming.

ZeRO-1 (``zero1=True``, retrace.train.zero1): the fp32 master and moments are partitioned across the
data-parallel ranks (each rank updates its shard; bitwise the replicated result), the compute-dtype
weights all-gathered. ``state_tensors``/``load_state`` then hold one rank's shard.

fp32 has no counterpart in DeeperSpeed (ZeRO needs its fp16 block); it runs the same arithmetic with the
loss scale fixed at 1. Differences from the original that remain: summation orders (the all-reduce, the
norms, GEMMs), apex's fast-math kernel (see retrace.train.optim), and the inherent ones of §7.

``deepspeed`` (retrace.train.ds_engine) — today's DeepSpeed ZeRO engine configured like Pythia's
ds_config; fp16 only on GPU. It takes no initialisation step (t = k) and pre-divides gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from retrace.errors import RetraceError
from retrace.model import lm_loss
from retrace.pythia.recipes import Recipe, lr_at
from retrace.spec import ADAM_RESUME_MODES
from retrace.train.optim import (
    DEFAULT_CHUNK_ELEMS,
    NORM_PIECE_ELEMS,
    ApexAdamScalars,
    FlatGroup,
    apex_adam_,
    clip_combined_scale,
    decay_groups,
    f32,
    flatten_groups,
    fp16_optimizer_grad_norm,
    group_tensor_norms,
    has_inf_or_nan,
    zero1_grad_norm,
)
from retrace.train.scaler import LossScaleAtMinimum, LossScaler
from retrace.train.zero1 import Partition, all_gather_weights, shard_bytes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ADAM_T_MODES = ADAM_RESUME_MODES


@dataclass
class StepResult:
    lr: float  # the LR of this update (0 for a skipped step's would-be LR is still reported)
    loss_scale: float  # the scale the backward passes of this step ran with
    grad_norm: float  # global L2 norm of the unscaled, unclipped gradient (nan when skipped)
    skipped: bool


def make_scaler(recipe: Recipe, precision: str) -> LossScaler:
    """fp16: the dynamic scaler of the recipe's ZeRO stage (stage 0: FP16_Optimizer's rules); else static 1."""
    if precision == "fp16":
        rules = "fp16_optimizer" if recipe.zero_stage == 0 else "dynamic_loss_scaler"
        return LossScaler(scale=recipe.initial_loss_scale, window=recipe.loss_scale_window,
                          delayed_shift=recipe.hysteresis, min_scale=recipe.min_loss_scale, rules=rules)
    return LossScaler.static(1.0)


class BuiltinEngine:
    """The builtin engine (see the module docstring).

    Args:
        model: the network (moved to ``device`` and cast to the compute dtype in place).
        recipe: the run's recipe (optimizer constants, clipping, loss scaling, ``zero_stage``).
        precision: "fp16", "bf16" or "fp32".
        gas: gradient-accumulation steps (the loss is divided by it).
        device: where the model and the optimizer state live.
        world_size: data-parallel ranks (a process group must be initialised when > 1).
        group: the data-parallel process group (default: the world).
        lr_iter: the LR scheduler's counter to start from (the start step).
        simulated_ranks: run that many ranks one after another in this process (``end_rank``).
        zero1: partition the fp32 master and the moments across the ``world_size`` ranks.
        rank: this process's data-parallel rank (default: from the process group).
        chunk_elems: elements per chunk of the Adam update (workspace: 8·chunk_elems bytes).
    """

    name = "builtin"

    def __init__(self, model: nn.Module, recipe: Recipe, precision: str, *, gas: int,
                 device: torch.device | str = "cpu", world_size: int = 1, group=None, lr_iter: int = 0,
                 simulated_ranks: int = 1, zero1: bool = False, rank: int | None = None,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}")
        if zero1 and simulated_ranks > 1:
            raise RetraceError("ZeRO-1 partitions the optimizer across real ranks; it cannot simulate ranks")
        if chunk_elems < 1:
            raise ValueError("chunk_elems must be positive")
        self.recipe = recipe
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.device = torch.device(device)
        self.gas = int(gas)
        self.world_size = int(world_size)
        self.group = group
        if rank is None:
            rank = dist.get_rank(group) if self.world_size > 1 and dist.is_initialized() else 0
        self.partition = Partition(world_size=self.world_size if zero1 else 1, rank=int(rank) if zero1 else 0)
        model.to(device=self.device, dtype=self.dtype)
        self.model = model
        self.groups: list[FlatGroup] = flatten_groups(
            decay_groups(model, recipe.weight_decay), self.dtype, self.device,
            shards=self.partition.world_size, rank=self.partition.rank)
        self._grad_views = [v for g in self.groups for _, v in g.views(g.grad)]
        self.chunk_elems = int(chunk_elems)
        # One float32 workspace for the step: two Adam chunks of the largest shard, and the upcast of one
        # norm piece (NORM_PIECE_ELEMS of the largest tensor, or flat group for stage 0; a constant, so
        # the norms do not depend on chunk_elems or on the partition).
        shard = max((g.hi - g.lo for g in self.groups), default=0)
        tensor = max((g.numel for g in self.groups), default=0) if recipe.zero_stage == 0 else \
            max((v.numel() for v in self._grad_views), default=0)
        self.workspace = torch.empty(max(1, 2 * min(self.chunk_elems, shard), min(NORM_PIECE_ELEMS, tensor)),
                                     dtype=torch.float32, device=self.device)
        self.scaler = make_scaler(recipe, precision)
        self.adam_steps = 0  # applied updates
        self.adam_t = 1  # apex FusedAdam's group['step'] after the ZeRO constructor's init step
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
        if self.simulated_ranks <= 1:  # one rank: its gradients already are the sum (the step reduces nothing)
            return
        if self._reduce is None:
            self._reduce = [torch.zeros_like(g.grad) for g in self.groups]
        for acc, g in zip(self._reduce, self.groups, strict=True):
            acc.add_(g.grad)
            g.grad.zero_()

    # -- the optimizer step at the gas boundary ---------------------------------------------------------
    @torch.no_grad()
    def step(self, *, step: int | None = None) -> StepResult:
        """The optimizer step at the gas boundary. ``step`` (the step number being produced) only
        names the step in the error raised on an overflow at the minimum loss scale.

        Raises:
            LossScaleAtMinimum: an fp16 overflow with the loss scale already at ``min_loss_scale``
                (stage 1; DeepSpeed raises there and the run stops).
        """
        self._reduce_gradients()
        norms = group_tensor_norms(self.groups, piece=NORM_PIECE_ELEMS, workspace=self.workspace)
        overflow = has_inf_or_nan(self._grad_views, norms=[n for group in norms for n in group])
        prev_scale = self.scaler.scale
        lr = lr_at(self.lr_iter, self.recipe)
        try:
            self.scaler.update(overflow)
        except LossScaleAtMinimum as exc:
            where = f"step {step}" if step is not None else f"optimizer step {self.scaler.cur_iter + 1} of this run"
            raise LossScaleAtMinimum(f"{where}: {exc}", scale=exc.scale, step=step) from None
        if overflow:
            self._zero_grad()
            return StepResult(lr=lr, loss_scale=prev_scale, grad_norm=float("nan"), skipped=True)
        if self.recipe.zero_stage == 0:
            scaled_norm = fp16_optimizer_grad_norm(self.groups, piece=NORM_PIECE_ELEMS,
                                                   workspace=self.workspace)
        else:
            scaled_norm = zero1_grad_norm(norms)
        scale = self.scaler.scale  # DeepSpeed unscales with the already-updated scale (see module doc)
        combined = clip_combined_scale(scaled_norm, scale, self.recipe.clip_grad)
        self.adam_t += 1
        self.adam_steps += 1
        for g in self.groups:
            s = ApexAdamScalars.for_step(step=self.adam_t, lr=lr, betas=self.recipe.betas, eps=self.recipe.eps,
                                         weight_decay=g.weight_decay)
            apex_adam_(master=g.master, exp_avg=g.exp_avg, exp_avg_sq=g.exp_avg_sq, grad=g.grad[g.lo:g.hi],
                       inv_scale=1.0 / combined, s=s, workspace=self.workspace)
            if g.master.data_ptr() != g.model[g.lo:g.hi].data_ptr():
                g.model[g.lo:g.hi].copy_(g.master)
        all_gather_weights(self.groups, self.partition, self.group)
        self.lr_iter += 1
        self._zero_grad()
        return StepResult(lr=lr, loss_scale=prev_scale, grad_norm=scaled_norm / prev_scale, skipped=False)

    def _reduce_gradients(self) -> None:
        if self.simulated_ranks > 1:
            if self._reduce is None:
                raise RuntimeError("simulated ranks: end_rank() was never called")
            for acc, g in zip(self._reduce, self.groups, strict=True):
                g.grad.copy_(acc)
                acc.zero_()
                g.grad.mul_(f32(1.0 / self.simulated_ranks))
        if self.world_size > 1:
            for g in self.groups:
                dist.all_reduce(g.grad, group=self.group)
                g.grad.mul_(f32(1.0 / self.world_size))  # CUDA: a float scalar

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

    def iter_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, weight) of the module in the compute dtype on the device: views of the flat
        buffers, nothing copied (a checkpoint streams them to disk)."""
        for g in self.groups:
            yield from g.views(g.model)

    def master_params(self) -> dict[str, torch.Tensor]:
        """The fp32 master by canonical name (replicated engine only: under ZeRO-1 a rank holds a shard)."""
        if self.partition.sharded:
            raise RetraceError("master_params: under ZeRO-1 each rank holds only its shard (see state_tensors)")
        return {name: v for g in self.groups for name, v in g.views(g.master)}

    def optimizer_bytes(self) -> dict[str, int]:
        """Bytes of the optimizer tensors this rank allocated: separate fp32 master, moments, workspace."""
        b = shard_bytes(self.groups)
        b["workspace"] = self.workspace.numel() * self.workspace.element_size()
        b["total"] += b["workspace"]
        return b

    def iter_state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the resume state one at a time, without copies (this rank's shard under
        ZeRO-1), so a writer can stream them to disk one by one."""
        for i, g in enumerate(self.groups):
            yield f"group{i}.master", g.master
            yield f"group{i}.exp_avg", g.exp_avg
            yield f"group{i}.exp_avg_sq", g.exp_avg_sq

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.iter_state_tensors())

    def state_meta(self) -> dict:
        return {
            "engine": self.name,
            "precision": self.precision,
            "adam_steps": self.adam_steps,
            "adam_t": self.adam_t,
            "lr_iter": self.lr_iter,
            "loss_scaler": self.scaler.state_dict(),
            "partition": self.partition.to_meta(),
            "groups": [{"names": g.names, "numel": g.numel, "weight_decay": g.weight_decay, "lo": g.lo, "hi": g.hi}
                       for g in self.groups],
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore ``state_tensors``/``state_meta`` written by an engine of the same layout (and, under
        ZeRO-1, the same rank and world size)."""
        groups = meta["groups"]
        if [gm["names"] for gm in groups] != [g.names for g in self.groups]:
            raise ValueError("the saved parameter groups do not match this model")
        # The JSON is shared by the ranks (written by rank 0); which shard a file holds is its name
        # (rank{r}.safetensors, retrace.train.trainer), so only the layout is compared here.
        saved_world = meta.get("partition", {"world_size": 1})["world_size"]
        if saved_world != self.partition.world_size:
            raise ValueError(f"the saved optimizer state is partitioned over {saved_world} rank(s) but this "
                             f"engine runs on {self.partition.world_size}")
        for i, g in enumerate(self.groups):
            g.master.copy_(tensors[f"group{i}.master"])
            g.exp_avg.copy_(tensors[f"group{i}.exp_avg"])
            g.exp_avg_sq.copy_(tensors[f"group{i}.exp_avg_sq"])
            if g.master.data_ptr() != g.model[g.lo:g.hi].data_ptr():
                g.model[g.lo:g.hi].copy_(g.master)
        all_gather_weights(self.groups, self.partition, self.group)
        self.adam_steps = int(meta["adam_steps"])
        self.adam_t = int(meta.get("adam_t", self.adam_steps + 1))
        self.lr_iter = int(meta["lr_iter"])
        self.scaler.load_state_dict(meta["loss_scaler"])
        self._zero_grad()

    @torch.no_grad()
    def load_optimizer_state(self, *, master: dict[str, torch.Tensor] | None = None,
                             exp_avg: dict[str, torch.Tensor] | None = None,
                             exp_avg_sq: dict[str, torch.Tensor] | None = None,
                             adam_steps: int | None = None, lr_iter: int | None = None,
                             loss_scaler: dict | None = None, adam_t_mode: str = "continue") -> None:
        """Install an optimizer state given per canonical parameter name (e.g. from a NeoX ZeRO checkpoint).

        Args:
            master, exp_avg, exp_avg_sq: whole tensors by name (each rank keeps its shard).
            adam_steps: the applied updates of the run that wrote the state.
            lr_iter: its LR scheduler counter.
            loss_scaler: its loss-scaler state.
            adam_t_mode: apex's step counter after the load — ``"continue"`` (default; t = adam_steps + 1,
                as if the original never restarted) or ``"neox"`` (t = 1, as GPT-NeoX + DeeperSpeed's
                elastic checkpoint resumes: only the moments are restored). See the module docstring.
        """
        if adam_t_mode not in ADAM_T_MODES:
            raise RetraceError(f"adam_t_mode must be one of {', '.join(ADAM_T_MODES)}, got {adam_t_mode!r}")
        for g in self.groups:
            for src, flat in ((master, g.master), (exp_avg, g.exp_avg), (exp_avg_sq, g.exp_avg_sq)):
                if src is None:
                    continue
                for name, p_start, s_start, n in g.shard_pieces():
                    flat[s_start : s_start + n].copy_(src[name].reshape(-1)[p_start : p_start + n])
            if master is not None and g.master.data_ptr() != g.model[g.lo:g.hi].data_ptr():
                g.model[g.lo:g.hi].copy_(g.master)
        if master is not None:
            all_gather_weights(self.groups, self.partition, self.group)
        if adam_steps is not None:
            self.adam_steps = int(adam_steps)
        self.adam_t = 1 if adam_t_mode == "neox" else self.adam_steps + 1
        if lr_iter is not None:
            self.lr_iter = int(lr_iter)
        if loss_scaler:
            self.scaler.load_state_dict(loss_scaler)
