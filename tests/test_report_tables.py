"""Factor tables: rows, columns and averages computed by hand for one-at-a-time, factorial and irregular grids."""

import math

import pandas as pd
import pytest

from retrace.errors import RetraceError
from retrace.report import tables as T
from retrace.report.frames import fmt_cos

LAYOUTS = {1: (4, 2, 1), 2: (2, 2, 2), 4: (1, 2, 4)}  # gas -> (gpus, pdbs, gas); global batch 8


def row(model, data, gas, attention, step, omc, l2, seed=1):
    gpus, pdbs, gas = LAYOUTS[gas]
    cell = f"{model}__{data}__g{gpus}p{pdbs}a{gas}__cpu__{attention}__torch__s{seed}__to8__fp32__builtin"
    return {
        "cell": cell, "model": model, "data": data, "gpus": gpus, "pdbs": pdbs, "gas": gas, "gpu_type": "cpu",
        "attention": attention, "deps": "torch", "seed": seed, "steps": 8, "precision": "fp32",
        "engine": "builtin", "step": step, "cos": 1 - omc, "one_minus_cos": omc, "l2": l2, "n_params": 100,
        "norm_a": 1.0, "norm_b": 1.0, "max_abs_diff": 0.1,
    }


def frame(specs):
    """specs: (model, data, gas, attention, omc@8, l2@8); every cell also has step 0 (0, 0) and step 4 (half)."""
    rows = []
    for model, data, gas, att, omc, l2 in specs:
        rows.append(row(model, data, gas, att, 0, 0.0, 0.0))
        rows.append(row(model, data, gas, att, 4, omc / 2, l2 / 2))
        rows.append(row(model, data, gas, att, 8, omc, l2))
    return pd.DataFrame(rows)


# one-at-a-time: baseline (gas 1, flash), gas 2, gas 4, attention global; both data variants
OAT = frame([
    ("m", "std", 1, "flash", 1e-4, 1.0), ("m", "std", 2, "flash", 2e-4, 2.0),
    ("m", "std", 4, "flash", 4e-4, 4.0), ("m", "std", 1, "global", 3e-4, 3.0),
    ("m", "dd", 1, "flash", 1e-3, 10.0), ("m", "dd", 2, "flash", 2e-3, 20.0),
    ("m", "dd", 4, "flash", 4e-3, 40.0), ("m", "dd", 1, "global", 3e-3, 30.0),
])  # fmt: skip

# factorial: gas {1, 2} x attention {flash, global} x data
FACT = frame([
    ("m", "std", 1, "flash", 1e-4, 1.0), ("m", "std", 1, "global", 3e-4, 3.0),
    ("m", "std", 2, "flash", 2e-4, 2.0), ("m", "std", 2, "global", 6e-4, 6.0),
    ("m", "dd", 1, "flash", 1e-3, 10.0), ("m", "dd", 1, "global", 5e-3, 50.0),
    ("m", "dd", 2, "flash", 2e-3, 20.0), ("m", "dd", 2, "global", 7e-3, 70.0),
])  # fmt: skip


def test_factors_group_the_layout_and_skip_constant_axes():
    fs = T.factors(OAT)
    assert [f.name for f in fs] == ["parallel", "attention"]
    assert fs[0].columns == ("gas", "pdbs", "gpus")  # pdbs is constant but belongs to the layout


def test_one_at_a_time_rows_are_the_baseline_slice():
    parallel = T.factors(OAT)[0]
    long = T.factor_table(OAT, parallel, [8])
    assert list(long["gas"].unique()) == [1, 2, 4]
    # only the attention=flash slice holds every gas value: each entry is that one cell's value
    assert set(long["n"]) == {1} and set(long["slices"]) == {1} and long["balanced"].all()
    std = long[long["data"] == "std"].set_index("gas")
    assert std.loc[1, "one_minus_cos"] == 1e-4 and std.loc[2, "one_minus_cos"] == 2e-4
    assert std.loc[4, "l2"] == 4.0
    # the attention table is the gas=1 slice: flash 1e-4, global 3e-4 (not averaged with gas 2/4 cells)
    att = T.factor_table(OAT, T.factors(OAT)[1], [8])
    assert att.set_index(["attention", "data"]).loc[("global", "dd"), "one_minus_cos"] == 3e-3
    assert att.set_index(["attention", "data"]).loc[("flash", "std"), "l2"] == 1.0


