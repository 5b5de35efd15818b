"""The ``deepspeed`` engine: the real DeepSpeed runtime configured like Pythia's ds_config.

Optional dependency (``pip install -c constraints/cpu.txt deepspeed`` on CPU). Configuration:
  * ZeRO stage from the recipe (1; Pythia's 14m/31m used stage 0, which ZeRO-1 matches value for value
    and which this engine runs as stage 1 so that its state can be saved the same way), allgather /
    reduce bucket sizes, ``overlap_comm``, ``reduce_scatter``, ``contiguous_gradients``;
  * optimizer ``Adam`` with ``adam_w_mode`` (AdamW), betas, eps, weight decay given per group (the same
    groups as the builtin engine), FusedAdam on GPU and ``torch_adam`` (torch.optim.AdamW) on CPU, which
    avoids DeepSpeed's CPU-Adam JIT build;
  * ``gradient_clipping`` set explicitly (DeepSpeed's default is not Pythia's semantics to rely on);
  * fp16: dynamic loss scale, initial 2^12, window 1000, hysteresis 2, min 1 — GPU only, DeepSpeed refuses
    fp16 on CPU ("Type fp16 is not supported"); bf16 and fp32 run on CPU;
  * the LR is our GPT-NeoX v1.0 schedule as a client scheduler, which DeepSpeed steps only after an applied
    update (never on an fp16 overflow), as DeeperSpeed did.

On GPU: FusedAdam is a CUDA extension DeepSpeed compiles with nvcc on first use (unless the wheel was
built with ``DS_BUILD_FUSED_ADAM=1``). ``ensure_fused_adam`` builds (or loads) it before the engine is made,
into a node-local ``TORCH_EXTENSIONS_DIR`` (``$TMPDIR`` or /tmp; the default ~/.cache is usually a shared
filesystem, where the build lock of many ranks and nodes misbehaves), so that a missing toolkit is one
clear error naming the fix (envs/torch2.*.yaml carry nvcc). DeepSpeed binds the device ``LOCAL_RANK``
names; with one GPU per task (``--gpus-per-task``, ``--gpu-bind``) that index does not exist, so the
engine is handed the trainer's device (``device_rank``, and ``LOCAL_RANK`` = its index while DeepSpeed
initialises).

Semantics: DeepSpeed ≥ 0.10 keeps DeeperSpeed's order (overflow check, loss-scale update, then unscale
with the updated scale, clip coefficient (norm/scale + 1e-6)/clip), so it matches the builtin engine up to
rounding; on CPU with ``torch_adam`` the update is torch's AdamW formula rather than apex's (equal up to
rounding). Resume states are per rank (rank{r}.safetensors: the rank's fp32 partition, its Adam moments,
the loss scaler and counters) and need the same number of ranks.
"""

from __future__ import annotations

import atexit
import os
import types

import torch
import torch.distributed as dist
from torch import nn

from retrace.errors import RetraceError
from retrace.model import lm_loss
from retrace.pythia.recipes import Recipe, lr_at
from retrace.train.distributed import free_port
from retrace.train.engine import StepResult
from retrace.train.optim import decay_groups


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class NeoXAnnealingLR:
    """GPT-NeoX v1.0 AnnealingLR as a DeepSpeed client scheduler: ``step()`` after each applied update."""

    def __init__(self, optimizer, recipe: Recipe, num_iters: int):
        self.optimizer = optimizer
        self.recipe = recipe
        self.num_iters = int(num_iters)
        self._set()

    def get_lr(self) -> list[float]:
        return [lr_at(self.num_iters, self.recipe)] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def _set(self) -> None:
        lr = lr_at(self.num_iters, self.recipe)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, *args, **kwargs) -> None:
        self.num_iters += 1
        self._set()

    def state_dict(self) -> dict:
        return {"num_iters": self.num_iters}

    def load_state_dict(self, sd: dict) -> None:
        self.num_iters = int(sd["num_iters"])
        self._set()


