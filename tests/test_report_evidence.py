"""Noise floor, per-step gap and the combined verdict over steps, on small tables worked out by hand."""

import json

import pandas as pd
import pytest

from retrace.report.stats import holm
from retrace.report.verdict import model_verdict, verdict_json, verdict_text


def table(spec, model="m", replicas=None):
    """spec: {step: {data: [1 - cos of layout 0, layout 1, ...]}}; layouts are the non-data axis ``gas``."""
    rows = []
    for step, by_data in spec.items():
        for data, values in by_data.items():
            for gas, omc in enumerate(values):
                for r, extra in enumerate(replicas or [0.0]):
                    row = {
                        "cell": f"{model}-{data}-a{gas}-r{r}", "model": model, "data": data, "gas": gas,
                        "step": step, "one_minus_cos": omc + extra, "cos": 1 - omc - extra, "l2": 10 * (omc + extra),
                    }  # fmt: skip
                    if replicas is not None:
                        row["replica"] = r
                    rows.append(row)
    return pd.DataFrame(rows)


SIX_A = [1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 7e-6]  # range 6e-6, median 3.5e-6
SIX_B = [1.0e-3, 1.1e-3, 1.2e-3, 1.3e-3, 1.4e-3, 1.5e-3]


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # sorted 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.04 (x2 = 0.08), 0.5 (x1 = 0.5, kept monotone)
    assert holm([0.04, 0.01, 0.5, 0.02]) == pytest.approx([0.08, 0.04, 0.5, 0.06])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_floor_gap_and_holm_over_steps():
    spec = {0: {"A": [0.0] * 6, "B": [0.0] * 6}, 2: {"A": SIX_A, "B": SIX_B}, 4: {"A": SIX_A, "B": SIX_B}}
    v = model_verdict(table(spec), documented="A")
    ev = v.evidence
    assert v.winner == "A" and ev.mode == "holm"
    step0, step2, step4 = ev.per_step
    assert step0.p_holm is None and (step0.ties, step0.floor) == (6, 0.0)  # all tied: not tested
    assert step2.floor == pytest.approx(6e-6)
    # per-pair gaps B - A: 999e-6, 1098e-6, 1197e-6, 1296e-6, 1395e-6, 1493e-6 -> median (1197 + 1296) / 2
    assert step2.gap == pytest.approx(1246.5e-6)
    assert step2.gap_in_floors == pytest.approx(1246.5 / 6)
    assert step2.distance_in_floors == pytest.approx(3.5 / 6)
    assert step2.spread == pytest.approx({"A": 6e-6, "B": 0.5e-3})
    # 6 of 6 pairs: p = 2 / 64 at each step; Holm over two steps: 2 * 0.03125 for both
    assert (step2.p_value, step2.p_holm, step4.p_holm) == (0.03125, 0.0625, 0.0625)
    assert ev.p_value == 0.0625 and ev.reproduced is True
    js = verdict_json([v])["models"][0]
    for key in ("closest", "documented", "agrees", "reproduced", "p_value", "floor", "per_step"):
        assert key in js
    assert (js["closest"], js["agrees"], js["reproduced"], js["floor"]) == ("A", True, True, pytest.approx(6e-6))
    assert js["p_value_final_step"] == 0.03125  # the final-step test, kept beside the combined one
    assert [s["step"] for s in js["per_step"]] == [0, 2, 4]
    json.dumps(js, allow_nan=False)
    assert "Holm over the 2 step(s)" in verdict_text([v])


def test_primary_step_is_the_only_step_tested():
    spec = {2: {"A": SIX_A, "B": SIX_B}, 4: {"A": SIX_A, "B": SIX_B}}
    v = model_verdict(table(spec), primary_step=4)
    assert v.evidence.mode == "primary step 4"
    assert [e.p_holm for e in v.evidence.per_step] == [None, 0.03125]
    assert v.evidence.p_value == 0.03125
    assert "declared primary step 4" in verdict_text([v])
    missing = model_verdict(table(spec), primary_step=8)
    assert missing.evidence.p_value is None and "not compared" in missing.evidence.notes[0]


def test_closest_far_above_the_floor_is_not_reproduced():
    far_a = [1.000e-3, 1.001e-3, 1.002e-3, 1.003e-3, 1.004e-3, 1.005e-3]  # range 5e-6, median 200 floors
    spec = {2: {"A": far_a, "B": SIX_B}, 4: {"A": far_a, "B": SIX_B}}
    v = model_verdict(table(spec))
    assert v.winner == "A" and v.evidence.reproduced is False
    assert v.evidence.per_step[-1].distance_in_floors == pytest.approx(1.0025e-3 / 5e-6)
    assert "closest, but no candidate reproduces the reference" in verdict_text([v])
    assert verdict_json([v])["models"][0]["reproduced"] is False


