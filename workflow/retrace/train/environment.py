"""The environment record of a training attempt (run.json ``environment``): what can change GPU numerics.

Besides the versions (Python, torch, CUDA, cuDNN, DeepSpeed), host and git commit, it records what makes
two runs on GPUs differ or agree bit for bit:

* the GPU this rank trains on (name, compute capability, memory) and the NVIDIA driver
  (``/proc/driver/nvidia/version``, else ``nvidia-smi``) with the CUDA driver API version;
* NCCL's version and every ``NCCL_*`` / ``TORCH_NCCL_*`` variable (algorithm, protocol, network);
* the numerics flags: TF32 for matmuls and cuDNN, cuBLAS's reduced-precision fp16/bf16 reductions,
  the float32 matmul precision, cuDNN deterministic/benchmark, deterministic algorithms (and warn-only),
  ``CUBLAS_WORKSPACE_CONFIG``, the SDPA backends enabled, and the deterministic mode asked for;
* the SDPA backend that actually runs the cell's attention (``sdpa_backend``): retrace's own attention
  function on the cell's head shape, dtype and device, forward and backward, with the aten kernels it
  dispatched to (recorded by a dispatch mode) named (``flash``, ``efficient``, ``cudnn``, ``math``, or the CPU
  flash kernel).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

#: autograd node name fragment → backend (checked in this order: the CPU flash kernel's node first). Each
#: fused SDPA kernel has its own node (derivatives.yaml: ``_scaled_dot_product_flash_attention_for_cpu`` →
#: ``ScaledDotProductFlashAttentionForCpuBackward0``); the math path is composite ops, so none of these.
_SDPA_NODES = (
    ("ScaledDotProductFlashAttentionForCpu", "flash (CPU kernel)"),
    ("ScaledDotProductFlashAttention", "flash"),
    ("ScaledDotProductEfficientAttention", "efficient"),
    ("ScaledDotProductCudnnAttention", "cudnn"),
    ("ScaledDotProductFusedAttentionOverrideable", "overrideable"),
)


def git_commit() -> str | None:
    """This checkout's commit (``-dirty`` when tracked files changed), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version, or None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def numerics_flags(*, deterministic: bool | None = None) -> dict[str, Any]:
    """The process-wide settings that change (or pin) GPU arithmetic, as they are now."""
    cuda_b = torch.backends.cuda
    flags: dict[str, Any] = {
        "deterministic_mode": deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "tf32_matmul": cuda_b.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "fp16_reduced_precision_reduction": getattr(cuda_b.matmul, "allow_fp16_reduced_precision_reduction", None),
        "bf16_reduced_precision_reduction": getattr(cuda_b.matmul, "allow_bf16_reduced_precision_reduction", None),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "sdpa_enabled": {name: bool(fn()) for name, fn in (
            ("flash", getattr(cuda_b, "flash_sdp_enabled", None)),
            ("efficient", getattr(cuda_b, "mem_efficient_sdp_enabled", None)),
            ("math", getattr(cuda_b, "math_sdp_enabled", None)),
            ("cudnn", getattr(cuda_b, "cudnn_sdp_enabled", None))) if fn is not None},
    }
    return flags


def sdpa_backend(*, attention: str, device: torch.device, dtype: torch.dtype, heads: int, seq_len: int,
                 head_dim: int) -> dict[str, Any]:
    """The SDPA kernel retrace's ``flash`` attention dispatches to for this head shape, dtype and device (one
    batch row), read off the autograd graph it builds: the fused kernel's backward node names it (a kernel
    the dispatcher chose, not one asked for); a graph without one ran the math path. ``global`` attention
    uses none. (A TorchDispatchMode would list the aten ops too, but imports torch._dynamo: 1.4 s of CPU
    on the main rank, while every other rank waits.)"""
    if attention != "flash":
        return {"backend": None, "note": "global attention: explicit baddbmm, masked softmax and bmm"}
    from retrace.model import _flash_attention  # the function the model's attention calls

    gen = torch.Generator(device=device).manual_seed(0)  # never the training RNG
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen, device=device, dtype=dtype)
               .requires_grad_(True) for _ in range(3))
    try:
        out = _flash_attention(q, k, v, 1.0 / head_dim**0.5)
        nodes = sorted(_graph_node_names(out.grad_fn))
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal: this is a record, not the run
        return {"backend": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    backend = next((label for fragment, label in _SDPA_NODES if any(fragment in n for n in nodes)), "math")
    return {"backend": backend, "autograd_nodes": nodes, "shape": [1, heads, seq_len, head_dim],
            "dtype": str(dtype)}


def _graph_node_names(root) -> set[str]:
    """Names of every node of an autograd graph (the probe's is a handful: the attention and the leaves)."""
    names: set[str] = set()
    todo, seen = [root], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def environment(device: torch.device | None = None, engine_name: str | None = None, *,
                deterministic: bool | None = None, sdpa: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of this process's environment (module doc); ``sdpa`` is ``sdpa_backend``'s result."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "device": str(device) if device is not None else None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu": None,
        "driver": nvidia_driver() if cuda else None,
        "cuda_driver_api": None,
        "nccl": None,
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))},
        "numerics": numerics_flags(deterministic=deterministic),
        "sdpa": sdpa,
    }
    if cuda:
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        env["cuda_driver_api"] = int(get_driver()) if get_driver is not None else None
        try:
            env["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a build without NCCL
            env["nccl"] = None
        if device is not None and device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_bytes": int(props.total_memory), "index": device.index}
    if engine_name == "deepspeed":
        try:
            import deepspeed

            env["deepspeed"] = deepspeed.__version__
        except ImportError:
            env["deepspeed"] = None
    return env
