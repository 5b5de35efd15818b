"""The verdict: matched pairs, one sign-test comparison per pair, ties, margins, several variants."""

import itertools

import pandas as pd
import pytest

from retrace.errors import RetraceError
from retrace.report.verdict import model_verdict, verdict_json, verdict_text, verdicts


def cells(model, spec, steps=(1, 2, 4)):
    """spec: {(data, gas, seed): (omc at the last step, l2 at the last step)}; earlier steps scale down."""
    rows = []
    for (data, gas, seed), (omc, l2) in spec.items():
        for step in steps:
            f = step / steps[-1]
            rows.append({
                "cell": f"{model}-{data}-a{gas}-s{seed}", "model": model, "data": data, "gas": gas, "seed": seed,
                "attention": "flash", "step": step, "cos": 1 - omc * f, "one_minus_cos": omc * f, "l2": l2 * f,
                "n_params": 10, "norm_a": 1.0, "norm_b": 1.0, "max_abs_diff": 0.0,
            })  # fmt: skip
    return pd.DataFrame(rows)


def planted(model, closer, farther, n_gas=4, n_seed=2):
    spec = {}
    for i, (gas, seed) in enumerate(itertools.product([1, 2, 4, 8][:n_gas], range(n_seed))):
        spec[(closer, gas, seed)] = (1e-4 * (1 + i), 1.0 + i)
        spec[(farther, gas, seed)] = (3e-4 * (1 + i), 2.0 + i)
    return cells(model, spec)


def test_planted_closer_variant_wins_eight_of_eight():
    v = model_verdict(planted("mislabel", "standard", "deduped"), steps=[1, 4], documented="deduped")
    assert v.winner == "standard" and v.decided
    (pw,) = v.against
    c = pw.final["one_minus_cos"]
    assert (pw.first, pw.second, pw.n_pairs) == ("standard", "deduped", 8)
    assert (c.wins, c.losses, c.ties) == (8, 0, 0)
    assert c.p_value == 0.0078125
    # margin = mean over pairs of (2e-4 * (1 + i)) at the final step, i = 0..7
    assert c.mean_margin == pytest.approx(2e-4 * sum(range(1, 9)) / 8, rel=1e-12)
    assert pw.final["l2"].mean_margin == pytest.approx(1.0)
    assert [s["step"] for s in pw.per_step] == [1, 4] and pw.per_step[0]["wins"] == 8
    assert v.label_agrees is False
    assert len(pw.evidence) == 8 and all(line.endswith("-> standard") for line in pw.evidence)


def test_sign_test_counts_one_comparison_per_pair_not_per_step():
    # 3 pairs x 3 steps all favour A: 9 (pair, step) wins, but the test must use n = 3: p = 2 / 8
    spec = {("A", g, 0): (1e-4, 1.0) for g in (1, 2, 4)} | {("B", g, 0): (2e-4, 2.0) for g in (1, 2, 4)}
    v = model_verdict(cells("m", spec), steps=[1, 2, 4])
    c = v.against[0].final["one_minus_cos"]
    assert (c.wins, c.losses) == (3, 0) and c.p_value == 0.25
    assert sum(s["wins"] for s in v.against[0].per_step) == 9  # descriptive counts only


def test_ties_are_excluded_and_reported():
    spec = {}
    for i, g in enumerate([1, 2, 4, 8, 16, 32, 64, 128, 256]):
        spec[("A", g, 0)] = (1e-4, 1.0)
        spec[("B", g, 0)] = (1e-4, 1.0) if i == 0 else ((2e-4, 2.0) if i < 8 else (0.5e-4, 0.5))
    v = model_verdict(cells("m", spec))
    c = v.against[0].final["one_minus_cos"]
    assert (c.wins, c.losses, c.ties) == (7, 1, 1)
    assert c.p_value == pytest.approx(2 * 9 / 256)  # 0.0703125
    assert "(1 tie(s) excluded)" in verdict_text([v])