def test_factorial_entries_are_marginal_means():
    parallel, attention = T.factors(FACT)
    long = T.factor_table(FACT, parallel, [4, 8]).set_index(["gas", "data", "step"])
    assert long.loc[(1, "std", 8), "one_minus_cos"] == pytest.approx((1e-4 + 3e-4) / 2, rel=1e-15)
    assert long.loc[(2, "dd", 8), "l2"] == pytest.approx((20.0 + 70.0) / 2)
    assert long.loc[(2, "dd", 4), "l2"] == pytest.approx((10.0 + 35.0) / 2)
    assert long.loc[(1, "std", 8), "cos"] == pytest.approx(1 - 2e-4, rel=1e-15)
    assert set(long["n"]) == {2} and set(long["slices"]) == {2}
    att = T.factor_table(FACT, attention, [8]).set_index(["attention", "data"])
    assert att.loc[("global", "dd"), "one_minus_cos"] == pytest.approx((5e-3 + 7e-3) / 2)


def test_unbalanced_grid_falls_back_to_all_cells_and_says_so():
    irregular = FACT[~((FACT["gas"] == 2) & (FACT["attention"] == "flash") & (FACT["data"] == "dd"))]
    irregular = irregular[~((irregular["gas"] == 1) & (irregular["attention"] == "global") & (irregular["data"] == "std"))]
    long = T.factor_table(irregular, T.factors(irregular)[0], [8])
    assert not long["balanced"].any()
    entry = long.set_index(["gas", "data"])
    assert entry.loc[(2, "dd"), "one_minus_cos"] == pytest.approx(7e-3)  # the one dd cell left at gas 2
    assert entry.loc[(2, "std"), "n"] == 2
    assert "UNBALANCED" in T.averaging_note(long)


def test_wide_tables_have_one_row_per_value_and_columns_per_data_and_step():
    parallel = T.factors(OAT)[0]
    long = T.factor_table(OAT, parallel, [4, 8])
    num = T.wide_numeric(long, parallel)
    assert list(num["gas"]) == [1, 2, 4]
    assert list(num.columns[:5]) == ["model", "gas", "pdbs", "gpus", "n"]
    assert "dd cos @ 4" in num.columns and "std L2 @ 8" in num.columns and "std 1-cos @ 8" in num.columns
    assert len(num.columns) == 5 + 2 * 2 * 3  # steps x data x (cos, 1-cos, L2)
    assert num.loc[num["gas"] == 4, "dd L2 @ 8"].item() == 40.0
    assert num.loc[num["gas"] == 2, "std cos @ 4"].item() == pytest.approx(1 - 1e-4)
    shown = T.wide_display(long, parallel)
    assert shown.loc[shown["gas"] == "1", "std θ Cos @ 8"].item() == "0.999900"
    md = T.to_markdown(shown, labels=4)
    lines = md.splitlines()
    assert lines[0].startswith("| model | gas | pdbs | gpus | n | dd θ Cos @ 4 |")
    assert lines[1] == "|---|---|---|---|---:|" + "---:|" * 8
    assert len(lines) == 2 + 3
    html = T.to_html(shown, caption="note <b>")
    assert html.count("<tr>") == 4 and "note &lt;b&gt;" in html


def test_fmt_cos_keeps_three_significant_digits_of_one_minus_cos():
    assert fmt_cos(1.234e-4) == "0.999877"
    assert fmt_cos(0.05) == "0.9500"
    assert fmt_cos(1.5e-9) == "0.99999999850"
    assert fmt_cos(0.0) == "1" and fmt_cos(math.nan) == "–"


def test_steps_default_to_each_models_final_common_step_and_are_checked():
    two = pd.concat([OAT, frame([("n", "std", 1, "flash", 1e-4, 1.0)]).query("step < 8")])
    assert T.default_steps(two) == [4, 8]
    assert T.check_steps(OAT, [8, 4, 8]) == [4, 8]
    with pytest.raises(RetraceError, match="no checkpoint at step"):
        T.check_steps(OAT, [3])
