"""The report's per-segment table: each segment model (``<published>-from<N>``) per data variant at its
end step, with the bit-for-bit count and that segment's own verdict."""

from __future__ import annotations

import pandas as pd

from retrace.report.build import build_report
from retrace.report.segments import segment_table
from retrace.report.verdict import verdicts


def sim_rows() -> pd.DataFrame:
    rows = []
    # two segments of one published run (two layouts each, so the verdict has matched pairs), and a
    # model that is not a segment
    for start, dist in ((1000, {"seed8": 0.0, "seed1234": 3e-3}), (50000, {"seed8": 2e-3, "seed1234": 1e-3})):
        for gas in (1, 2):
            for data, d in dist.items():
                cell = f"p-from{start}__{data}__g{gas}"
                for step in (start, start + 1000):
                    omc = 0.0 if step == start else d * gas if d else 0.0
                    rows.append({"cell": cell, "model": f"p-from{start}", "data": data, "gas": gas, "step": step,
                                 "cos": 1 - omc, "one_minus_cos": omc, "l2": omc * 10})
    for data in ("seed8", "seed1234"):
        rows.append({"cell": f"q__{data}", "model": "q", "data": data, "gas": 1, "step": 4, "cos": 0.9,
                     "one_minus_cos": 0.1, "l2": 1.0})
    return pd.DataFrame(rows)


def test_one_row_per_segment_and_variant_with_its_own_verdict():
    sim = sim_rows()
    t = segment_table(sim, verdicts(sim))
    assert list(zip(t["segment"], t["data"], strict=True)) == [
        ("p-from1000", "seed1234"), ("p-from1000", "seed8"), ("p-from50000", "seed1234"), ("p-from50000", "seed8")]
    assert set(t["published"]) == {"p"} and list(t["end"]) == [2000, 2000, 51000, 51000]
    by = t.set_index(["segment", "data"])
    assert by.loc[("p-from1000", "seed8"), "bitwise"] == 2 and by.loc[("p-from1000", "seed1234"), "bitwise"] == 0
    assert by.loc[("p-from50000", "seed8"), "one_minus_cos"] == (2e-3 + 4e-3) / 2
    # each segment is read on its own: the first lands on seed 8, the second is closer on seed 1234
    assert by.loc[("p-from1000", "seed8"), "closest"] == "seed8"
    assert by.loc[("p-from50000", "seed8"), "closest"] == "seed1234"


def test_the_report_writes_the_segment_table_only_for_segments(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    sim_rows().to_parquet(tables / "similarity.parquet")
    out = build_report(tables, tmp_path / "report", log=lambda _m: None)
    assert (out / "tables" / "segments.csv").is_file()
    assert "p-from50000 | 50000→51000 | seed8 |" in (out / "tables" / "segments.md").read_text()
    assert '<h2 id="segments">Segments</h2>' in (out / "index.html").read_text()

    only = sim_rows()
    only = only[only["model"] == "q"]
    (tables / "similarity.parquet").unlink()
    only.to_parquet(tables / "similarity.parquet")
    out = build_report(tables, tmp_path / "report2", log=lambda _m: None)
    assert not (out / "tables" / "segments.csv").exists()
