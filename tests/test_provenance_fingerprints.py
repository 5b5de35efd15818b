"""Per-step fingerprints (retrace.train.fingerprints) in real training runs, and `retrace diverge`.

The batch hash must be the same at every step for every gpus × pdbs × gas layout of one global batch
(simulated ranks, real 2-process gloo ranks), equal to `retrace batch --hash` computed from the data
alone, and differ on other data. The weight checksum is checked against an independent numpy replay of
its documented formula, and against the checkpoints themselves: where two runs' checksums agree their
saved weights are bitwise equal, and where `retrace diverge` says they part, the saved weights differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from retrace.cli import main
from retrace.compare.diverge import diverge
from retrace.train import TrainConfig, train
from retrace.train.fingerprints import CHUNK, param_fingerprint
from test_train_helpers import SEQ, B, load_ckpt, make_data

STEPS = 6


def numpy_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """The documented formula, replayed with numpy and Python integers (no torch arithmetic)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        t = params[name]
        words = t.contiguous().reshape(-1).numpy().view(np.uint16).astype(np.int64)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        for start in range(0, len(words), CHUNK):
            x = words[start:start + CHUNK]
            s1 = int(x.sum())
            s2 = int((x * np.arange(1, len(x) + 1, dtype=np.int64)).sum())  # < 2^56: exact
            h.update(np.array([s1, s2], dtype="<i8").tobytes())
    return h.hexdigest()


def test_param_fingerprint_formula_and_sensitivity():
    g = torch.Generator().manual_seed(0)
    params = {"b.weight": torch.randn(3000, generator=g).half(), "a.bias": torch.randn(7, generator=g),
              "c.big": torch.randn(CHUNK + 5, generator=g).half()}
    assert param_fingerprint(params.items()) == numpy_fingerprint(params)  # two chunks in c.big
    fp = param_fingerprint(params.items())
    assert fp == param_fingerprint(reversed(list(params.items())))  # by name, not by order given
    flipped = {k: v.clone() for k, v in params.items()}
    flipped["c.big"].view(torch.int16)[CHUNK + 2] ^= 1  # one bit, in the second chunk
    assert param_fingerprint(flipped.items()) != fp
    swapped = {k: v.clone() for k, v in params.items()}
    w = swapped["b.weight"]
    w[0], w[1] = params["b.weight"][1], params["b.weight"][0]  # same values, other places
    assert w[0] != w[1] and param_fingerprint(swapped.items()) != fp


@pytest.fixture(scope="module")
def runs(world):
    make_data(world / "data" / "other", SEQ, 40 * B, seed=1)
    cfgs = {"1x8x1": (1, 8, 1, {}), "1x8x1-again": (1, 8, 1, {}), "1x4x2": (1, 4, 2, {}),
            "2x2x2-sim": (2, 2, 2, {"simulate_ranks": True}), "2x4x1": (2, 4, 1, {}),
            "other-data": (1, 8, 1, {"data": str(world / "data" / "other")})}
    out = {}
    for name, (gpus, pdbs, gas, over) in cfgs.items():
        kw = dict(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / name),
                  steps=STEPS, recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, gpus=gpus,
                  pdbs=pdbs, gas=gas, precision="fp16", threads=1, progress=False, save_steps=[1, 2, 3, 4, 5, 6])
        kw.update(over)
        train(TrainConfig(**kw))
        out[name] = world / name
    return out


def log(run):
    return pd.read_parquet(run / "train_log.parquet").set_index("step")


@pytest.mark.slow
def test_batch_hash_same_for_every_layout_and_equals_retrace_batch(runs, world, capsys):
    base = log(runs["1x8x1"])
    assert list(base.index) == list(range(1, STEPS + 1))
    assert base["batch_hash"].nunique() == STEPS  # every step its own batch
    for name in ("1x4x2", "2x2x2-sim", "2x4x1"):
        assert list(log(runs[name])["batch_hash"]) == list(base["batch_hash"]), name
    for step in range(STEPS):  # the same value from the data alone
        assert main(["batch", "--data", str(world / "data" / "tiny"), "--kind", "preshuffled",
                     "--seq-length", str(SEQ), "--global-batch", str(B), "--step", str(step), "--hash"]) == 0
        line = capsys.readouterr().out.strip()
        assert line == f"step {step} items {B * step}..{B * step + B - 1} batch_hash {base.loc[step + 1, 'batch_hash']}"
    other = log(runs["other-data"])
    assert (other["batch_hash"] != base["batch_hash"]).all()


@pytest.mark.slow
def test_param_fingerprints_match_the_checkpoints(runs):
    for name, run in runs.items():
        frame = log(run)
        for step in frame.index:
            assert frame.loc[step, "param_fp"] == param_fingerprint(load_ckpt(run / "checkpoints" / f"step{step}.safetensors").items()), (name, step)


@pytest.mark.slow
def test_diverge_agrees_with_the_checkpoints(runs, capsys):
    same = diverge(runs["1x8x1"], runs["1x8x1-again"])
    assert same.first_param is None and same.first_batch is None and same.last_common == STEPS
    for name in ("1x4x2", "2x2x2-sim", "2x4x1", "other-data"):
        d = diverge(runs["1x8x1"], runs[name])
        assert (d.first_batch is not None) == (name == "other-data")
        for step in range(1, STEPS + 1):  # the verdict, checked against the saved weights bit for bit
            a = load_ckpt(runs["1x8x1"] / "checkpoints" / f"step{step}.safetensors")
            b = load_ckpt(runs[name] / "checkpoints" / f"step{step}.safetensors")
            equal = all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
            assert equal == (d.first_param is None or step < d.first_param), (name, step)
    assert main(["diverge", str(runs["1x8x1"]), str(runs["other-data"])]) == 0
    out = capsys.readouterr().out
    assert "first divergent step: 1" in out or "first divergent step: 2" in out
    assert "batches differ from step 1" in out


