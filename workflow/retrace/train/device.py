"""The device a rank trains on, and the check that a GPU cell got the GPU its ``gpu_type`` names.

A GPU cell whose CUDA fails to start must not quietly train on the CPU (and be recorded as an a100
cell): the workflow passes ``device: cuda`` for every GPU cell, and ``select_device`` refuses to fall
back. On CUDA, ``torch.cuda.get_device_name()`` is matched against the names the cell expects (its
``gpu_type`` and the study's ``cluster.gpu_models`` name for it): a name matches when each of its words
(letters and digits, case ignored, "nvidia" dropped) is one of the device name's words or several of
them run together — ``a100`` and ``a100_80gb`` match "NVIDIA A100-SXM4-80GB", ``rtx6000`` matches
"Quadro RTX 6000", ``a10`` does not match "NVIDIA A100".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from retrace.errors import RetraceError


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def gpu_name_matches(device_name: str, expected: str) -> bool:
    """Whether ``expected`` (a gpu_type or GRES name) names the GPU ``device_name`` (see the module doc)."""
    dev = _words(device_name)
    runs = {"".join(dev[i:j]) for i in range(len(dev)) for j in range(i + 1, len(dev) + 1)}
    want = [w for w in _words(expected) if w != "nvidia"]
    return bool(want) and all(w in runs for w in want)


def check_gpu_name(device_name: str, expected: Sequence[str] | None, *, where: str = "") -> None:
    """Raise unless ``device_name`` matches one of ``expected`` (None or empty: any GPU).

    Raises:
        RetraceError: naming the GPU found and the names expected.
    """
    if not expected:
        return
    if any(gpu_name_matches(device_name, e) for e in expected):
        return
    raise RetraceError(f"{where}the GPU is {device_name!r}, but the cell asks for {' / '.join(expected)} "
                       "(its gpu_type and cluster.gpu_models name): the job landed on the wrong node type; "
                       "fix the study's cluster.gpu_models / gpu_constraints, or the cell's gpu_type")


def check_gpu_count(visible: int, ranks_here: int, *, one_per_task: bool, where: str = "") -> None:
    """Raise unless every rank on this node gets a GPU of its own: ``visible`` GPUs for ``ranks_here``
    ranks, where a task bound to one GPU (``one_per_task``: SLURM's ``--gpus-per-task=1`` and similar) sees
    exactly one. Two ranks on one GPU would train a cell on fewer GPUs than it names.

    Raises:
        RetraceError: naming the counts and CUDA_VISIBLE_DEVICES.
    """
    import os

    if visible >= ranks_here or (one_per_task and visible == 1):
        return
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise RetraceError(f"{where}{ranks_here} ranks on this node but {visible} GPU(s) visible "
                       f"(CUDA_VISIBLE_DEVICES={shown!r}): a cell never runs on fewer GPUs than it asks for; "
                       "give the job as many GPUs as ranks (profiles/local: --resources gpu=N)")


def select_device(want: str, *, local_rank: int, gpu_names: Sequence[str] | None = None, ranks_here: int = 1,
                  one_per_task: bool = False) -> torch.device:
    """The torch device of a rank: ``cuda`` (the GPU ``local_rank`` mod the visible count, so that one GPU
    per task and all of a node's GPUs per task both work), ``cpu``, or ``auto`` (cuda if available).

    ``ranks_here`` ranks share this node; ``one_per_task``: each was started as its own SLURM task (which
    may be bound to one GPU). Fewer GPUs than ranks is an error (``check_gpu_count``).

    Raises:
        RetraceError: ``cuda`` asked for and none usable (with CUDA's own reason), too few, or the wrong GPU.
    """
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        reason = ""
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - CUDA's own message says why (driver, no device…)
            reason = f": {exc}"
        raise RetraceError(f"--device cuda but no GPU is usable{reason}; a GPU cell never falls back to the CPU")
    check_gpu_count(torch.cuda.device_count(), ranks_here, one_per_task=one_per_task)
    idx = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(idx)
    check_gpu_name(torch.cuda.get_device_name(idx), gpu_names, where=f"cuda:{idx}: ")
    return torch.device("cuda", idx)
