"""A study on disk: where the workflow writes each cell's files, and each cell's state read from them.

Paths (relative to the directory Snakemake runs in)::

    results/cells.parquet                              the cells table (retrace.grid.CELL_COLUMNS)
    results/runs/<cell>/checkpoints/step{N}.safetensors  the cell's checkpoints (kept across failures)
    results/runs/<cell>/checkpoints/manifest.json      written last by `retrace train`: training is done
    results/runs/<cell>/state/                         optimizer/scaler/RNG/data position for resuming
    results/runs/<cell>/similarity.parquet             `retrace compare-run`: one row per step
    results/runs/<cell>/similarity_tensors.parquet     ... and one row per step and tensor
    results/logs/<rule>/<cell>.log                     the log of each rule's job for that cell
    results/tables/, results/report/                   aggregate and report
    resources/data/..., resources/references/<repo>/step{N}.safetensors (+ steps{A}-{B}.json records)

Cell states (``retrace cells``), decided in this order:

``done``
    ``checkpoints/manifest.json`` and ``similarity.parquet`` both exist.
``failed``
    the cell's train or compare log ends with the workflow's failure line (``FAILURE_MARK``, appended
    by the rule when its command exits non-zero; a rerun starts a fresh log).
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
from dataclasses import dataclass
from pathlib import Path

RESULTS = "results"
RESOURCES = "resources"
CELLS_TABLE = f"{RESULTS}/cells.parquet"
#: The last line a rule writes to its log when its command fails.
FAILURE_MARK = "retrace-workflow: FAILED"
#: A cell counts as running if anything of it changed this recently (seconds).
RECENT_SECONDS = 600
STATES = ("done", "failed", "running", "pending")


def run_dir(cell: str) -> str:
    return f"{RESULTS}/runs/{cell}"


def manifest(cell: str) -> str:
    return f"{run_dir(cell)}/checkpoints/manifest.json"


def similarity(cell: str) -> str:
    return f"{run_dir(cell)}/similarity.parquet"


def similarity_tensors(cell: str) -> str:
    return f"{run_dir(cell)}/similarity_tensors.parquet"


def log(rule: str, name: str) -> str:
    return f"{RESULTS}/logs/{rule}/{name}.log"


#: The file prefix `retrace synth` gives each variant under DIR/<corpus>/<format>/.
SYNTH_NAME = "document"


def synthetic_dir(seed: int) -> str:
    return f"{RESOURCES}/data/synthetic/s{seed}"


def data_prefix(variant, synthetic_seed: int) -> str:
    """The .bin/.idx prefix of a data variant (``retrace train --data``)."""
    if variant.source == "synthetic":
        return f"{synthetic_dir(synthetic_seed)}/{variant.corpus}/{variant.format}/{SYNTH_NAME}"
    from retrace.data.indexed import split_prefix
    from retrace.data.variants import variant_source

    if variant.path is not None:
        return str(split_prefix(variant.path))
    return f"{RESOURCES}/data/pile/{variant.name}/{variant_source(variant.corpus, variant.format).name}"


def data_ready(variant, synthetic_seed: int) -> str:
    """The file written last when a variant's data is complete (what its train jobs wait for)."""
    if variant.source == "synthetic":
        return f"{synthetic_dir(synthetic_seed)}/manifest.json"
    return f"{RESOURCES}/data/pile/{variant.name}.json"


def order_record(variant, num_samples: int, seq_length: int) -> str:
    """The record of the order maps of (variant, sample count, sequence length, order seed)."""
    return f"{RESOURCES}/order/{variant.name}/ns{num_samples}_sl{seq_length}_s{variant.order_seed}.json"


def built_record(model_name: str) -> str:
    """Written last by reference_publish: a built reference's checkpoints are in its hub cache."""
    return f"{RESOURCES}/build/{model_name}/published.json"


def build_init_dir(init_key: str) -> str:
    return f"{RESOURCES}/build/init/{init_key}"


def reference_file(key: str, step: int) -> str:
    return f"{RESOURCES}/references/{key}/step{step}.safetensors"


def reference_steps(key: str, first: int, last: int) -> str:
    """The record that every published checkpoint from ``first`` to ``last`` (Pythia schedule) is fetched."""
    return f"{RESOURCES}/references/{key}/steps{first}-{last}.json"


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
               recent: float = RECENT_SECONDS) -> CellState:
    """The state of one cell, read from the files under ``workdir`` (see the module doc)."""
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
    partial = (wd / run_dir(cell) / "checkpoints").is_dir() or (wd / run_dir(cell) / "state").is_dir()
    return CellState(cell, "pending", "partly trained (will resume)" if partial else "not started")
