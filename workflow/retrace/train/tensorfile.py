"""Stream tensors into a safetensors file, hashing the bytes as they are written.

A save step writes a checkpoint (2 B/param) and a resume state (up to 16 B/param); both used to be
copied to host memory whole (``safetensors.torch.save_file`` first turns every tensor into bytes) and
then read back to be hashed. ``write_tensors`` instead

* writes the safetensors layout itself — 8-byte little-endian header length, the JSON header padded with
  spaces to a multiple of 8, then each tensor's raw little-endian bytes in header order — the same bytes
  ``retrace.checkpoints.save_params`` writes for the same names, order and metadata;
* moves a tensor to the host ``piece_bytes`` at a time (a GPU tensor: one piece copied, cast if asked,
  written, freed; a contiguous CPU tensor: written from its own memory), so a save holds no second copy;
* computes the file's sha256 from the bytes it writes (no re-read), and writes atomically
  (``retrace.io.atomic_path``: a crash leaves no partial file under the final name).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from retrace.errors import RetraceError
from retrace.io import atomic_path

#: Host bytes per piece of a tensor in flight (GPU → host copy, cast, write).
PIECE_BYTES = 64 << 20

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  *, metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                  sort: bool = True, piece_bytes: int = PIECE_BYTES) -> str:
    """Write ``tensors`` (on any device) to ``path`` as safetensors; returns the file's sha256 (hex).

    Args:
        path: the file (replaced atomically).
        tensors: name → tensor, or (name, tensor) pairs; tensors are read, never copied whole.
        metadata: string → string; ``format: pt`` is added first (transformers requires it).
        dtype: cast every tensor to this dtype while writing (e.g. fp16 checkpoints of fp32 weights).
        sort: order the tensors by element size, largest first (stable), as safetensors and
            ``save_params`` do, so that every tensor is aligned to its element size.
        piece_bytes: host bytes per piece in flight.

    Raises:
        RetraceError: a dtype safetensors cannot store, bad metadata, or a write error (nothing is left).
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise RetraceError("write_tensors: big-endian hosts are not supported")
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RetraceError("write_tensors: metadata must map strings to strings")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise RetraceError(f"write_tensors: duplicate tensor names in {path}")
    out_dtype = {n: (dtype or t.dtype) for n, t in items}
    for n, dt in out_dtype.items():
        if dt not in _CODES:
            raise RetraceError(f"write_tensors: {n} has dtype {dt}, which safetensors cannot store")
    if sort:
        items.sort(key=lambda kv: -_itemsize(out_dtype[kv[0]]))
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for n, t in items:
        nbytes = math.prod(t.shape) * _itemsize(out_dtype[n])
        header[n] = {"dtype": _CODES[out_dtype[n]], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    digest = hashlib.sha256()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".safetensors") as tmp, open(tmp, "wb") as fh:
            for chunk in (struct.pack("<Q", len(blob)), blob):
                fh.write(chunk)
                digest.update(chunk)
            for n, t in items:
                for piece in _pieces(t.detach(), out_dtype[n], piece_bytes):
                    fh.write(piece)
                    digest.update(piece)
    except RetraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - disk full, a device error…
        raise RetraceError(f"{path}: could not write tensors: {type(exc).__name__}: {exc}") from exc
    return digest.hexdigest()


def _pieces(t: torch.Tensor, dtype: torch.dtype, piece_bytes: int):
    """The raw bytes of ``t`` cast to ``dtype``, as memoryviews of at most ~``piece_bytes`` each."""
    if t.numel() == 0:
        return
    flat = t.reshape(-1)  # a view for the contiguous flat buffers and parameter views saved here
    step = max(1, piece_bytes // max(_itemsize(dtype), flat.element_size()))
    for lo in range(0, flat.numel(), step):
        piece = flat[lo : lo + step]
        if piece.dtype != dtype:
            piece = piece.to(dtype)  # on the tensor's device: one piece at a time
        if piece.device.type != "cpu":
            piece = piece.to("cpu")
        piece = piece.contiguous()
        yield memoryview(piece.view(torch.uint8).numpy())
