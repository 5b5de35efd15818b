"""Atomic file writes (a reader never sees a half-written checkpoint, table or index) and file hashes.

Everything is written to a temporary file in the destination directory and renamed over the
target only after it is complete and flushed, so a crash leaves either the old file or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The caller writes the file itself (e.g. ``safetensors.torch.save_file(t, tmp)``). On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.chmod(tmp_path, default_file_mode())  # mkstemp makes 0600; results are shared on clusters
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("x", "w"), **kwargs) as fh:
        yield fh


def json_safe(obj: Any) -> Any:
    """NaN/inf → None, recursively: JSON has no NaN, and an undefined cos must stay visible as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def write_parquet(path: str | os.PathLike, frame: Any) -> None:
    """Write a pandas DataFrame as Parquet (pyarrow), atomically."""
    with atomic_path(path, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, engine="pyarrow", index=False)


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """The sha256 of a file, read in chunks (the hash the Hub records for LFS files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_file_mode() -> int:
    """0o666 less the umask: what a plain ``open(..., "w")`` gives (``mkstemp`` gives 0o600)."""
    try:  # Linux: read it without changing it (os.umask is process-wide, racy under threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
