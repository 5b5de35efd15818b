"""compare-run → aggregate → report on real files: safetensors checkpoints with planted perturbations.

Two published "models" (5 checkpoints each, a tiny GPT-NeoX-shaped parameter set) and a grid of
reproductions: 2 models × 2 data variants × 4 parallel layouts × 2 attention settings = 32 cells. Each
reproduction is its reference plus noise whose size depends on the data variant (the planted closer
variant has a third of the other's) and grows with gas. The pipeline must name the planted variant
for each model, with 8/8 matched pairs and p = 2 · 0.5^8, and its tables must hold the averages
computed here by hand from the same tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from retrace.cli import main
from retrace.report.aggregate import aggregate
from retrace.report.build import build_report

STEPS = [0, 1, 2, 4, 8]
SHAPES = {
    "gpt_neox.embed_in.weight": (32, 8),
    "gpt_neox.layers.0.input_layernorm.weight": (8,),
    "gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
    "gpt_neox.layers.0.attention.query_key_value.bias": (24,),
    "gpt_neox.layers.0.attention.dense.weight": (8, 8),
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (32, 8),
    "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (8, 32),
    "gpt_neox.final_layer_norm.weight": (8,),
    "embed_out.weight": (32, 8),
}
MODELS = {"mislabel": ("standard", "deduped"), "control": ("deduped", "standard")}  # (planted closer, farther)
LAYOUTS = [(8, 2, 1), (4, 2, 2), (2, 2, 4), (1, 2, 8)]  # gpus, pdbs, gas
ATTENTION = ["flash", "global"]


def _rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16))


def reference_params(model: str, step: int) -> dict[str, torch.Tensor]:
    """Published step: a fixed start plus a drift that grows with the step."""
    out = {}
    for name, shape in SHAPES.items():
        base = torch.randn(shape, generator=_rng(model, name)) * 0.02
        drift = torch.randn(shape, generator=_rng(model, name, "drift")) * 0.002 * step
        out[name] = (base + drift).to(torch.float16)
    return out


def run_params(model: str, data: str, gas: int, attention: str, step: int) -> dict[str, torch.Tensor]:
    """A reproduction: the published step plus noise (none at the start step, exactly like resuming)."""
    closer, _ = MODELS[model]
    sigma = (1e-4 if data == closer else 3e-4) * (1 + 0.5 * np.log2(gas)) * step**0.5
    ref = reference_params(model, step)
    return {
        n: (t.double() + torch.randn(t.shape, generator=_rng(model, data, gas, attention, step, n)) * sigma).to(
            torch.float16
        )
        for n, t in ref.items()
    }


def cell_id(model, data, layout, attention):
    g, p, a = layout
    return f"{model}__{data}__g{g}p{p}a{a}__cpu__{attention}__torch-cpu__s1234__to8__fp16__builtin"


def exact_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """1 − cos and L2 over all parameters flattened, the plain way in float64 (independent of retrace)."""
    x = np.concatenate([a[n].double().numpy().ravel() for n in SHAPES])
    y = np.concatenate([b[n].double().numpy().ravel() for n in SHAPES])
    return 1 - x @ y / np.sqrt((x @ x) * (y @ y)), float(np.sqrt(((x - y) ** 2).sum()))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study directory as the workflow leaves it after training: cells table, references, runs."""
    root = tmp_path_factory.mktemp("study")
    for model in MODELS:
        for step in STEPS:
            path = root / "resources" / "references" / "local" / model / f"step{step}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(reference_params(model, step), str(path))
    rows = []
    for model, data, layout, attention in itertools.product(MODELS, ["standard", "deduped"], LAYOUTS, ATTENTION):
        cell = cell_id(model, data, layout, attention)
        g, p, a = layout
        rows.append({"cell": cell, "model": model, "data": data, "gpus": g, "pdbs": p, "gas": a, "gpu_type": "cpu",
                     "attention": attention, "deps": "torch-cpu", "seed": 1234, "steps": 8, "precision": "fp16",
                     "engine": "builtin"})  # fmt: skip
        ckpt = root / "results" / "runs" / cell / "checkpoints"
        ckpt.mkdir(parents=True)
        files = []
        for step in STEPS:
            save_file(run_params(model, data, a, attention, step), str(ckpt / f"step{step}.safetensors"))
            files.append({"step": step, "file": f"step{step}.safetensors", "sha256": "-"})
        (ckpt / "manifest.json").write_text(json.dumps({"steps": STEPS, "files": files, "final_step": 8}))
        log = pd.DataFrame({"step": [1, 2, 3, 4, 5, 6, 7, 8], "loss": np.linspace(10, 9, 8), "lr": 1e-3})
        log.to_parquet(root / "results" / "runs" / cell / "train_log.parquet")
    pd.DataFrame(rows).to_parquet(root / "results" / "cells.parquet")
    return root