def test_a_label_naming_a_closest_variant_that_does_not_reproduce_is_not_confirmed():
    """The planted null: trained on a variant that is not a candidate. The label names the nearer
    candidate (agrees), but that candidate is far above its floor, so the text must not read as a
    confirmation; with the closest reproduced the agreement stands as it is."""
    far_a = [1.000e-3, 1.001e-3, 1.002e-3, 1.003e-3, 1.004e-3, 1.005e-3]
    null = model_verdict(table({2: {"A": far_a, "B": SIX_B}, 4: {"A": far_a, "B": SIX_B}}), documented="A")
    js = verdict_json([null])["models"][0]
    assert (js["closest"], js["agrees"], js["reproduced"]) == ("A", True, False)
    text = verdict_text([null])
    assert "AGREES with the closest variant A, which does not reproduce the reference: the label is not confirmed" in text
    honest = model_verdict(table({2: {"A": SIX_A, "B": SIX_B}}), documented="A")
    assert "AGREES with the closest variant A\n" in verdict_text([honest])


def test_a_step_won_by_the_rival_gives_no_support():
    # step 2: B closer in 6/6; step 4 (final): A closer in 6/6. Closest = A (final step); Holm over
    # two steps gives 0.0625 at each, and only step 4 supports A.
    far = [1.5e-3 + i * 1e-6 for i in range(6)]  # A at step 2: range 5e-6, median 1.5025e-3 = 300 floors
    spec = {2: {"A": far, "B": SIX_A}, 4: {"A": SIX_A, "B": SIX_B}}
    v = model_verdict(table(spec))
    assert v.winner == "A" and v.evidence.p_value == 0.0625
    assert any("not closer at step(s) 2" in n for n in v.evidence.notes)
    assert v.evidence.reproduced is None  # far above at step 2, within at step 4


def test_replicas_are_collapsed_not_counted_as_pairs():
    spec = {4: {"A": SIX_A, "B": SIX_B}}
    same = model_verdict(table(spec, replicas=[0.0, 0.0]))
    (e,) = same.evidence.per_step
    assert e.pairs == 6 and e.p_value == 0.03125  # 12 replica rows per variant are still 6 pairs
    assert same.evidence.replicas == "bit-identical" and e.replica_spread == 0.0
    assert "bit-identical at every step" in verdict_text([same])
    differ = model_verdict(table(spec, replicas=[0.0, 2e-7]))
    (d,) = differ.evidence.per_step
    assert differ.evidence.replicas == "differ" and d.replica_spread == pytest.approx(2e-7)
    assert d.closest_median == pytest.approx(3.5e-6 + 1e-7)  # the replicas' mean


def test_report_writes_the_evidence_figure_and_the_declared_test(tmp_path):
    from retrace.report.build import build_report

    tables = tmp_path / "tables"
    tables.mkdir()
    table({2: {"A": SIX_A, "B": SIX_B}, 4: {"A": SIX_A, "B": SIX_B}}).to_parquet(tables / "similarity.parquet")
    out = build_report(tables, tmp_path / "report", documented={"m": "B"}, primary_step=2, log=lambda _: None)
    assert (out / "figures" / "evidence_m.png").stat().st_size > 1000
    js = json.loads((out / "verdict.json").read_text())["models"][0]
    assert (js["test"], js["p_value"], js["floor_step"], js["agrees"]) == ("primary step 2", 0.03125, 2, False)
    assert "where the evidence is" in (out / "index.html").read_text()


def test_anchored_cells_get_their_own_verdict_and_figure(tmp_path):
    from retrace.report.build import build_report

    free = table({2: {"A": SIX_A, "B": SIX_B}, 4: {"A": SIX_A, "B": SIX_B}}).assign(reanchor=False)
    anchored = table({2: {"A": [0.0] * 6, "B": SIX_B}, 4: {"A": [0.0] * 6, "B": SIX_B}}).assign(reanchor=True)
    anchored["cell"] += "-anchored"
    tables = tmp_path / "tables"
    tables.mkdir()
    pd.concat([free, anchored]).to_parquet(tables / "similarity.parquet")
    other = table({2: {"A": SIX_A, "B": SIX_B}}, model="n").assign(reanchor=False)  # no anchored cells
    pd.concat([free, anchored, other]).to_parquet(tables / "similarity.parquet")
    out = build_report(tables, tmp_path / "report", documented={"m": "A", "n": "A"}, log=lambda _: None)
    js = json.loads((out / "verdict.json").read_text())
    m, _n = js["models"]
    assert m["per_step"][-1]["pairs"] == 6 and m["floor"] == pytest.approx(6e-6)  # free cells only
    (a,) = js["anchored_models"]
    # anchored A is bit-identical: floor 0, distance 0 -> reproduced
    assert (a["closest"], a["floor"], a["reproduced"]) == ("A", 0.0, True)
    assert (out / "figures" / "anchored_m.png").stat().st_size > 1000
    assert "Re-anchored segments" in (out / "verdict.txt").read_text()
