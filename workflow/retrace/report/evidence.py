"""Where the evidence is: the noise floor, the data gap per step, and a verdict over all steps.

A distance means something only against the spread that the non-data axes alone produce. For one
model and one published step:

* **Within-variant spread** of a data variant: max − min of 1 − θ Cos over that variant's cells
  (the cells share the data and differ only in layout, kernel, deps, GPU type, ...). Replicas of one
  cell (the ``replica`` column, same settings run again) are first collapsed to their mean, so a
  repeated cell is one cell, not several; how far replicas differ is reported on its own.
* **Floor** at that step: the within-variant spread of the closest variant. If the published run
  is one more member of that family (trained on that data, in some layout), its distance to the
  family's cells is of the order of the family's own spread.
* **Gap**: the median over matched pairs (cells equal on every axis but data) of (other variant's
  distance − closest variant's distance), against the nearest other variant; ``gap / floor`` is
  the data gap in units of the floor.

The combined test keeps one comparison per matched pair per step (never pooling steps as if they
were pairs): an exact two-sided sign test at each step, then either

* the study's ``primary_step``, declared before the runs, is the one step tested, or
* with no primary step, Holm's step-down correction over every step where the test is defined
  (at least one untied pair; steps where every pair is exactly tied, such as step 0, carry no sign).
  The combined p-value is the smallest Holm-adjusted p among steps where the closest variant wins
  the majority of pairs (a step favouring the other variant gives it no support).

**Reproduced**: at every tested step the closest variant's median distance is at most ``FAR`` floors
(true), at every one it is more (false: "closest, but no candidate reproduces the reference"),
otherwise, or where the floor is zero and the distance is not, null (cannot tell). A distance of exactly
zero at a zero floor (bit-identical reproductions) counts as within.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from retrace.report.frames import DATA
from retrace.report.stats import holm, sign_test_p

PRIMARY = "one_minus_cos"
REPLICA = "replica"
REANCHOR = "reanchor"
#: The closest variant's median distance above this many floors: the reference is not reproduced.
FAR = 10.0
METRIC_COLUMNS = ("one_minus_cos", "cos", "l2")

METHOD = (
    f"Floor = within-variant spread (max - min of 1 - theta Cos over the closest variant's cells, replicas "
    f"collapsed to their mean) at each step. Gap = median over matched pairs of (other - closest) 1 - theta "
    f"Cos, against the nearest other variant. Combined test: one exact two-sided sign test per step over the "
    f"matched pairs; a declared primary step is the only step tested, otherwise Holm's step-down correction "
    f"over every step with an untied pair, combined p = smallest adjusted p among steps the closest variant "
    f"wins. Reproduced = the closest variant's median distance is within {FAR:g} floors at every tested "
    f"step (false if above at every one, null otherwise)."
)


@dataclass
class StepEvidence:
    """The closest variant against its nearest rival at one step."""

    step: int
    rival: str
    pairs: int
    wins: int
    losses: int
    ties: int
    p_value: float
    p_holm: float | None
    closest_median: float
    rival_median: float
    gap: float
    floor: float
    gap_in_floors: float | None
    distance_in_floors: float | None
    spread: dict[str, float] = field(default_factory=dict)  # per variant: max - min over its cells
    replica_spread: float | None = None  # largest |replica - replica| distance difference, None without replicas

    @property
    def tested(self) -> bool:
        return self.wins + self.losses > 0

    @property
    def within(self) -> bool | None:
        if self.floor == 0:
            return True if self.closest_median == 0 else None
        return bool(self.closest_median <= FAR * self.floor)


@dataclass
class Evidence:
    mode: str  # "holm" or "primary step N"
    per_step: list[StepEvidence]
    p_value: float | None
    reproduced: bool | None
    replicas: str | None  # "bit-identical", "differ", or None without replicas
    notes: list[str] = field(default_factory=list)

    def at(self, step: int) -> StepEvidence | None:
        return next((s for s in self.per_step if s.step == step), None)


def collapse_replicas(sub: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, pd.Series | None, str | None]:
    """One row per (cell but replica, step): the mean of its replicas' distances.

    Returns the frame, the per-step largest spread between replicas, and whether replicas were
    bit-identical (every metric equal) or differ; (sub, None, None) without a replica column.
    """
    if REPLICA not in sub.columns or sub[REPLICA].nunique(dropna=False) < 2:
        return sub, None, None
    group = [k for k in keys if k != REPLICA] + [DATA, "step"]
    metrics = [c for c in METRIC_COLUMNS if c in sub.columns]
    grouped = sub.groupby(group, dropna=False, sort=False)
    spread = grouped[metrics].agg(lambda s: float(s.max() - s.min()))
    identical = bool((spread.to_numpy() == 0).all())
    per_step = spread[PRIMARY].groupby(level="step").max()
    out = grouped.agg({**{m: "mean" for m in metrics}, "cell": "first"}).reset_index()
    return out, per_step, "bit-identical" if identical else "differ"


def _step_evidence(at: pd.DataFrame, keys: list[str], closest: str, rival: str) -> StepEvidence | None:
    cols = [*keys, PRIMARY]
    left = at.loc[at[DATA] == closest, cols]
    right = at.loc[at[DATA] == rival, cols]
    wide = left.merge(right, on=keys, suffixes=("_c", "_r"))
    if wide.empty:
        return None
    diff = (wide[f"{PRIMARY}_r"] - wide[f"{PRIMARY}_c"]).to_numpy(dtype="float64")
    diff = diff[~np.isnan(diff)]
    wins, losses, ties = int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum())
    spread = {
        str(v): float(g[PRIMARY].max() - g[PRIMARY].min()) for v, g in at.groupby(DATA, sort=True)
    }
    floor = spread[closest]
    cmed = float(at.loc[at[DATA] == closest, PRIMARY].median())
    rmed = float(at.loc[at[DATA] == rival, PRIMARY].median())
    gap = float(np.median(diff)) if len(diff) else math.nan
    return StepEvidence(
        step=int(at["step"].iloc[0]), rival=rival, pairs=len(wide), wins=wins, losses=losses, ties=ties,
        p_value=sign_test_p(wins, losses), p_holm=None, closest_median=cmed, rival_median=rmed, gap=gap,
        floor=floor, gap_in_floors=gap / floor if floor > 0 else None,
        distance_in_floors=cmed / floor if floor > 0 else None, spread=spread,
    )  # fmt: skip


def evidence(
    sub: pd.DataFrame, keys: list[str], closest: str, rivals: Sequence[str], primary_step: int | None = None
) -> Evidence:
    """Per-step floor, gap and sign test of ``closest`` against its nearest rival; the combined test.

    ``sub``: one model's similarity rows, replicas already collapsed; ``keys``: the axes but data.
    """
    notes: list[str] = []
    per_step = []
    for _step, at in sub.groupby("step", sort=True):
        candidates = [e for r in rivals if (e := _step_evidence(at, keys, closest, r)) is not None]
        if candidates:  # the nearest rival: the smallest median gap
            per_step.append(min(candidates, key=lambda e: (math.inf if math.isnan(e.gap) else e.gap)))
    if primary_step is not None:
        mode = f"primary step {primary_step}"
        tested = [e for e in per_step if e.step == primary_step]
        if not tested:
            notes.append(f"the declared primary step {primary_step} was not compared for this model")
        for e in tested:
            e.p_holm = e.p_value
    else:
        mode = "holm"
        tested = [e for e in per_step if e.tested]
        for e, adj in zip(tested, holm([e.p_value for e in tested]), strict=True):
            e.p_holm = adj
    supporting = [e.p_holm for e in tested if e.tested and e.wins > e.losses]
    p = min(supporting) if supporting else (1.0 if tested else None)
    against = [e for e in tested if e.losses > e.wins]
    if against:
        notes.append(
            f"{closest} is not closer at step(s) {', '.join(str(e.step) for e in against)} (rival wins there)"
        )
    within = [e.within for e in tested if e.tested or e.closest_median > 0]
    if not within or any(w is None for w in within):
        reproduced = None
    elif all(within):
        reproduced = True
    elif not any(within):
        reproduced = False
    else:
        reproduced = None
        notes.append(f"{closest} is within {FAR:g} floors at some tested steps and not at others")
    return Evidence(mode, per_step, p, reproduced, None, notes)


def split_anchored(sim: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(free-running rows, re-anchored rows or None), each without the ``reanchor`` column.

    Re-anchored segments and free-running runs answer different questions (one segment's mismatch,
    or the compounded one), so they are never pooled into one floor or one sign test.
    """
    if REANCHOR not in sim.columns:
        return sim, None
    anchored = sim[REANCHOR].astype(bool)
    free = sim.loc[~anchored].drop(columns=[REANCHOR])
    return free, (sim.loc[anchored].drop(columns=[REANCHOR]) if anchored.any() else None)
