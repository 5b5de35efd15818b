"""Write canonical parameter-only safetensors files, atomically and one tensor at a time.

``save_params`` accepts a mapping or a ``ParamReader`` and streams the tensors into the file in the
safetensors layout (8-byte little-endian header length, JSON header, raw little-endian data), so a
12B checkpoint is converted holding one tensor in memory, not all of them (``safetensors.torch
.save_file`` first serialises every tensor to bytes). The result is read back by ``safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from retrace.checkpoints.base import DictReader, ParamReader, is_buffer_name
from retrace.checkpoints.names import HF_ALIASES, canonical_order
from retrace.checkpoints.seal import DATA_SHA256, check_sealed  # noqa: F401 - re-exported
from retrace.errors import RetraceError
from retrace.io import atomic_path, default_file_mode

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    # transformers refuses a safetensors file whose metadata lacks format "pt" (it writes it itself).
    if metadata is None:
        return {"format": "pt"}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise RetraceError("save_params: metadata must map strings to strings")
    return {"format": "pt", **metadata}


def save_params(
    params: Mapping[str, torch.Tensor] | ParamReader,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    seal: bool = False,
) -> Path:
    """Write ``params`` (canonical names; buffers dropped, ``lm_head.weight`` → ``embed_out.weight``)
    to ``path`` as safetensors, with ``metadata`` (plus ``format: pt``, which transformers requires). Written to a temporary file and renamed: on any error neither ``path``
    nor a temporary file is left behind.

    ``seal``: also record the sha256 of the data section in the metadata (``DATA_SHA256``; the header
    is written with a placeholder of the same length and rewritten once the data is hashed), so that a
    later truncation or bit flip is found by ``check_sealed`` before the file is used.
    """
    path = Path(path)
    meta = _check_metadata(metadata)
    if seal:
        meta[DATA_SHA256] = "0" * 64
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise RetraceError("save_params: big-endian hosts are not supported")
    reader = params if isinstance(params, ParamReader) else _mapping_reader(params)

    names: dict[str, str] = {}  # canonical → reader name
    for name in reader.names():
        if is_buffer_name(name):
            continue
        canon = HF_ALIASES.get(name, name)
        if canon in names:
            raise RetraceError(f"save_params: {names[canon]} and {name} are both parameter {canon}")
        names[canon] = name
    order = canonical_order(names)
    specs = {}
    for canon in order:
        dtype = reader.dtype(names[canon])
        if dtype not in _CODES:
            raise RetraceError(f"save_params: {canon} has dtype {dtype}, which safetensors cannot store")
        specs[canon] = (dtype, tuple(int(d) for d in reader.shape(names[canon])))
    # Largest itemsize first keeps every tensor aligned to its element size (as safetensors does).
    order.sort(key=lambda n: -torch.empty((), dtype=specs[n][0]).element_size())

    header: dict[str, object] = {}
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for canon in order:
        dtype, shape = specs[canon]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[canon] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)

    digest = hashlib.sha256()
    try:
        with atomic_path(path, suffix=".safetensors") as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for canon in order:
                t = reader.get(names[canon])
                if not isinstance(t, torch.Tensor):
                    raise RetraceError(f"save_params: {names[canon]} is {type(t).__name__}, not a tensor")
                t = t.detach().to("cpu").contiguous()
                dtype, shape = specs[canon]
                if t.dtype != dtype or tuple(t.shape) != shape:
                    raise RetraceError(
                        f"save_params: {canon} is {t.dtype} {list(t.shape)}, announced {dtype} {list(shape)}"
                    )
                if t.numel():
                    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                    digest.update(data)
                    fh.write(data)
            if seal:  # the same header, the placeholder replaced by the hash (same length)
                header["__metadata__"] = {**meta, DATA_SHA256: digest.hexdigest()}
                sealed = json.dumps(header, separators=(",", ":")).encode()
                sealed += b" " * (len(blob) - len(sealed))
                fh.seek(8)
                fh.write(sealed)
            os.chmod(tmp, default_file_mode())
    except RetraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - disk full, unreadable source tensor…
        raise RetraceError(f"{path}: could not write parameters: {type(exc).__name__}: {exc}") from exc
    return path


def _mapping_reader(params: Mapping[str, torch.Tensor]) -> ParamReader:
    if not isinstance(params, Mapping):
        raise RetraceError(f"save_params: expected a mapping name → tensor, got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise RetraceError(f"save_params: {key!r} is {type(value).__name__}, not a tensor")
    return DictReader(params, source="<params>")
