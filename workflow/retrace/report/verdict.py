"""Which data variant each published model's reproductions are closest to.

Matched pairs. Two cells form a matched pair when they reproduce the same model and are equal on
every axis but ``data`` (same parallel layout, attention, deps, seed, precision, steps, ...). Each
cell is compared with the same published checkpoints, so the pair differs only in the data the
reproduction was trained on, and the variant whose reproduction lands nearer to the published
weights is the better explanation of what the published run was trained on.

What is counted, and why:

* The sign test counts **one comparison per matched pair**: the pair's final common step (the
  largest step both cells have a similarity row for). Distances of one cell at successive steps are
  strongly autocorrelated (they are points on one trajectory), so counting every (pair, step) would
  pseudo-replicate one run many times and make the p-value far too small.
* The primary distance is 1 − θ Cos; the variant with the smaller value wins the pair. L2 is
  counted the same way and reported beside it (with its own sign test), never mixed into the call.
* Exact ties (equal distances, e.g. bit-identical reproductions) carry no sign: they are excluded
  from the sign test and reported as ties.
* Per chosen step, the same pairs are also counted at that step. Those counts are descriptive only
  (they show whether the call holds early and late); no p-value is computed from them.
* The margin is the mean over pairs, at the final common step, of (loser's distance − winner's
  distance): positive means the winner is closer on average.
* With more than two variants every pair of variants is compared over its matched pairs; the winner
  is the variant that wins a majority of matched pairs against the most other variants (ties broken
  by the sum of its mean margins), and the verdict reports the winner against each other variant.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from retrace.errors import RetraceError
from retrace.report import evidence as E
from retrace.report.frames import DATA, MODEL, axis_columns, describe, fmt_num, sorted_values
from retrace.report.stats import sign_test_p

PRIMARY = "one_minus_cos"
SECONDARY = "l2"

METHOD = (
    "Matched pair = two cells of one model equal on every axis but data. Primary distance: 1 - theta Cos "
    "(smaller = closer); L2 reported beside it. The sign test counts one comparison per matched pair, at "
    "the pair's final common step (successive steps of one run are not independent); exact ties are "
    "excluded from it and reported. Per-step counts at the chosen steps are descriptive only. "
    "p = exact two-sided binomial sign test, min(1, 2 * sum_{i<=min(w,l)} C(w+l, i) / 2^(w+l)). "
    "Margin = mean over pairs of (other variant's distance - winner's distance) at the final common step."
)


@dataclass
class Count:
    """Wins of ``first`` against ``second`` over matched pairs, for one distance."""

    wins: int
    losses: int
    ties: int
    p_value: float
    mean_margin: float  # mean of (second − first); positive = first closer
    undefined: int = 0  # pairs where a distance is NaN (a side with zero norm): neither counted nor averaged

    @classmethod
    def of(cls, first: pd.Series, second: pd.Series) -> Count:
        diff = (second - first).to_numpy(dtype="float64")
        defined = diff[~np.isnan(diff)]
        wins, losses = int((defined > 0).sum()), int((defined < 0).sum())
        ties = int((defined == 0).sum())
        margin = float(defined.mean()) if len(defined) else math.nan
        return cls(wins, losses, ties, sign_test_p(wins, losses), margin, len(diff) - len(defined))


@dataclass
class Pairwise:
    """One variant against another over their matched pairs."""

    first: str
    second: str
    n_pairs: int
    final: dict[str, Count]  # per distance (one_minus_cos, l2), one comparison per pair at its final step
    per_step: list[dict[str, Any]] = field(default_factory=list)  # descriptive counts at the chosen steps
    evidence: list[str] = field(default_factory=list)

    def flipped(self) -> Pairwise:
        def flip(c: Count) -> Count:
            return Count(c.losses, c.wins, c.ties, c.p_value, -c.mean_margin, c.undefined)

        return Pairwise(
            self.second,
            self.first,
            self.n_pairs,
            {k: flip(c) for k, c in self.final.items()},
            [{**s, "wins": s["losses"], "losses": s["wins"]} for s in self.per_step],
            self.evidence,
        )


@dataclass
class ModelVerdict:
    model: str
    variants: list[str]
    winner: str | None
    decided: bool  # the winner wins a strict majority of pairs against every other variant
    documented: str | None
    against: list[Pairwise]
    notes: list[str] = field(default_factory=list)
    evidence: E.Evidence | None = None  # per-step floor, gap and the combined test (retrace.report.evidence)

    @property
    def label_agrees(self) -> bool | None:
        if self.documented is None or self.winner is None:
            return None
        return self.documented == self.winner


def _matched(sub: pd.DataFrame, keys: list[str], a: str, b: str) -> pd.DataFrame:
    cols = [*keys, "step", "cell", PRIMARY, SECONDARY]
    left = sub.loc[sub[DATA] == a, cols]
    right = sub.loc[sub[DATA] == b, cols]
    return left.merge(right, on=[*keys, "step"], suffixes=("_a", "_b"))


def _pairwise(sub: pd.DataFrame, keys: list[str], a: str, b: str, steps: Sequence[int]) -> Pairwise:
    wide = _matched(sub, keys, a, b)
    if wide.empty:
        return Pairwise(a, b, 0, {})
    final_idx = wide.groupby(keys, dropna=False, sort=False)["step"].idxmax()
    final = wide.loc[final_idx.to_numpy()]
    counts = {m: Count.of(final[f"{m}_a"], final[f"{m}_b"]) for m in (PRIMARY, SECONDARY)}
    per_step = []
    for step in steps:
        at = wide[wide["step"] == step]
        if at.empty:
            continue
        c = Count.of(at[f"{PRIMARY}_a"], at[f"{PRIMARY}_b"])
        per_step.append({"step": int(step), "pairs": len(at), "wins": c.wins, "losses": c.losses, "ties": c.ties})
    others = [k for k in keys if k != MODEL and sub[k].nunique(dropna=False) > 1]  # what tells pairs apart
    evidence = []
    for _, row in final.iterrows():
        da, db = row[f"{PRIMARY}_a"], row[f"{PRIMARY}_b"]
        closer = a if da < db else b if db < da else "tie"
        evidence.append(
            f"{describe([row[k] for k in others], others)} @ step {int(row['step'])}: "
            f"{a} 1-cos {fmt_num(da)} L2 {fmt_num(row[f'{SECONDARY}_a'])} | "
            f"{b} 1-cos {fmt_num(db)} L2 {fmt_num(row[f'{SECONDARY}_b'])} -> {closer}"
        )
    return Pairwise(a, b, len(final), counts, per_step, evidence)


def _check_unique(sub: pd.DataFrame, axes: list[str]) -> None:
    dup = sub.duplicated([*axes, "step"], keep=False)
    if dup.any():
        cells = sorted(set(sub.loc[dup, "cell"].astype(str)))
        raise RetraceError(f"similarity table: cells {', '.join(cells[:4])} have identical axes and step")


def model_verdict(
    sub: pd.DataFrame, steps: Sequence[int] = (), documented: str | None = None, primary_step: int | None = None
) -> ModelVerdict:
    """The verdict for one model's rows of the aggregated similarity table.

    ``primary_step``: the one step the combined test uses, declared by the study before it ran;
    None = Holm over every step (``retrace.report.evidence``).
    """
    axes = axis_columns(sub)
    model = str(sub[MODEL].iloc[0])
    _check_unique(sub, axes)
    sub, replica_spread, replicas = E.collapse_replicas(sub, [a for a in axes if a != DATA])
    axes = [a for a in axes if a != E.REPLICA]
    keys = [a for a in axes if a != DATA]
    variants = [str(v) for v in sorted_values(sub[DATA])]
    notes = []
    if documented is not None and documented not in variants:
        notes.append(f"documented variant {documented!r} was not among the reproduced variants")
    if len(variants) < 2:
        notes.append("only one data variant was reproduced: nothing to compare")
        return ModelVerdict(model, variants, None, False, documented, [], notes)

    table = {}
    for a, b in itertools.combinations(variants, 2):
        pw = _pairwise(sub, keys, a, b, steps)
        table[a, b], table[b, a] = pw, pw.flipped()

    def beats(x: str, y: str) -> bool:
        c = table[x, y].final.get(PRIMARY)
        return c is not None and c.wins > c.losses

    def score(v: str) -> tuple[int, float]:
        copeland = sum(beats(v, o) for o in variants if o != v)
        margins = [table[v, o].final[PRIMARY].mean_margin for o in variants if o != v and table[v, o].final]
        return copeland, math.fsum(m for m in margins if not math.isnan(m))

    if not any(pw.n_pairs for pw in table.values()):
        notes.append("no matched pairs: no two cells differ only in data")
        return ModelVerdict(model, variants, None, False, documented, [], notes)
    ranked = sorted(variants, key=score, reverse=True)
    if score(ranked[0]) == score(ranked[1]):
        notes.append(f"undecided: {ranked[0]} and {ranked[1]} score the same")
        every_pair = [table[a, b] for a, b in itertools.combinations(variants, 2)]
        return ModelVerdict(model, variants, None, False, documented, every_pair, notes)
    winner = ranked[0]
    against = [table[winner, o] for o in variants if o != winner]
    decided = all(beats(winner, o) for o in variants if o != winner)
    for pw in against:
        if pw.n_pairs == 0:
            notes.append(f"{winner} and {pw.second} have no matched pair")
        elif (pw.final[PRIMARY].wins > pw.final[PRIMARY].losses) != (pw.final[SECONDARY].wins > pw.final[SECONDARY].losses):
            notes.append(f"{winner} vs {pw.second}: L2 does not agree with 1 - theta Cos")
    ev = E.evidence(sub, keys, winner, [o for o in variants if o != winner], primary_step)
    ev.replicas = replicas
    if replica_spread is not None:
        for e in ev.per_step:
            e.replica_spread = float(replica_spread.get(e.step, math.nan))
    return ModelVerdict(model, variants, winner, decided, documented, against, notes, ev)


def verdicts(
    sim: pd.DataFrame,
    steps: Sequence[int] = (),
    documented: Mapping[str, str] | None = None,
    primary_step: int | None = None,
) -> list[ModelVerdict]:
    """One verdict per model in the aggregated similarity table."""
    documented = dict(documented or {})
    unknown = sorted(set(documented) - set(sim[MODEL].astype(str)))
    if unknown:
        raise RetraceError(f"documented variant given for unknown model(s): {', '.join(unknown)}")
    return [
        model_verdict(sub, steps, documented.get(str(model)), primary_step)
        for model, sub in sim.groupby(MODEL, sort=True)
    ]


def _fmt_p(p: float) -> str:
    return f"{p:.4g}"


def verdict_lines(v: ModelVerdict) -> list[str]:
    """The verdict of one model as text, evidence included."""
    out = [f"Model {v.model} (data variants: {', '.join(v.variants)})"]
    if v.winner is None:
        out.append("  Closest variant: none")
    else:
        strength = "" if v.decided else " (not a majority against every other variant)"
        out.append(f"  Closest variant: {v.winner}{strength}")
    for pw in v.against:
        if not pw.n_pairs:
            out.append(f"  {pw.first} vs {pw.second}: no matched pair")
            continue
        c, l2 = pw.final[PRIMARY], pw.final[SECONDARY]
        out.append(
            f"  {pw.first} vs {pw.second}: {pw.first} closer by 1 - theta Cos in {c.wins} of {c.wins + c.losses} "
            f"matched pairs at their final common step ({c.ties} tie(s) excluded); exact two-sided sign test "
            f"p = {_fmt_p(c.p_value)}"
        )
        out.append(
            f"    by L2: {pw.first} closer in {l2.wins} of {l2.wins + l2.losses} ({l2.ties} tie(s)), "
            f"p = {_fmt_p(l2.p_value)}"
        )
        if c.undefined:
            out.append(f"    {c.undefined} pair(s) left out: a distance is undefined (NaN, a side with zero norm)")
        out.append(
            f"    mean margin ({pw.second} - {pw.first}): 1 - theta Cos {fmt_num(c.mean_margin)}, "
            f"L2 {fmt_num(l2.mean_margin)}"
        )
        if pw.per_step:
            steps = "; ".join(
                f"step {s['step']}: {s['wins']}/{s['pairs']}" + (f" ({s['ties']} tie)" if s["ties"] else "")
                for s in pw.per_step
            )
            out.append(f"    {pw.first} closer at the chosen steps (descriptive, not tested): {steps}")
        out.append("    evidence (final common step of each matched pair):")
        out.extend(f"      {line}" for line in pw.evidence)
    if v.evidence is not None:
        out.extend(evidence_lines(v))
    if v.documented is not None:
        if v.label_agrees is None:
            out.append(f"  Documented variant: {v.documented} (no closest variant to check it against)")
        else:
            word = "AGREES with" if v.label_agrees else "DISAGREES with"
            line = f"  Documented variant: {v.documented}: {word} the closest variant {v.winner}"
            if v.label_agrees and v.evidence is not None and v.evidence.reproduced is False:
                # closest is not reproduced: the label names the nearest candidate, not the data it was trained on
                line += ", which does not reproduce the reference: the label is not confirmed"
            out.append(line)
    out.extend(f"  Note: {n}" for n in v.notes)
    return out


def reproduced_phrase(v: ModelVerdict) -> str:
    ev = v.evidence
    if ev is None or v.winner is None:
        return "no closest variant"
    if ev.reproduced is True:
        return f"{v.winner} reproduces the reference (within {E.FAR:g} floors at every tested step)"
    if ev.reproduced is False:
        return f"{v.winner} is closest, but no candidate reproduces the reference (above {E.FAR:g} floors)"
    return f"{v.winner} is closest; whether it reproduces the reference cannot be told from the floor"


def evidence_lines(v: ModelVerdict) -> list[str]:
    """The per-step floor and gap and the combined test of one model."""
    ev = v.evidence
    assert ev is not None
    tested = [e for e in ev.per_step if e.p_holm is not None]
    how = (
        f"Holm over the {len(tested)} step(s) with an untied pair"
        if ev.mode == "holm" else f"the study's declared {ev.mode}"
    )
    p = "undefined (no tested step)" if ev.p_value is None else _fmt_p(ev.p_value)
    out = [
        f"  Combined over steps ({how}): p = {p}",
        f"  Reproduced: {reproduced_phrase(v)}",
        "  Where the evidence is (closest vs nearest other variant, 1 - theta Cos):",
    ]
    for e in ev.per_step:
        units = "–" if e.gap_in_floors is None else f"{e.gap_in_floors:.3g}"
        dist = "–" if e.distance_in_floors is None else f"{e.distance_in_floors:.3g}"
        adj = "" if e.p_holm is None else f", adjusted {_fmt_p(e.p_holm)}"
        out.append(
            f"    step {e.step}: {v.winner} median {fmt_num(e.closest_median)} ({dist} floors), {e.rival} median "
            f"{fmt_num(e.rival_median)}; floor {fmt_num(e.floor)}; gap {fmt_num(e.gap)} = {units} floors; "
            f"{e.wins}/{e.wins + e.losses} pairs ({e.ties} tie(s)), p = {_fmt_p(e.p_value)}{adj}"
        )
    if ev.replicas is not None:
        worst = max((e.replica_spread or 0.0) for e in ev.per_step) if ev.per_step else 0.0
        out.append(
            "  Replicas (identical settings run again): bit-identical at every step"
            if ev.replicas == "bit-identical"
            else f"  Replicas (identical settings run again): differ, largest spread {fmt_num(worst)} in 1 - theta Cos"
        )
    out.extend(f"  Note: {n}" for n in ev.notes)
    return out


def verdict_text(vs: Sequence[ModelVerdict], title: str = "Verdict: the data variant closest to each published model") -> str:
    lines = [title, ""]
    for v in vs:
        lines.extend(verdict_lines(v))
        lines.append("")
    lines.append(f"Method: {METHOD}")
    lines.append(f"Evidence: {E.METHOD}")
    return "\n".join(lines) + "\n"


def verdict_json(vs: Sequence[ModelVerdict]) -> dict[str, Any]:
    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and math.isnan(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(x) for k, x in obj.items()}
        if isinstance(obj, list):
            return [clean(x) for x in obj]
        return obj

    models = []
    for v in vs:
        d = asdict(v)
        d["label_agrees"] = v.label_agrees
        d["summary"] = verdict_lines(v)[1].strip()
        d.pop("evidence", None)
        d.update(_evidence_json(v))
        models.append(d)
    return clean({
        "method": METHOD, "evidence_method": E.METHOD, "primary": PRIMARY, "secondary": SECONDARY,
        "far_floors": E.FAR, "models": models,
    })


def _evidence_json(v: ModelVerdict) -> dict[str, Any]:
    """The machine-readable keys: closest, documented, agrees, reproduced, p_value, floor, per_step."""
    ev = v.evidence
    final = v.against[0].final.get(PRIMARY) if v.against and v.against[0].n_pairs else None
    out: dict[str, Any] = {
        "closest": v.winner, "documented": v.documented, "agrees": v.label_agrees,
        "reproduced": None if ev is None else ev.reproduced,
        "reproduced_text": reproduced_phrase(v),
        "p_value": None if ev is None else ev.p_value,
        "p_value_final_step": None if final is None else max(
            pw.final[PRIMARY].p_value for pw in v.against if pw.final
        ),
        "test": None if ev is None else ev.mode,
        "replicas": None if ev is None else ev.replicas,
        "evidence_notes": [] if ev is None else ev.notes,
    }
    steps = [] if ev is None else ev.per_step
    decision = None
    if ev is not None and steps:
        decision = next((e for e in steps if ev.mode != "holm" and e.p_holm is not None), steps[-1])
    out["floor"] = None if decision is None else decision.floor
    out["floor_step"] = None if decision is None else decision.step
    out["per_step"] = [
        {
            "step": e.step, "rival": e.rival, "gap": e.gap, "floor": e.floor, "gap_in_floors": e.gap_in_floors,
            "closest_median": e.closest_median, "rival_median": e.rival_median,
            "distance_in_floors": e.distance_in_floors, "spread": e.spread, "replica_spread": e.replica_spread,
            "pairs": e.pairs, "wins": e.wins, "losses": e.losses, "ties": e.ties,
            "p_value": e.p_value, "p_adjusted": e.p_holm,
        }
        for e in steps
    ]  # fmt: skip
    return out

