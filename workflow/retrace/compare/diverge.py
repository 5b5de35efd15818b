"""The first step at which two runs stop being bit-identical, from their train logs' fingerprints.

Each ``retrace train`` run logs, per step, the hash of the batch it trained on and an exact checksum of
its weights after the step (``retrace.train.fingerprints``). Two runs that start from the same weights
are bit-identical through step s if every weight checksum agrees up to s; the first step where one
differs is where they diverge. The batch hashes say whether they trained on the same tokens until then
(a different data order diverges at its first differing batch; a different layout on the same data
has equal batches and diverges through rounding). Torch-free: reads two Parquet files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrace.errors import RetraceError
from retrace.rundir import RunDir

FINGERPRINT_COLUMNS = ("batch_hash", "param_fp")


@dataclass(frozen=True)
class Divergence:
    """Where two runs part. ``first_param``/``first_batch``: the first common step whose weight checksum /
    batch hash differ (None: equal at every common step); ``common``: the steps both logged, first..last."""

    a: str
    b: str
    first_common: int | None
    last_common: int | None
    first_param: int | None
    first_batch: int | None

    def render(self) -> str:
        if self.last_common is None:
            return f"{self.a} and {self.b}: no common step with fingerprints"
        span = f"steps {self.first_common}..{self.last_common}"
        params = (f"first divergent step: {self.first_param} (weights not bit-identical after it)"
                  if self.first_param is not None else f"bit-identical at every step ({span})")
        batches = (f"batches differ from step {self.first_batch}" if self.first_batch is not None
                   else "same batches at every step")
        return f"{params}; {batches}; compared {span}"


def read_fingerprints(run: str | Path):
    """The (step, batch_hash, param_fp) rows of a run's train log (a run directory or the Parquet file)."""
    import pandas as pd

    path = Path(run)
    path = path if path.suffix == ".parquet" else RunDir(path).train_log
    if not path.is_file():
        raise RetraceError(f"{path}: no train log")
    frame = pd.read_parquet(path)
    missing = [c for c in FINGERPRINT_COLUMNS if c not in frame.columns]
    if missing:
        raise RetraceError(f"{path}: the train log has no {', '.join(missing)} (a run made before fingerprints)")
    return frame[["step", *FINGERPRINT_COLUMNS]].dropna().set_index("step").sort_index()


def diverge(a: str | Path, b: str | Path) -> Divergence:
    """Compare two runs' fingerprints over the steps both logged."""
    fa, fb = read_fingerprints(a), read_fingerprints(b)
    common = fa.index.intersection(fb.index).sort_values()
    if len(common) == 0:
        return Divergence(str(a), str(b), None, None, None, None)
    fa, fb = fa.loc[common], fb.loc[common]

    def first(col: str) -> int | None:
        differs = fa[col] != fb[col]
        return int(differs.idxmax()) if differs.any() else None

    return Divergence(str(a), str(b), int(common[0]), int(common[-1]), first("param_fp"), first("batch_hash"))
