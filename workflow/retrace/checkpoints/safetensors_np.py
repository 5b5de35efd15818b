"""One ``.safetensors`` file as memory-mapped NumPy arrays, without torch (``retrace compare``'s fast path).

The format (huggingface/safetensors, docs "Format"): an 8-byte little-endian header length N, N bytes of
JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data;
offsets are relative to the end of the header. Names are canonicalised and buffers dropped as
``SafetensorsReader`` does (``retrace.checkpoints.names``), and ``get`` returns a read-only view of the
mapped file, so nothing is copied. Only what NumPy holds exactly is offered (F16, F32, F64): anything
else — bf16, a header this reader finds odd, two keys with one canonical name — raises
``NotReadableHere``, and the caller opens the file with ``SafetensorsReader`` instead, which either
reads it or reports what is wrong with it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from retrace.checkpoints.names import canonical_hf_name, canonical_order

#: safetensors dtype codes NumPy reads exactly
DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
#: a header larger than this is not a parameter file (the format's own limit is 100 MB)
MAX_HEADER = 100 << 20


class NotReadableHere(ValueError):
    """This reader does not take the file; ``SafetensorsReader`` should (and explains any error)."""


class NumpySafetensorsReader:
    """Canonical parameter names → memory-mapped NumPy views of one safetensors file (ParamReader's
    methods, without its torch base class)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.source = str(path)
        self._mm: mmap.mmap | None = None
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(8)
                if len(head) != 8:
                    raise NotReadableHere(f"{path}: shorter than a header")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or 8 + n > size:
                    raise NotReadableHere(f"{path}: header length {n} does not fit the file")
                header = json.loads(fh.read(n))
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self.close()
            raise NotReadableHere(str(exc)) from exc
        try:
            self._entries = self._index(header, size - 8 - n, 8 + n)
        except BaseException:
            self.close()
            raise
        self._names = canonical_order(self._entries)

    @staticmethod
    def _index(header, data_size: int, data_start: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
        if not isinstance(header, dict):
            raise NotReadableHere("header is not an object")
        entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (TypeError, KeyError, ValueError) as exc:
                raise NotReadableHere(f"{key}: malformed entry") from exc
            dtype = DTYPES.get(code)
            if dtype is None:
                raise NotReadableHere(f"{key}: dtype {code} is not read here")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size
                    and end - begin == math.prod(shape) * dtype.itemsize):
                raise NotReadableHere(f"{key}: shape or offsets do not fit the file")
            name = canonical_hf_name(key)
            if name is None:
                continue
            if name in entries:
                raise NotReadableHere(f"{key}: a second key for parameter {name}")
            entries[name] = (dtype, tuple(shape), data_start + begin)
        return entries

    def names(self) -> list[str]:
        return list(self._names)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.source}: no parameter {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the mapped bytes, in the stored dtype and shape."""
        if self._mm is None:
            raise ValueError(f"{self.source}: closed")
        dtype, shape, offset = self._entry(name)
        return np.frombuffer(self._mm, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)

    def location(self, name: str) -> str:
        return self.source

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive: the mapping goes with the last one
                pass

    def __enter__(self) -> NumpySafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._entries