def test_final_common_step_is_per_pair():
    # pair at gas 2 only reached step 2 in one cell: its comparison is at step 2, where B is closer
    df = planted("m", "A", "B", n_gas=2, n_seed=1)
    df = df[~((df["cell"] == "m-A-a2-s0") & (df["step"] == 4))]
    df.loc[(df["cell"] == "m-B-a2-s0") & (df["step"] == 2), "one_minus_cos"] = 1e-9
    v = model_verdict(df)
    c = v.against[0].final["one_minus_cos"]
    assert (c.wins, c.losses) == (1, 1)
    assert any("@ step 2" in line and line.endswith("-> B") for line in v.against[0].evidence)


def test_three_variants_pairwise_against_the_winner():
    spec = {}
    for g in (1, 2, 4, 8, 16, 32):
        spec[("raw", g, 0)] = (1e-4 * g, 1.0 * g)
        spec[("preshuffled", g, 0)] = (2e-4 * g, 2.0 * g)
        spec[("deduped", g, 0)] = (3e-4 * g, 3.0 * g)
    v = model_verdict(cells("m", spec))
    assert v.winner == "raw" and v.decided
    assert [pw.second for pw in v.against] == ["deduped", "preshuffled"]
    assert all(pw.final["one_minus_cos"].wins == 6 and pw.final["one_minus_cos"].p_value == 2 * 0.5**6
               for pw in v.against)


def test_no_pairs_single_variant_and_undecided():
    only = cells("m", {("A", 1, 0): (1e-4, 1.0), ("A", 2, 0): (2e-4, 1.0)})
    v = model_verdict(only)
    assert v.winner is None and "only one data variant" in v.notes[0]
    unmatched = cells("m", {("A", 1, 0): (1e-4, 1.0), ("B", 2, 0): (2e-4, 1.0)})
    v = model_verdict(unmatched)
    assert v.winner is None and "no matched pairs" in v.notes[0]
    split = cells("m", {("A", 1, 0): (1e-4, 1.0), ("B", 1, 0): (2e-4, 1.0),
                        ("A", 2, 0): (2e-4, 1.0), ("B", 2, 0): (1e-4, 1.0)})
    v = model_verdict(split)
    assert v.winner is None and "undecided" in v.notes[0]


def test_verdicts_per_model_json_and_errors():
    sim = pd.concat([planted("mislabel", "standard", "deduped"), planted("control", "deduped", "standard")])
    vs = verdicts(sim, [4], {"mislabel": "deduped", "control": "deduped"})
    assert [(v.model, v.winner, v.label_agrees) for v in vs] == [
        ("control", "deduped", True), ("mislabel", "standard", False)]
    js = verdict_json(vs)
    assert js["models"][1]["against"][0]["final"]["one_minus_cos"]["p_value"] == 0.0078125
    assert js["models"][1]["summary"] == "Closest variant: standard"
    text = verdict_text(vs)
    assert "DISAGREES" in text and "p = 0.007812" in text and "Method:" in text
    with pytest.raises(RetraceError, match="unknown model"):
        verdicts(sim, [], {"nope": "deduped"})
    dup = pd.concat([sim, sim.assign(cell=sim["cell"] + "x")])
    with pytest.raises(RetraceError, match="identical axes"):
        verdicts(dup)


def test_undefined_distances_are_left_out_and_said():
    spec = {("A", g, 0): (1e-4, 1.0) for g in (1, 2, 4)} | {("B", g, 0): (2e-4, 2.0) for g in (1, 2, 4)}
    df = cells("m", spec)
    df.loc[df["cell"] == "m-B-a4-s0", "one_minus_cos"] = float("nan")
    v = model_verdict(df)
    c = v.against[0].final["one_minus_cos"]
    assert (c.wins, c.losses, c.ties, c.undefined) == (2, 0, 0, 1)
    assert c.mean_margin == pytest.approx(1e-4)
    assert "1 pair(s) left out" in verdict_text([v])


def test_l2_disagreeing_with_cos_is_noted_but_cos_decides():
    spec = {("A", g, 0): (1e-4, 5.0) for g in (1, 2, 4)} | {("B", g, 0): (2e-4, 1.0) for g in (1, 2, 4)}
    v = model_verdict(cells("m", spec))
    assert v.winner == "A"
    assert v.against[0].final["l2"].losses == 3
    assert "A vs B: L2 does not agree with 1 - theta Cos" in v.notes
