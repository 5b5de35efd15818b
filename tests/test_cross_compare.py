"""retrace.compare.cross / `retrace cross-compare`: a model's checkpoints against other repos at the same steps.

Fixture repos live in a real huggingface_hub cache (publish_to_hub_cache), read offline:

* fix/model        steps 0, 1000, 2000
* fix/gen-same     step 1000 = the model's file byte for byte; step 2000 perturbed; no step 0
* fix/gen-other    steps 0, 1000, 2000, every tensor perturbed (another run)

θ Cos and L2 are checked against an independent float64 NumPy computation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from retrace.checkpoints import publish_to_hub_cache, save_params
from retrace.cli import main
from retrace.compare.cross import COLUMNS, cross_compare
from retrace.errors import RetraceError
from retrace.report.build import build_report
from retrace.report.generations import render_wide, to_markdown

NAMES = {"gpt_neox.embed_in.weight": (16, 8), "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": (32,),
         "embed_out.weight": (16, 8)}
CONFIG = {"config.json": b'{"model_type": "gpt_neox"}'}
STEPS = [0, 1000, 2000]


def params(seed: int, scale: float = 0.0, noise_seed: int = 99) -> dict[str, torch.Tensor]:
    g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(noise_seed)
    return {n: (torch.randn(s, generator=g) * 0.05 + scale * torch.randn(s, generator=h)).half()
            for n, s in NAMES.items()}


def exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    x = np.concatenate([a[n].double().numpy().ravel() for n in NAMES])
    y = np.concatenate([b[n].double().numpy().ravel() for n in NAMES])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))), float(np.linalg.norm(x - y))


MODEL = {s: params(s) for s in STEPS}
SAME = {2000: params(2000, 1e-3)}
OTHER = {s: params(s, 1e-2, noise_seed=7 + s) for s in STEPS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    cache = root / "hub"
    for step in STEPS:
        model_file = save_params(MODEL[step], root / f"model{step}" / "model.safetensors")
        publish_to_hub_cache(cache, "fix/model", f"step{step}", {**CONFIG, "model.safetensors": model_file})
        other_file = save_params(OTHER[step], root / f"other{step}" / "model.safetensors")
        publish_to_hub_cache(cache, "fix/gen-other", f"step{step}", {**CONFIG, "model.safetensors": other_file})
        if step == 1000:  # the very same file
            publish_to_hub_cache(cache, "fix/gen-same", "step1000", {**CONFIG, "model.safetensors": model_file})
        elif step in SAME:
            same_file = save_params(SAME[step], root / f"same{step}" / "model.safetensors")
            publish_to_hub_cache(cache, "fix/gen-same", f"step{step}", {**CONFIG, "model.safetensors": same_file})
    return cache


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def table(cache) -> pd.DataFrame:
    import os

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        calls = []
        frame = cross_compare("fix/model", ["fix/gen-same", "fix/gen-other"], [2000, 0, 1000], cache_dir=cache,
                              progress=lambda *a: calls.append(a))
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    assert [c[2:] for c in calls] == [(i, 6) for i in range(6)]
    return frame


def test_rows_columns_and_order(table):
    assert list(table.columns) == list(COLUMNS)
    assert list(zip(table["other"], table["step"], strict=True)) == [
        ("fix/gen-same", 0), ("fix/gen-same", 1000), ("fix/gen-same", 2000),
        ("fix/gen-other", 0), ("fix/gen-other", 1000), ("fix/gen-other", 2000)]
    assert set(table["model"]) == {"fix/model"}


def test_identical_step_is_cos_one_and_bitwise_equal(table):
    row = table[(table["other"] == "fix/gen-same") & (table["step"] == 1000)].iloc[0]
    assert row["status"] == "ok"
    assert row["cos"] == 1.0 and row["one_minus_cos"] == 0.0 and row["l2"] == 0.0
    assert row["bitwise_equal_tensors"] == row["n_tensors"] == len(NAMES)
    assert row["n_params"] == sum(math.prod(s) for s in NAMES.values())


@pytest.mark.parametrize(("other", "step", "ref"), [
    ("fix/gen-same", 2000, SAME[2000]),
    ("fix/gen-other", 0, OTHER[0]), ("fix/gen-other", 1000, OTHER[1000]), ("fix/gen-other", 2000, OTHER[2000]),
])  # fmt: skip
def test_perturbed_steps_match_an_independent_float64_computation(table, other, step, ref):
    row = table[(table["other"] == other) & (table["step"] == step)].iloc[0]
    cos, l2 = exact(MODEL[step], ref)
    assert row["status"] == "ok"
    assert row["cos"] < 1.0
    assert row["cos"] == pytest.approx(cos, abs=1e-12)
    assert row["one_minus_cos"] == pytest.approx(1 - cos, rel=1e-6)
    assert row["l2"] == pytest.approx(l2, rel=1e-12)
    assert row["bitwise_equal_tensors"] < row["n_tensors"]


def test_missing_step_is_recorded_not_fatal(table):
    row = table[(table["other"] == "fix/gen-same") & (table["step"] == 0)].iloc[0]
    assert row["status"].startswith("missing: ") and "fix/gen-same@step0" in row["status"]
    assert math.isnan(row["cos"]) and math.isnan(row["l2"]) and row["n_tensors"] == 0


def test_missing_model_side_is_recorded_too(cache):
    frame = cross_compare("fix/gen-same", ["fix/model"], [0, 1000], cache_dir=cache)
    assert frame["status"].tolist()[0].startswith("missing: ") and frame["status"].tolist()[1] == "ok"


def test_other_errors_are_not_swallowed(cache, tmp_path):
    bad = tmp_path / "bad"
    save_params({"x.weight": torch.zeros(2)}, bad / "model.safetensors")
    publish_to_hub_cache(cache, "fix/bad-shape", "step1000",
                         {**CONFIG, "model.safetensors": bad / "model.safetensors"})
    with pytest.raises(RetraceError, match="only in"):
        cross_compare("fix/model", ["fix/bad-shape"], [1000], cache_dir=cache)


def test_wide_table_has_one_row_per_step_and_cos_l2_per_repo(table):
    wide = render_wide(table)
    assert list(wide.columns) == ["step", "θ Cos vs fix/gen-same", "L2 vs fix/gen-same",
                                  "θ Cos vs fix/gen-other", "L2 vs fix/gen-other"]
    assert wide["step"].tolist() == [0, 1000, 2000]
    assert wide.iloc[0, 1] == "missing" and wide.iloc[1, 1] == "1" and wide.iloc[1, 2] == "0"
    md = to_markdown(table)
    assert md.startswith("| step | θ Cos vs fix/gen-same |") and "1 comparison(s) missing" in md


def test_cli_writes_parquet_and_markdown(cache, tmp_path, capsys):
    out, md = tmp_path / "o" / "cross.parquet", tmp_path / "o" / "cross.md"
    rc = main(["cross-compare", "fix/model", "--against", "fix/gen-same", "fix/gen-other", "--steps", "0,1000",
               "--cache-dir", str(cache), "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    frame = pd.read_parquet(out)
    assert len(frame) == 4 and (frame["status"] == "ok").sum() == 3
    assert "| 1000 | 1 | 0 |" in md.read_text(encoding="utf-8")
    assert "3/4 comparisons, 1 missing" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["cross.md", "cross.parquet"]  # no temporaries


def _similarity(tables):
    rows = []
    for data, omc in (("std", 1e-4), ("dd", 1e-3)):
        for step in (0, 8):
            rows.append({"cell": f"m__{data}", "model": "m", "data": data, "step": step, "cos": 1 - omc * step,
                         "one_minus_cos": omc * step, "l2": float(step), "n_params": 10, "norm_a": 1.0,
                         "norm_b": 1.0, "max_abs_diff": 0.1})
    tables.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tables / "similarity.parquet")


def test_report_renders_the_section_only_with_the_table(table, tmp_path):
    tables = tmp_path / "tables"
    _similarity(tables)
    out = build_report(tables, tmp_path / "report", log=lambda _: None)
    assert "Versus other generations" not in (out / "index.html").read_text(encoding="utf-8")
    assert not (out / "tables" / "cross_generation.csv").exists()

    table.to_parquet(tables / "cross_generation.parquet")
    assert main(["report", "--tables", str(tables), "--out", str(tmp_path / "report")]) == 0
    index = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert '<h2 id="cross-generation">Versus other generations</h2>' in index
    assert "θ Cos vs fix/gen-other" in index and "<td>missing</td>" in index
    assert len(pd.read_csv(tmp_path / "report" / "tables" / "cross_generation.csv")) == 6
    md = (tmp_path / "report" / "tables" / "cross_generation.md").read_text(encoding="utf-8")
    assert md.startswith("### Versus other generations") and "| 1000 | 1 | 0 |" in md
