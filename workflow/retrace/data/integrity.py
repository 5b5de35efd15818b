"""File integrity for data read in place: sha256 checked against a published or recorded value, once.

Hashing a 30 GB shard takes a minute, so a file's hash is recorded together with its *stamp* (size,
modification and status-change times, inode). A later use compares the stamp: unchanged, the recorded
(already checked) hash stands; changed in any way, the file is hashed again and must still match. The
status-change time (ctime) cannot be set back by a user, so restoring the modification time after an edit
does not hide it. ``rehash=True`` re-reads the content whatever the stamp says.

Where a hash comes from is recorded beside it: ``published`` (Pythia's own lists, in the registry),
``hub`` (the Hub's Git LFS sha256 at the pinned commit), ``recorded`` (first download or first use: no
published value existed; every later use must match it).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from retrace.errors import RetraceError

SHA256_RE = re.compile(r"[0-9a-f]{64}")
SOURCES = ("published", "hub", "recorded")
_STAMP_KEYS = ("size", "mtime_ns", "ctime_ns", "ino")
_CHUNK = 16 << 20
_PROGRESS_EVERY_S = 30.0

Log = Callable[[str], None]


def is_sha256(value: object) -> bool:
    """A lowercase hex sha256 (``re.fullmatch``: no trailing newline slips through)."""
    return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None


def file_stamp(path: str | os.PathLike) -> dict[str, int]:
    """What changes when a file's content may have: size, mtime, ctime and inode (symlinks followed)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def valid_stamp(stamp: object) -> bool:
    return (isinstance(stamp, dict) and set(stamp) == set(_STAMP_KEYS)
            and all(type(stamp[k]) is int and stamp[k] >= 0 for k in _STAMP_KEYS))


def stamp_matches(path: str | os.PathLike, stamp: dict | None) -> bool:
    """True when ``path`` exists and still has ``stamp``."""
    if not valid_stamp(stamp):
        return False
    try:
        return file_stamp(path) == stamp
    except OSError:
        return False


def sha256_with_progress(path: str | os.PathLike, *, label: str, log: Log | None = None) -> str:
    """The sha256 of a file, logging progress every half minute (big shards take minutes)."""
    path = Path(path)
    total = path.stat().st_size
    h = hashlib.sha256()
    done, t0 = 0, time.monotonic()
    last = t0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
            done += len(block)
            now = time.monotonic()
            if log is not None and now - last >= _PROGRESS_EVERY_S:
                last = now
                log(f"hashing {label}: {done / 1e9:.1f} of {total / 1e9:.1f} GB "
                    f"({done / max(now - t0, 1e-9) / 1e6:.0f} MB/s)")
    if log is not None and total >= 1 << 30:
        log(f"hashed {label}: {total / 1e9:.1f} GB in {time.monotonic() - t0:.0f} s")
    return h.hexdigest()


def verified_record(path: str | os.PathLike, *, label: str, expected: str | None = None,
                    expected_source: str | None = None, previous: dict | None = None, rehash: bool = False,
                    log: Log | None = None) -> dict:
    """Check ``path`` and return its record ``{"sha256", "sha256_source", "stamp"}``.

    Args:
        path: the file.
        label: how messages name it (repo file name and commit, or the copy's path).
        expected: a published sha256 (``expected_source`` says which: ``published`` or ``hub``), or None.
        previous: the file's record from an earlier use, or None.
        rehash: re-read the content even when the stamp is unchanged.
        log: receives progress lines.

    Returns:
        The record to store. Unchanged stamp and hash: ``previous`` itself, nothing re-read.

    Raises:
        RetraceError: the content does not match ``expected``, or (no published value) no longer matches
            the hash recorded at first use, or the file changed while it was being hashed.
    """
    if expected is not None and not is_sha256(expected):
        raise RetraceError(f"{label}: expected sha256 {expected!r} is not 64 lowercase hex digits")
    if expected is not None and expected_source not in ("published", "hub"):
        raise RetraceError(f"{label}: unknown source {expected_source!r} of the expected sha256")
    prev_sha = previous.get("sha256") if isinstance(previous, dict) else None
    if not is_sha256(prev_sha):
        previous, prev_sha = None, None
    if (previous is not None and not rehash and stamp_matches(path, previous.get("stamp"))
            and (expected is None or prev_sha == expected)):
        return previous
    before = file_stamp(path)
    got = sha256_with_progress(path, label=label, log=log)
    if file_stamp(path) != before:
        raise RetraceError(f"{label} ({path}) changed while it was being hashed; is another job writing it?")
    if expected is not None:
        if got != expected:
            raise RetraceError(f"{label} ({path}): sha256 {got} does not match the {expected_source} {expected}")
        return {"sha256": got, "sha256_source": expected_source, "stamp": before}
    if prev_sha is not None and got != prev_sha:
        raise RetraceError(f"{label} ({path}): sha256 {got} differs from {prev_sha}, recorded when it was first "
                           "used; the file changed since (no published hash exists to say which is right)")
    return {"sha256": got, "sha256_source": "recorded", "stamp": before}