def node_local_extensions_dir() -> str:
    """``TORCH_EXTENSIONS_DIR`` if set, else a per-user directory under ``$TMPDIR`` (or /tmp), set for the
    process (and its ranks) so every JIT-built op lands on the node's own disk."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = os.environ.get("TMPDIR") or "/tmp"
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(base, f"retrace-torch-extensions-{os.getuid()}")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def _conda_cuda_home() -> None:
    """In a conda environment holding nvcc (envs/torch2.*.yaml), point torch's extension builder at it:
    CUDA_HOME = the environment, and its targets/<arch>/include (where conda-forge puts the CUDA headers)
    on CPATH."""
    prefix = os.environ.get("CONDA_PREFIX")
    if not prefix or os.environ.get("CUDA_HOME") or not os.path.exists(os.path.join(prefix, "bin", "nvcc")):
        return
    os.environ["CUDA_HOME"] = prefix
    targets = os.path.join(prefix, "targets")
    includes = [os.path.join(targets, t, "include") for t in sorted(os.listdir(targets))] \
        if os.path.isdir(targets) else []
    cpath = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    os.environ["CPATH"] = os.pathsep.join([*cpath, *(i for i in includes if i not in cpath)])


def ensure_fused_adam() -> None:
    """Load DeepSpeed's FusedAdam CUDA op, building it (nvcc) into the node-local extensions directory if
    it was not prebuilt.

    Raises:
        RetraceError: it cannot be built, naming the toolkit it needs.
    """
    where = node_local_extensions_dir()
    _conda_cuda_home()
    fix = ("It is compiled with nvcc on first use: create the cell's environment from envs/torch2.*.yaml (they "
           "carry the CUDA toolkit), or install DeepSpeed prebuilt (DS_BUILD_FUSED_ADAM=1 pip install deepspeed "
           f"on a machine with nvcc); build directory: {where}")
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    if not installed_ops.get("fused_adam") and nvcc_path() is None:
        raise RetraceError("--engine deepspeed on GPU needs DeepSpeed's FusedAdam op, which this DeepSpeed was "
                           f"installed without, and there is no nvcc (PATH, $CUDA_HOME/bin). {fix}")
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - the builder raises whatever nvcc or the linker says
        raise RetraceError(f"--engine deepspeed on GPU needs DeepSpeed's FusedAdam op, which could not be "
                           f"built ({exc}). {fix}") from exc


def nvcc_path() -> str | None:
    """nvcc on PATH or under $CUDA_HOME/bin, or None."""
    import shutil

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def ds_config(recipe: Recipe, precision: str, *, pdbs: int, gas: int, world_size: int, cpu: bool,
              zero_stage: int) -> dict:
    bucket = int(recipe.reduce_bucket_size)
    return {
        "train_batch_size": pdbs * gas * world_size,
        "train_micro_batch_size_per_gpu": pdbs,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": recipe.clip_grad,
        "optimizer": {"type": "Adam", "params": {"lr": recipe.lr, "betas": list(recipe.betas), "eps": recipe.eps,
                                                 "weight_decay": recipe.weight_decay, "adam_w_mode": True,
                                                 **({"torch_adam": True} if cpu else {})}},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": recipe.initial_scale_power, "loss_scale_window": recipe.loss_scale_window,
                 "hysteresis": recipe.hysteresis, "min_loss_scale": recipe.min_loss_scale},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": zero_stage, "allgather_partitions": True, "allgather_bucket_size": bucket,
                              "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": bucket,
                              "contiguous_gradients": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, recipe: Recipe, precision: str, *, pdbs: int, gas: int, world_size: int,
                 device: torch.device, lr_iter: int = 0, zero_stage: int = 1):
        try:
            import deepspeed
        except ImportError as exc:
            raise RetraceError("--engine deepspeed needs DeepSpeed: pip install -c constraints/cpu.txt deepspeed "
                               "(CPU) or pip install deepspeed (GPU)") from exc
        cpu = device.type == "cpu"
        if precision == "fp16" and cpu:
            raise RetraceError("DeepSpeed refuses fp16 on CPU; use --engine builtin (which runs DeepSpeed's fp16 "
                               "semantics on CPU) or --precision bf16/fp32")
        self.owns_process_group = False
        self.recipe, self.precision, self.gas, self.device = recipe, precision, int(gas), device
        self.zero_stage = max(1, int(zero_stage))
        model.to(device)
        groups = decay_groups(model, recipe.weight_decay)
        self.group_names = [g["names"] for g in groups]
        params = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        config = ds_config(recipe, precision, pdbs=pdbs, gas=gas, world_size=world_size, cpu=cpu,
                           zero_stage=self.zero_stage)
        # DeepSpeed needs a process group and LOCAL_RANK even for one rank; set them for the call only
        # (left behind, RANK/WORLD_SIZE would look like a launcher's to the next run in this process).
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0"}
        if dist.is_initialized():
            env = {"LOCAL_RANK": str(dist.get_rank())}
        forced = {}
        args = None
        if not cpu:  # DeepSpeed's device is LOCAL_RANK's index unless handed one: hand it ours
            ensure_fused_adam()
            forced = {"LOCAL_RANK": str(device.index if device.index is not None else torch.cuda.current_device())}
            args = types.SimpleNamespace(device_rank=int(forced["LOCAL_RANK"]))
        saved = {k: os.environ.get(k) for k in {**env, **forced}}
        os.environ.update({k: v for k, v in env.items() if saved.get(k) is None})
        os.environ.update(forced)
        try:
            if not dist.is_initialized():
                # Kept for the life of the process (DeepSpeed caches groups made from it, so a second
                # engine in this process must find the same one) and destroyed at exit.
                deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
                atexit.register(_destroy_process_group)
            self.ds, self.opt, _, self.sched = deepspeed.initialize(
                args=args, model=model, model_parameters=params, config=config,
                lr_scheduler=lambda opt: NeoXAnnealingLR(opt, recipe, lr_iter))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.model = self.ds.module
        self._micro = 0
        self._adam_steps = 0

    # -- counters ---------------------------------------------------------------------------------------
    @property
    def lr_iter(self) -> int:
        return self.sched.num_iters

    @property
    def adam_steps(self) -> int:
        return self._adam_steps

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.ds.optimizer, "loss_scale", 1.0))

    # -- training ---------------------------------------------------------------------------------------
    def forward_backward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = sample.to(self.device, non_blocking=True)
        loss = lm_loss(self.ds(sample[:, :-1]), sample[:, 1:])
        self.ds.backward(loss)  # DeepSpeed divides by gas and multiplies by the loss scale
        self._micro += 1
        if self._micro < self.gas:
            self.ds.step()  # not a boundary: only counts the micro-step
        return loss.detach()

    def step(self, *, step: int | None = None) -> StepResult:
        """One optimizer step (``step``: the step it produces, for messages; DeepSpeed raises its own)."""
        if self._micro != self.gas:
            raise RuntimeError(f"step() after {self._micro} micro-batches, expected {self.gas}")
        self._micro = 0
        lr = lr_at(self.sched.num_iters, self.recipe)
        scale = self.loss_scale
        before = self.sched.num_iters
        self.ds.step()
        skipped = self.sched.num_iters == before
        if not skipped:
            self._adam_steps += 1
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None and not skipped else float("nan")
        return StepResult(lr=lr, loss_scale=scale, grad_norm=norm, skipped=skipped)

    # -- parameters and state ---------------------------------------------------------------------------
    def export_params(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(device="cpu", dtype=dtype).clone() for n, p in self.model.named_parameters()}

    def iter_params(self):
        """(name, weight) of the module on the device, nothing copied."""
        yield from ((n, p.detach()) for n, p in self.model.named_parameters())

    def iter_state_tensors(self):
        """(name, tensor) of this rank's resume state, views of DeepSpeed's buffers (nothing copied)."""
        yield from self.state_tensors().items()

    def _zero(self):
        opt = self.ds.optimizer
        if not hasattr(opt, "single_partition_of_fp32_groups"):
            raise RetraceError(f"deepspeed engine: unsupported optimizer wrapper {type(opt).__name__}")
        return opt

    def state_tensors(self) -> dict[str, torch.Tensor]:
        opt = self._zero()
        t = {}
        for i, part in enumerate(opt.single_partition_of_fp32_groups):
            t[f"group{i}.master"] = part.detach()
            st = opt.optimizer.state.get(part, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    t[f"group{i}.{key}"] = st[key].detach()
        return t

    def state_meta(self) -> dict:
        opt = self._zero()
        steps = []
        for part in opt.single_partition_of_fp32_groups:
            s = opt.optimizer.state.get(part, {}).get("step")
            steps.append(float(s) if s is not None else None)
        group_steps = [g.get("step") for g in opt.optimizer.param_groups]
        scaler = {k: v for k, v in vars(opt.loss_scaler).items() if isinstance(v, (int, float, bool))}
        return {"engine": self.name, "precision": self.precision, "adam_steps": self._adam_steps,
                "lr_iter": self.sched.num_iters, "loss_scaler": scaler, "state_steps": steps,
                "group_steps": [None if s is None else float(s) for s in group_steps],
                "groups": [{"names": n} for n in self.group_names], "zero_stage": self.zero_stage}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        opt = self._zero()
        if [g["names"] for g in meta["groups"]] != self.group_names:
            raise ValueError("the saved parameter groups do not match this model")
        for i, part in enumerate(opt.single_partition_of_fp32_groups):
            part.copy_(tensors[f"group{i}.master"])
            if f"group{i}.exp_avg" in tensors:
                st = opt.optimizer.state.setdefault(part, {})
                st["exp_avg"] = tensors[f"group{i}.exp_avg"].to(part.device).clone()
                st["exp_avg_sq"] = tensors[f"group{i}.exp_avg_sq"].to(part.device).clone()
                step = meta["state_steps"][i]
                st["step"] = torch.tensor(float(step)) if step is not None else torch.tensor(0.0)
        for g, s in zip(opt.optimizer.param_groups, meta.get("group_steps", []), strict=False):
            if s is not None:
                g["step"] = int(s)
        for k, v in meta["loss_scaler"].items():
            setattr(opt.loss_scaler, k, v)
        opt.update_lp_params()  # fp32 partitions → the module's (fp16/bf16/fp32) weights, all-gathered
        self._adam_steps = int(meta["adam_steps"])
        self.sched.load_state_dict({"num_iters": meta["lr_iter"]})

    def load_optimizer_state(self, **kwargs) -> None:
        raise RetraceError("--engine deepspeed cannot start from a GPT-NeoX optimizer state yet; use --engine builtin")
