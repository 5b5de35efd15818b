"""Atomic file writes (a reader never sees a half-written checkpoint, table or index) and file hashes.

Everything is written to a temporary file in the destination directory and renamed over the
target only after it is complete and flushed, so a crash leaves either the old file or nothing.
Temporary names come from ``mkstemp``/``mkdtemp`` (unpredictable, created exclusively, never through a
symlink), and what lands has the mode a plain ``open``/``mkdir`` would give under the umask.
``replace_dir`` swaps a whole directory (a report) into place in one step.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
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


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is racy under threads)."""
    try:  # Linux
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 less the umask: what a plain ``open(..., "w")`` gives (``mkstemp`` gives 0o600)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """0o777 less the umask: what a plain ``mkdir`` gives (``mkdtemp`` gives 0o700)."""
    return 0o777 & ~current_umask()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # filesystem can't
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _dir_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``out``'s parent directory (``lock_directory``)."""
    return lock_directory(out.parent)


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory``: one writer there at a time, and no lock file left behind.
    Where directories cannot be locked (some network filesystems) it does nothing: the renames themselves
    are still atomic."""
    import fcntl  # POSIX; retrace runs on Linux and macOS

    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike, *, check: Any = None) -> None:
    """Put the complete directory ``tmp`` at ``out``, replacing what is there, as one step.

    Concurrent callers (two report builds) are serialised by a lock on ``out``'s parent; readers see
    the old directory or the new one, never neither, where the filesystem can exchange two paths
    atomically (Linux ``renameat2``), and a moment without ``out`` elsewhere. ``check(out)``, if
    given, runs under the lock before anything moves (e.g. refuse to replace a foreign directory).
    ``tmp`` must be a sibling of ``out``; afterwards it no longer exists.
    """
    tmp, out = Path(tmp), Path(out)
    with _dir_lock(out):
        if check is not None:
            check(out)
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(out))
        if not out.exists():
            tmp.rename(out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / "d")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)


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
