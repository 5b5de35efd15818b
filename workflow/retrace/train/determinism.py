"""Deterministic mode: two runs of one cell on the same node type and software compute the same bits.

``apply(deterministic=True)`` (the default of ``retrace train``) sets, before any CUDA work:

* ``torch.use_deterministic_algorithms(True)`` (strict: an op without a deterministic kernel raises
  instead of running). Under it PyTorch's SDPA flash and memory-efficient backwards run their
  deterministic variants and the cuDNN attention backend is not chosen; retrace's ``flash`` attention
  allows only flash and memory-efficient (retrace.model), ``global`` attention is plain matmuls and a
  softmax. Strict mode also fills ``torch.empty`` with NaN (PyTorch's ``fill_uninitialized_memory``).
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's reproducible workspace; needed by the strict mode);
* ``torch.backends.cudnn.deterministic = True``, ``benchmark = False``;
* TF32 off for matmuls and cuDNN (fp32 runs stay fp32; fp16/bf16 runs are not affected);
* ``NCCL_ALGO=Ring`` and ``NCCL_PROTO=Simple`` unless already set: NCCL otherwise picks the algorithm
  and protocol from the message size and the topology it detects, and a different choice reassociates
  the all-reduce's sums. Ring with the same rank order sums in the same order on every run.

What stays different between runs that are bitwise equal elsewhere: another GPU model or driver/cuBLAS
version picks other GEMM kernels (other summation orders), and another node count or interconnect
changes NCCL's ring. ``deterministic=False`` leaves every library default (faster, not reproducible).
The settings are recorded in run.json (retrace.train.environment). ``apply`` returns a function that
restores the previous settings (tests and notebooks run several trainings in one process).

``torch.use_deterministic_algorithms`` itself also sets TorchInductor's ``deterministic`` flag, and
importing that config imports torch._dynamo: 1.4 s of CPU per process (up to 7 s of wall with 8 ranks
sharing 2 cores), paid by every rank of every cell although retrace compiles nothing. ``set_algorithms``
makes the same call into ATen and sets the inductor flag only where inductor is already loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

#: Environment variables deterministic mode sets when they are unset (a user's own value is kept).
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def set_algorithms(mode: bool, *, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=…)`` without importing TorchInductor: the same
    ATen setting, and inductor's flag set only if something loaded inductor (then it is cheap)."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # another torch: the public call, whatever it costs
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        return
    setter(mode, warn_only=warn_only)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = mode


def apply(*, deterministic: bool) -> Callable[[], None]:
    """Set (or, with ``deterministic=False``, leave) the settings of the module doc; returns the restorer."""
    saved_env = {k: os.environ.get(k) for k in DETERMINISTIC_ENV}
    saved = {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }

    def restore() -> None:
        set_algorithms(saved["algorithms"], warn_only=saved["warn_only"])
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    if deterministic:
        for k, v in DETERMINISTIC_ENV.items():
            os.environ.setdefault(k, v)
        set_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return restore
