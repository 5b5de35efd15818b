"""``torch.load`` that never runs code from the file.

Every pickle (``pytorch_model*.bin``, GPT-NeoX ``*.pt``) is read with ``torch.load(weights_only=True)``:
PyTorch's restricted unpickler builds tensors, storages (``HalfStorage`` weights and the ``ByteStorage``
masks of 2023-era files alike), dicts, lists and a short allowlist of types, and refuses anything
else *before* calling it. A refused or broken file becomes one ``RetraceError`` naming the file.

That guarantee holds from torch 2.6 on; under an older torch (CVE-2025-32434) every pickle is refused
before it is opened unless ``RETRACE_ALLOW_UNSAFE_PICKLE=1`` (see ``retrace.checkpoints.trust``).

GPT-NeoX/DeepSpeed training-state files (``mp_rank_XX_model_states.pt``,
``zero_pp_rank_*_optim_states.pt``) also pickle numpy RNG state and DeepSpeed's loss-scaler object.
For those (``training_state=True``) the allowlist is extended, still under ``weights_only=True``, with

* numpy's array/scalar/dtype reconstructors (data only; what PyTorch's docs recommend), and
* inert stand-ins registered under DeepSpeed's class names (``OpaqueObject`` subclasses): the
  unpickler creates them with ``object.__new__`` and fills ``__dict__``; no DeepSpeed code is imported
  or run, and the state stays readable (``obj.cur_scale`` …).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.trust import check_pickle_allowed
from retrace.errors import RetraceError


class OpaqueObject:
    """A pickled object of a class we do not import: its constructor args and state, nothing else."""

    #: The dotted name of the class this stands in for.
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or isinstance(state[1], dict)):
            state, slots = state
            if slots:
                self.__dict__.update(slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state

    @property
    def state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_args"}

    def __repr__(self) -> str:
        return f"<{self.qualname} {self.state!r}>"


def _opaque(qualname: str) -> type[OpaqueObject]:
    return type(qualname.rsplit(".", 1)[-1], (OpaqueObject,), {"qualname": qualname, "__module__": __name__})


#: DeepSpeed classes pickled by value into training-state files (DeeperSpeed eb7f5cff and later
#: DeepSpeed keep the loss scaler object itself in the optimizer state dict).
OPAQUE_CLASSES = {
    name: _opaque(name)
    for name in (
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScalerBase",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    )
}


def _training_state_globals() -> list[Any]:
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 keeps numpy.core as an alias
    out: list[Any] = [np.ndarray, np.dtype, argparse.Namespace]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((core.multiarray._reconstruct, f"{mod}._reconstruct"))
        out.append((core.multiarray.scalar, f"{mod}.scalar"))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: dtype instances are of these classes
    if dtypes is not None:
        out.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    out.extend((cls, name) for name, cls in OPAQUE_CLASSES.items())
    return out


_MMAP_REFUSED = "mmap can only be used with files saved with"
_GLOBAL_RE = re.compile(
    r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|unrecognized function \S+[^.\n]*|"
    r"Can only [^\n]*?but got [^\n]*)"
)


def safe_torch_load(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    training_state: bool = False,
    allow_unsafe_pickle: bool | None = None,
) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, memory-mapped when the format allows.

    Raises ``RetraceError`` naming the file when it is missing, truncated, not a torch file, holds a
    pickle the restricted unpickler refuses (which it does before running anything), or when this torch
    has a known ``weights_only`` bypass and ``allow_unsafe_pickle`` (default: the
    ``RETRACE_ALLOW_UNSAFE_PICKLE`` variable) does not allow it.
    """
    return safe_torch_load_mapped(
        path, mmap=mmap, training_state=training_state, allow_unsafe_pickle=allow_unsafe_pickle
    )[0]


def safe_torch_load_mapped(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    training_state: bool = False,
    allow_unsafe_pickle: bool | None = None,
) -> tuple[Any, bool]:
    """``safe_torch_load`` that also says whether the storages are memory-mapped (zip format) or in RAM."""
    path = Path(path)
    if not path.is_file():
        raise RetraceError(f"{path}: no such checkpoint file")
    check_pickle_allowed(path, torch.__version__, allow=allow_unsafe_pickle)
    try:
        if training_state:
            with torch.serialization.safe_globals(_training_state_globals()):
                return _load(path, mmap)
        return _load(path, mmap)
    except RetraceError:
        raise
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        m = _GLOBAL_RE.search(msg)
        detail = m.group(1) if m else msg.splitlines()[0][:300]
        raise RetraceError(
            f"{path}: refused to unpickle: the file needs code that weights_only loading does not run "
            f"({detail}); nothing in it was executed"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch/miniz raise RuntimeError, OSError, EOFError, zipfile errors…
        raise RetraceError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        ) from exc


def _load(path: Path, mmap: bool) -> tuple[Any, bool]:
    with warnings.catch_warnings():
        # protocol-4 pickles (plain pickle.dump) make torch warn; the restricted unpickler still applies.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        if mmap and zipfile.is_zipfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
            except RuntimeError as exc:
                if _MMAP_REFUSED not in str(exc):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True), False