@pytest.mark.slow
def test_divergence_table_and_cells_command(runs, tmp_path, capsys):
    """The report's table: each cell against its baseline cell, from the train logs real runs wrote."""
    import shutil

    from retrace import paths
    from retrace.grid import load_study
    from retrace.report.provenance import divergence_frame, factor_summary, html_fragment
    from study_factory import synthetic_study

    models = {"m": {"reference": "org/m", "global_batch": B, "recipe": "70m"}}
    layouts = [{"gpus": 1, "pdbs": 8, "gas": 1}, {"gpus": 1, "pdbs": 4, "gas": 2}, {"gpus": 2, "pdbs": 4, "gas": 1}]
    cfg = synthetic_study(models=models, parallel=layouts, steps=[STEPS])
    cfg.update(design="one_at_a_time", cross=["model", "data"])
    study = load_study(cfg, root=".")
    source = {(1, 8, 1): "1x8x1", (1, 4, 2): "1x4x2", (2, 4, 1): "2x4x1"}
    for cell in study.cells():
        lay = (cell.parallel.gpus, cell.parallel.pdbs, cell.parallel.gas)
        name = "other-data" if cell.data.name == "standard-raw" else source[lay]
        if cell.data.name == "standard-raw" and lay != (1, 4, 2):
            continue  # not trained (its baseline neither): left out of the table
        run = tmp_path / paths.run_dir(cell.id)
        run.mkdir(parents=True)
        shutil.copy(runs[name] / "train_log.parquet", run / "train_log.parquet")
    div = divergence_frame(study, tmp_path).set_index("cell")
    assert len(div) == 4
    for cell in study.cells():
        if cell.id not in div.index:
            continue
        if cell.data.name == "standard-raw":  # its baseline has no train log: nothing to say
            assert pd.isna(div.loc[cell.id, "last_step"]) and pd.isna(div.loc[cell.id, "diverges_from_baseline"])
            continue
        row = div.loc[cell.id]
        lay = (cell.parallel.gpus, cell.parallel.pdbs, cell.parallel.gas)
        if lay == (1, 8, 1):
            assert row["factor"] == "baseline" and row["baseline"] == cell.id
            assert pd.isna(row["diverges_from_baseline"]) and pd.isna(row["batches_differ_from_baseline"])
        else:
            assert row["factor"] == "parallel"
            expected = diverge(runs[source[lay]], runs["1x8x1"]).first_param
            got = row["diverges_from_baseline"]
            assert (pd.isna(got) and expected is None) or got == expected
            assert pd.isna(row["batches_differ_from_baseline"])
        assert pd.isna(row["diverges_from_reference"])  # a Hub reference: no train log here
    summary = factor_summary(div.reset_index())
    assert list(summary.columns[:2]) == ["factor", "value"] and len(summary) == 3
    assert "no baseline log" in set(summary.iloc[:, 2:].to_numpy().ravel())
    assert "Every cell trained on exactly its baseline cell" in html_fragment(div.reset_index(), None)
    import yaml

    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["cells", "--configfile", str(cfg_path), "-d", str(tmp_path)]) == 0
    lines = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")}
    for cell_id, row in div.iterrows():
        if row["factor"] == "baseline" or pd.isna(row["last_step"]):
            assert "[" not in lines[cell_id]  # no reference / baseline train log to compare with
        elif pd.isna(row["diverges_from_baseline"]):
            assert f"[bit-identical to the baseline through step {STEPS}]" in lines[cell_id]
        else:
            assert f"[diverges from the baseline at step {int(row['diverges_from_baseline'])}]" in lines[cell_id]


@pytest.mark.slow
def test_benchmark_smoke_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "fingerprints.py"), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(root / "workflow")})
    assert done.returncode == 0, done.stderr
    assert "x the step" in done.stdout and "weight checksum (param_fp)" in done.stdout


def test_replica_and_reanchored_cells_are_named_by_their_own_axis():
    """In the embedded study the replica and the re-anchored baseline are not "baseline" rows: the
    divergence table names the axis that sets them apart."""
    from retrace.grid import load_study
    from retrace.report.provenance import _factor, baseline_of

    root = Path(__file__).resolve().parents[1]
    study = load_study(root / "config.yaml", root=root)
    factors = {c.id: _factor(c, baseline_of(study, c)) for c in study.cells()}
    replicas = [c.id for c in study.cells() if c.replica]
    anchored = [c.id for c in study.cells() if c.reanchor]
    assert replicas and anchored
    assert all(factors[i] == ("replica", "1") for i in replicas)
    assert all(factors[i] == ("reanchor", "True") for i in anchored)


def test_a_steps_exchange_packs_to_one_size_per_rank_and_back():
    """The trainer's one all_gather per step: every rank's part is pdbs·gas entries of one size, and
    unpacking gives back the loss, the stop signal and each sample's digest at its batch position."""
    from retrace.data.batch_hash import sample_digest
    from retrace.train.fingerprints import pack, unpack

    rng = np.random.default_rng(0)
    parts = []
    for rank in range(3):
        digests = {pos: sample_digest(rng.integers(0, 512, size=16)) for pos in (rank, rank + 3)}
        part = pack([1.5 + rank, float(rank == 2) * 15], digests)
        values, back = unpack(part, 2)
        assert values == [1.5 + rank, float(rank == 2) * 15] and back == digests
        parts.append(part)
    assert len({p.size for p in parts}) == 1 and parts[0].dtype == np.uint8
