"""The seal of a safetensors file retrace wrote (``save_params(seal=True)``): the sha256 of its data section,
recorded in its own header, checked without torch (compare jobs check every reference they read)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from retrace.errors import RetraceError

#: the header metadata key holding the data section's sha256
DATA_SHA256 = "retrace.data_sha256"


def check_sealed(path: str | os.PathLike) -> bool:
    """Check a file ``save_params(seal=True)`` wrote: its size is what its header announces and its data
    hashes to the recorded ``DATA_SHA256``. Returns False for an unsealed file (nothing to check against).

    Raises:
        RetraceError: naming the file: truncated, extended, a bad header, or data that differs.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if n < 0 or 8 + n > size:
                raise RetraceError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            header = json.loads(fh.read(n))
            want = header.get("__metadata__", {}).get(DATA_SHA256)
            if want is None:
                return False
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size != 8 + n + end:
                raise RetraceError(f"{path}: {size} bytes, but its header announces {8 + n + end}: truncated or "
                                   "extended since it was written")
            digest = hashlib.sha256()
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RetraceError(f"{path}: unreadable safetensors header: {type(exc).__name__}: {exc}") from exc
    if digest.hexdigest() != want:
        raise RetraceError(f"{path}: its data does not hash to the sha256 recorded when it was written "
                           f"({want[:12]}…): the file is corrupt (fetch it again)")
    return True