@pytest.fixture(scope="module")
def compared(study: Path) -> Path:
    for cell in pd.read_parquet(study / "results" / "cells.parquet").itertuples():
        run = study / "results" / "runs" / cell.cell
        rc = main([
            "compare-run", "--run", str(run), "--reference", f"./refs/{cell.model}",
            "--reference-dir", str(study / "resources" / "references" / "local" / cell.model),
            "--out", str(run / "similarity.parquet"), "--tensors-out", str(run / "similarity_tensors.parquet"),
        ])  # fmt: skip
        assert rc == 0
    return study


@pytest.fixture(scope="module")
def tables(compared: Path) -> Path:
    out = compared / "results" / "tables"
    assert main(["aggregate", "--cells", str(compared / "results" / "cells.parquet"),
                 "--runs", str(compared / "results" / "runs"), "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def report(tables: Path) -> Path:
    out = tables.parent / "report"
    rc = main(["report", "--tables", str(tables), "--out", str(out), "--steps", "2,8",
               "--documented", "mislabel=deduped", "--documented", "control=deduped"])  # fmt: skip
    assert rc == 0
    return out


def test_compare_run_matches_an_independent_float64_computation(compared: Path, capsys):
    cell = cell_id("mislabel", "deduped", LAYOUTS[2], "global")
    sim = pd.read_parquet(compared / "results" / "runs" / cell / "similarity.parquet")
    assert list(sim.columns[:7]) == ["step", "cos", "one_minus_cos", "l2", "n_params", "norm_a", "norm_b"]
    assert list(sim["step"]) == STEPS
    assert sim["n_params"].unique().tolist() == [sum(int(np.prod(s)) for s in SHAPES.values())]
    for step in STEPS:
        omc, l2 = exact_distance(run_params("mislabel", "deduped", 4, "global", step), reference_params("mislabel", step))
        got = sim.set_index("step").loc[step]
        assert got["one_minus_cos"] == pytest.approx(omc, rel=1e-9, abs=1e-15)
        assert got["l2"] == pytest.approx(l2, rel=1e-12)
    assert sim.set_index("step").loc[0, "one_minus_cos"] == 0.0  # resumed from the published start
    tensors = pd.read_parquet(compared / "results" / "runs" / cell / "similarity_tensors.parquet")
    assert len(tensors) == len(STEPS) * len(SHAPES)
    assert {"step", "tensor", "cos", "l2", "max_abs_diff", "bitwise_equal", "std_ratio"} <= set(tensors.columns)
    assert tensors[tensors["step"] == 0]["bitwise_equal"].all()
    # per-tensor squared L2 adds up to the total
    t8 = tensors[tensors["step"] == 8]
    assert np.sqrt((t8["l2"] ** 2).sum()) == pytest.approx(sim.set_index("step").loc[8, "l2"], rel=1e-12)


def test_compare_run_prints_one_progress_line_per_step(study: Path, tmp_path: Path, capsys):
    run = study / "results" / "runs" / cell_id("control", "standard", LAYOUTS[0], "flash")
    refs = study / "resources" / "references" / "local" / "control"
    assert main(["compare-run", "--run", str(run), "--reference", "x", "--reference-dir", str(refs),
                 "--out", str(tmp_path / "s.parquet")]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("compare-run: step")]
    assert [ln.split()[2] for ln in lines] == [str(s) for s in STEPS]
    assert (tmp_path / "similarity_tensors.parquet").is_file()  # default beside --out


def test_compare_run_errors_name_the_file_and_leave_nothing(study: Path, tmp_path: Path, capsys):
    run = study / "results" / "runs" / cell_id("control", "standard", LAYOUTS[0], "flash")
    empty = tmp_path / "refs"
    empty.mkdir()
    out = tmp_path / "s.parquet"
    assert main(["compare-run", "--run", str(run), "--reference", "x", "--reference-dir", str(empty),
                 "--out", str(out)]) == 2  # fmt: skip
    assert f"{empty / 'step0.safetensors'}: published step 0 of x not fetched" in capsys.readouterr().err
    assert main(["compare-run", "--run", str(tmp_path), "--reference", "x", "--out", str(out)]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [empty]


def test_aggregate_joins_every_cell_with_its_axes(tables: Path, study: Path):
    sim = pd.read_parquet(tables / "similarity.parquet")
    cells = pd.read_parquet(study / "results" / "cells.parquet")
    assert len(sim) == len(cells) * len(STEPS)
    assert list(sim.columns[: len(cells.columns)]) == list(cells.columns)
    joined = sim.merge(cells, on=list(cells.columns), how="left", indicator=True)
    assert (joined["_merge"] == "both").all()
    tensors = pd.read_parquet(tables / "similarity_tensors.parquet")
    assert len(tensors) == len(cells) * len(STEPS) * len(SHAPES) and "gas" in tensors.columns
    log = pd.read_parquet(tables / "train_log.parquet")
    assert len(log) == len(cells) * 8 and {"cell", "attention", "loss"} <= set(log.columns)


def test_verdict_names_the_planted_variant_for_each_model(report: Path):
    verdict = json.loads((report / "verdict.json").read_text())
    by_model = {m["model"]: m for m in verdict["models"]}
    assert by_model["mislabel"]["winner"] == "standard" and by_model["mislabel"]["label_agrees"] is False
    assert by_model["control"]["winner"] == "deduped" and by_model["control"]["label_agrees"] is True
    for m in by_model.values():
        (pw,) = m["against"]
        final = pw["final"]["one_minus_cos"]
        assert (final["wins"], final["losses"], final["ties"], pw["n_pairs"]) == (8, 0, 0, 8)
        assert final["p_value"] == 0.0078125
        assert pw["final"]["l2"]["wins"] == 8
        assert final["mean_margin"] > 0
        assert [s["step"] for s in pw["per_step"]] == [2, 8]
    text = (report / "verdict.txt").read_text()
    assert "Closest variant: standard" in text and "Closest variant: deduped" in text
    assert "p = 0.007812" in text and "DISAGREES" in text


def test_verdict_margin_is_the_mean_over_pairs_computed_by_hand(report: Path):
    verdict = json.loads((report / "verdict.json").read_text())
    (pw,) = next(m for m in verdict["models"] if m["model"] == "mislabel")["against"]
    margins = []
    for layout, attention in itertools.product(LAYOUTS, ATTENTION):
        ref = reference_params("mislabel", 8)
        near, _ = exact_distance(run_params("mislabel", "standard", layout[2], attention, 8), ref)
        far, _ = exact_distance(run_params("mislabel", "deduped", layout[2], attention, 8), ref)
        margins.append(far - near)
    assert pw["final"]["one_minus_cos"]["mean_margin"] == pytest.approx(np.mean(margins), rel=1e-8)


def test_factor_tables_hold_the_hand_computed_averages(report: Path):
    par = pd.read_csv(report / "tables" / "factor_parallel.csv")
    assert list(par.columns[:5]) == ["model", "gas", "pdbs", "gpus", "n"]
    assert len(par) == len(MODELS) * len(LAYOUTS)
    assert list(par[par["model"] == "control"]["gas"]) == [1, 2, 4, 8]
    # full factorial: each (gas, data) entry is the mean over both attention settings
    for gas in (1, 8):
        ref = reference_params("control", 8)
        values = [exact_distance(run_params("control", "standard", gas, att, 8), ref) for att in ATTENTION]
        entry = par[(par["model"] == "control") & (par["gas"] == gas)].iloc[0]
        assert entry["n"] == 2
        assert entry["standard 1-cos @ 8"] == pytest.approx(np.mean([v[0] for v in values]), rel=1e-8)
        assert entry["standard L2 @ 8"] == pytest.approx(np.mean([v[1] for v in values]), rel=1e-10)
        assert entry["standard cos @ 8"] == pytest.approx(1 - np.mean([v[0] for v in values]), rel=1e-12)
    att = pd.read_csv(report / "tables" / "factor_attention.csv")
    assert sorted(att.columns[:3]) == ["attention", "model", "n"] and set(att["n"]) == {4}
    md = (report / "tables" / "factor_parallel.md").read_text()
    assert "| model | gas | pdbs | gpus | n | deduped θ Cos @ 2 | deduped L2 @ 2 |" in md
    assert "mean over the 2 combination(s) of the other axes" in md
    assert (report / "tables" / "factor_parallel.html").read_text().startswith('<table class="factor">')
    final = pd.read_csv(report / "tables" / "cells_final.csv")
    assert len(final) == 32 and set(final["step"]) == {8} and final["last_loss"].eq(9.0).all()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_figures_are_valid_pngs(report: Path):
    names = sorted(p.name for p in (report / "figures").iterdir())
    assert names == sorted(
        f"{kind}_{m}.png" for m in MODELS for kind in ("trajectory", "factor_parallel", "factor_attention", "evidence")
    )
    for name in names:
        w, h = _png_size(report / "figures" / name)
        assert w > 400 and h > 300 and (report / "figures" / name).stat().st_size > 10_000


def test_report_replaces_itself_and_refuses_foreign_directories(tables: Path, tmp_path: Path, capsys):
    small = tmp_path / "small"  # one model, one layout: two figures, so that building twice stays quick
    small.mkdir()
    sim = pd.read_parquet(tables / "similarity.parquet")
    sim[(sim["model"] == "control") & (sim["gas"] == 1)].to_parquet(small / "similarity.parquet")
    out = tmp_path / "report"
    build_report(small, out, log=lambda _: None)
    (out / "stale.txt").write_text("old")
    build_report(small, out, log=lambda _: None)
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "evidence_control.png", "factor_attention_control.png", "trajectory_control.png"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "small"]  # no temporary directory left
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["report", "--tables", str(tables), "--out", str(foreign)]) == 2
    assert "not a retrace report" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert main(["report", "--tables", str(tables), "--out", str(tmp_path / "r2"), "--steps", "3"]) == 2
    assert "no checkpoint at step(s) 3" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    with pytest.raises(SystemExit):
        main(["report", "--tables", str(tables), "--out", str(tmp_path / "r3"), "--steps", "x"])


def test_aggregate_errors_name_the_file_and_write_nothing(study: Path, tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(study / "results" / "runs", runs)
    cells = study / "results" / "cells.parquet"
    victim = runs / cell_id("control", "deduped", LAYOUTS[1], "global") / "train_log.parquet"
    victim.unlink()
    out = tmp_path / "tables"
    assert main(["aggregate", "--cells", str(cells), "--runs", str(runs), "--out", str(out)]) == 2
    assert str(victim) in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    # a cell whose table has other columns than the rest: named, and no table left behind
    pd.DataFrame({"step": [1], "loss": [1.0], "extra": [0]}).to_parquet(victim)
    assert main(["aggregate", "--cells", str(cells), "--runs", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "extra" in err
    assert not any(out.glob("*.parquet"))
    pd.DataFrame({"step": [1], "loss": [1.0], "lr": [1e-3], "gas": [2]}).to_parquet(victim)
    assert main(["aggregate", "--cells", str(cells), "--runs", str(runs), "--out", str(out)]) == 2
    assert "clash" in capsys.readouterr().err


def test_aggregate_rejects_a_bad_cells_table(tmp_path: Path):
    from retrace.errors import RetraceError

    bad = tmp_path / "cells.parquet"
    pd.DataFrame({"cell": ["a", "a"], "model": ["m", "m"]}).to_parquet(bad)
    with pytest.raises(RetraceError, match="duplicate cell id"):
        aggregate(bad, tmp_path, tmp_path / "out", log=lambda _: None)
    pd.DataFrame({"model": ["m"]}).to_parquet(bad)
    with pytest.raises(RetraceError, match="no 'cell' column"):
        aggregate(bad, tmp_path, tmp_path / "out", log=lambda _: None)
    with pytest.raises(RetraceError, match="not found"):
        aggregate(tmp_path / "nope.parquet", tmp_path, tmp_path / "out", log=lambda _: None)


# --------------------------------------------------------------------------- the report in a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]  # fmt: skip


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_index_html_renders_in_headless_chromium(report: Path, tmp_path: Path):
    url = (report / "index.html").resolve().as_uri()
    shot = tmp_path / "index.png"
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", "--window-size=1280,1600", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    w, h = _png_size(shot)
    assert (w, h) == (1280, 1600)
    assert shot.stat().st_size > 50_000  # text, tables and figures: far from a blank page
    dom = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, *profile, "--dump-dom", url],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "Closest variant: standard" in dom and "Closest variant: deduped" in dom
    assert '<b class="winner">standard</b>' in dom and "DISAGREES" in dom
    assert dom.count("data:image/png;base64,") == 8  # 3 per model and an evidence figure each
    assert 'id="factor-parallel"' in dom and "<table" in dom
