"""A run directory: what one training run (``retrace train`` or ``retrace neox-run``) leaves on disk.

::

    <run>/checkpoints/step{N}.safetensors   canonical fp16 parameters on the save schedule
    <run>/checkpoints/manifest.json         written LAST on success: steps, files, sha256
    <run>/state/step{N}/                    resume states (retrace.train.state)
    <run>/train_log.parquet                 one row per step
    <run>/run.json                          arguments, environment, one entry per attempt
    <run>/similarity.parquet                ``retrace compare-run``: one row per compared step
    <run>/similarity_tensors.parquet        ... and one row per step and tensor

The trainer, the GPT-NeoX conversion, compare-run and the cell states all take their paths from here,
and every timestamp they write is ``timestamp()``'s. The workflow's rules use the relative names
(``MANIFEST`` …) under ``retrace.paths.run_dir(cell)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

CHECKPOINTS = "checkpoints"
MANIFEST = f"{CHECKPOINTS}/manifest.json"
STATE = "state"
TRAIN_LOG = "train_log.parquet"
RUN_JSON = "run.json"
SIMILARITY = "similarity.parquet"
SIMILARITY_TENSORS = "similarity_tensors.parquet"


def timestamp() -> str:
    """Now, in UTC, to the second (ISO 8601): the one timestamp format of run files."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created until something is written)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def similarity(self) -> Path:
        return self.root / SIMILARITY

    @property
    def similarity_tensors(self) -> Path:
        return self.root / SIMILARITY_TENSORS

    def started(self) -> bool:
        """Whether training left anything to resume from (checkpoints or states)."""
        return self.checkpoints.is_dir() or self.state.is_dir()


def checkpoint_name(step: int) -> str:
    return f"step{step}.safetensors"
