"""A cell's state, read from the files the workflow leaves (``retrace cells``).

States, decided in this order:

``done``
    ``checkpoints/manifest.json`` and ``similarity.parquet`` both exist.
``failed``
    the cell's train or compare log ends with the workflow's failure line (``FAILURE_MARK``, appended
    by the rule when its command exits non-zero; a rerun starts a fresh log), or so does the log of a
    job the cell's training waits for (``upstream``: the fetch of its start checkpoint).
``running``
    Snakemake marks the cell's train or compare output incomplete (it does from a job's start to its
    end) and either a Snakemake lock is held in the directory or something of the cell (its run
    directory, state/, checkpoints/, logs) changed in the last ``recent`` seconds (default 10 minutes).
``failed`` (interrupted)
    an incomplete marker with no lock and no recent change: a job killed mid-way (time limit, node
    failure, Ctrl-C) that no Snakemake is running any more; ``--rerun-incomplete`` resumes it.
``pending``
    everything else: not started, partly trained (will resume), or trained but not yet compared
    (the detail column says which).
"""

from __future__ import annotations

import os
import time
from base64 import urlsafe_b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retrace.paths import FAILURE_MARK, log, manifest, run_dir, similarity
from retrace.rundir import RunDir

#: A cell counts as running if anything of it changed this recently (seconds).
RECENT_SECONDS = 600
STATES = ("done", "failed", "running", "pending")


@dataclass(frozen=True)
class CellState:
    cell: str
    state: str
    detail: str


def _incomplete_marker(workdir: Path, output: str) -> Path:
    """Where Snakemake's file persistence records ``output`` as incomplete (.snakemake/incomplete/)."""
    b64 = urlsafe_b64encode(output.encode()).decode()
    return workdir / ".snakemake" / "incomplete" / b64


def _newest_mtime(paths: list[Path]) -> float:
    newest = 0.0
    for p in paths:
        try:
            newest = max(newest, p.stat().st_mtime)
        except FileNotFoundError:
            continue
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                for name in dirs + files:
                    try:
                        newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
                    except FileNotFoundError:
                        pass
    return newest


def _log_failed(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return False
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return bool(lines) and lines[-1].startswith(FAILURE_MARK)


def cell_state(cell: str, workdir: str | Path = ".", *, now: float | None = None,
               recent: float = RECENT_SECONDS, upstream: Sequence[str] = ()) -> CellState:
    """The state of one cell, read from the files under ``workdir`` (see the module doc).

    ``upstream``: logs (relative to ``workdir``) of the jobs the cell's training waits for; one that failed
    fails the cell, since its own jobs never start.
    """
    wd = Path(workdir)
    now = time.time() if now is None else now
    trained = (wd / manifest(cell)).is_file()
    compared = (wd / similarity(cell)).is_file()
    if trained and compared:
        return CellState(cell, "done", "trained and compared")
    logs = [wd / log("train", cell), wd / log("compare", cell)]
    for lg in logs:
        if _log_failed(lg):
            return CellState(cell, "failed", f"see {lg.relative_to(wd)}")
    for name in upstream:
        if _log_failed(wd / name):
            return CellState(cell, "failed", f"a job it waits for failed: see {name}")
    markers = [_incomplete_marker(wd, out) for out in (manifest(cell), similarity(cell))]
    incomplete = any(m.exists() for m in markers)
    if incomplete:
        locks = wd / ".snakemake" / "locks"
        locked = locks.is_dir() and any(locks.iterdir())
        changed = _newest_mtime([wd / run_dir(cell), *logs])
        if locked or (changed and now - changed < recent):
            return CellState(cell, "running", "compare" if trained else "train")
        return CellState(cell, "failed", "interrupted (Snakemake incomplete marker; rerun with --rerun-incomplete)")
    if trained:
        return CellState(cell, "pending", "trained, compare pending")
    partial = RunDir(wd / run_dir(cell)).started()
    return CellState(cell, "pending", "partly trained (will resume)" if partial else "not started")
