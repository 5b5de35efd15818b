"""``retrace compare A B`` on real checkpoint files: table, --json, --parquet, --top, --intersection, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from retrace.checkpoints import save_params
from retrace.cli import main
from retrace.compare.similarity import TENSOR_COLUMNS, compare_sources

EMB, OUT, BIAS, LN = (
    "gpt_neox.embed_in.weight",
    "embed_out.weight",
    "gpt_neox.layers.0.attention.dense.bias",
    "gpt_neox.final_layer_norm.weight",
)


@pytest.fixture()
def ckpts(tmp_path):
    """a: three tensors; b: embed_out moved, the rest identical; c: other names than a."""
    g = torch.Generator().manual_seed(0)
    a = {
        EMB: (torch.randn(100, 16, generator=g) * 0.02).half(),
        BIAS: torch.zeros(16, dtype=torch.float16),
        OUT: (torch.randn(100, 16, generator=g) * 0.02).half(),
    }
    b = dict(a)
    b[OUT] = (a[OUT].float() + 1e-3 * torch.randn(100, 16, generator=g)).half()
    c = {EMB: a[EMB], OUT: a[OUT].reshape(16, 100).clone(), LN: torch.ones(16)}
    paths = {}
    for key, params in (("a", a), ("b", b), ("c", c)):
        paths[key] = tmp_path / f"{key}.safetensors"
        save_file(params, paths[key])
    # The same as b, through the project's writer and as a Hugging Face directory.
    save_params(b, tmp_path / "hf_b" / "model.safetensors")
    paths["hf_b"] = tmp_path / "hf_b"
    return paths


def run_cli(capsys, *argv):
    rc = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table(ckpts, capsys):
    rc, out, err = run_cli(capsys, ckpts["a"], ckpts["b"])
    assert rc == 0, err
    expected = compare_sources(str(ckpts["a"]), str(ckpts["b"]))
    lines = out.splitlines()
    assert f"1 − θ Cos    {expected.one_minus_cos:.6e}" in lines
    assert f"θ Cos        {expected.cos:.15f}" in lines
    assert f"L2           {expected.l2:.6e}" in lines
    assert any(line.startswith("n_params     3,216 in 3 tensors (2 bitwise equal)") for line in lines)
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("gpt_neox.", "embed_out"))}
    assert list(rows) == [EMB, BIAS, OUT]  # all tensors, in A's order
    assert rows[EMB][2] == "0.000e+00" and rows[EMB][5] == "yes"
    assert rows[BIAS][2] == "nan"  # zero tensor: undefined cos
    assert rows[OUT][5] == "no" and float(rows[OUT][2]) > 0


def test_top_sorts_most_different_first(ckpts, capsys):
    rc, out, _ = run_cli(capsys, ckpts["a"], ckpts["b"], "--top", "2")
    assert rc == 0
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("gpt_neox.", "embed_out"))]
    assert rows == [OUT, EMB]  # NaN (the zero bias) sorts last
    rc, out, _ = run_cli(capsys, ckpts["a"], ckpts["b"], "--top", "1", "--sort", "max_abs_diff")
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("gpt_neox.", "embed_out"))] == [OUT]


def test_json(ckpts, capsys):
    rc, out, _ = run_cli(capsys, ckpts["a"], ckpts["hf_b"], "--json")
    assert rc == 0
    d = json.loads(out)
    expected = compare_sources(str(ckpts["a"]), str(ckpts["b"]))
    for key in ("cos", "one_minus_cos", "l2", "n_params", "norm_a", "norm_b", "max_abs_diff"):
        assert d[key] == getattr(expected, key)
    assert [t["name"] for t in d["tensors"]] == [EMB, BIAS, OUT]
    bias = d["tensors"][1]
    assert bias["cos"] is None and bias["bitwise_equal"] is True and bias["numel"] == 16
    assert set(TENSOR_COLUMNS) <= set(d["tensors"][2])


def test_parquet(ckpts, tmp_path, capsys):
    path = tmp_path / "out" / "sim.parquet"
    rc, out, _ = run_cli(capsys, ckpts["a"], ckpts["b"], "--parquet", path, "--quiet")
    assert rc == 0 and out == ""
    frame = pd.read_parquet(path)
    assert list(frame.columns) == TENSOR_COLUMNS and list(frame["name"]) == [EMB, BIAS, OUT]
    expected = compare_sources(str(ckpts["a"]), str(ckpts["b"]))
    totals = frame.attrs["similarity"]
    assert totals["one_minus_cos"] == expected.one_minus_cos and totals["n_params"] == 3216
    assert frame.loc[2, "one_minus_cos"] == expected.tensors[2].one_minus_cos
    assert math.isnan(frame.loc[1, "cos"]) and frame["bitwise_equal"].tolist() == [True, True, False]
    assert b"PANDAS_ATTRS" in pq.read_schema(path).metadata
    assert [p.name for p in path.parent.iterdir()] == ["sim.parquet"]  # no temporary left behind


def test_mismatch_is_one_line_exit_2_and_intersection_compares_the_rest(ckpts, capsys, tmp_path):
    rc, out, err = run_cli(capsys, ckpts["a"], ckpts["c"], "--parquet", tmp_path / "x.parquet")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("retrace compare: error: ")
    assert f"only in A (1): {BIAS}" in err and f"only in B (1): {LN}" in err
    assert f"shape mismatch (1): {OUT} [100, 16] vs [16, 100]" in err
    assert not (tmp_path / "x.parquet").exists()

    rc, out, err = run_cli(capsys, ckpts["a"], ckpts["c"], "--intersection", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert [t["name"] for t in d["tensors"]] == [EMB] and d["n_params"] == 1600 and d["one_minus_cos"] == 0.0
    assert d["skipped"] == {"only_in_a": [BIAS], "only_in_b": [LN], "shape_mismatch": {OUT: [[100, 16], [16, 100]]}}
    rc, out, _ = run_cli(capsys, ckpts["a"], ckpts["c"], "--intersection")
    assert f"skipped, only in A (1): {BIAS}" in out and f"skipped, only in B (1): {LN}" in out


def test_missing_file_and_subprocess_entry_point(ckpts, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "retrace", "compare", str(ckpts["a"]), str(tmp_path / "nope.safetensors")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "nope.safetensors" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "retrace", "compare", str(ckpts["a"]), str(ckpts["a"]), "--json"],
        capture_output=True, text=True, check=True,
    )
    d = json.loads(proc.stdout)
    assert d["one_minus_cos"] == 0.0 and d["cos"] == 1.0 and d["n_bitwise_equal"] == 3


def _tiny_init(tmp_path, name, seed, init="small_wang"):
    from retrace.model import GPTNeoX, ModelConfig, init_weights

    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=256, seq_len=32, init=init)
    model = init_weights(GPTNeoX(cfg), seed)
    path = tmp_path / f"{name}.safetensors"
    save_params(model.state_dict(), path)
    return path


def test_forensics_reads_two_seeds_as_same_scheme_other_rng(tmp_path, capsys):
    a, b = _tiny_init(tmp_path, "a", 1), _tiny_init(tmp_path, "b", 2)
    rc, out, err = run_cli(capsys, a, b, "--forensics")
    assert rc == 0, err
    assert "reading: same init scheme, different RNG" in out
    rc, out, err = run_cli(capsys, a, b, "--forensics", "--json")
    payload = json.loads(out)
    assert payload["forensics"]["reading"] == "same init scheme, different RNG"
    assert payload["forensics"]["scheme_differs"] == []


def test_forensics_names_a_different_scheme(tmp_path, capsys):
    a = _tiny_init(tmp_path, "a", 1)
    b = _tiny_init(tmp_path, "b", 2, init="normal_scaled")
    rc, out, err = run_cli(capsys, a, b, "--forensics", "--json")
    assert rc == 0, err
    forensics = json.loads(out)["forensics"]
    assert forensics["reading"] == "different scheme"
    assert forensics["scheme_differs"], forensics


def test_compare_run_imports_no_torch():
    """A compare job reads, hashes and compares with NumPy: importing torch (via the audit gate's file names
    or the seal check) cost each of a study's compare jobs 2 s of its 3.4."""
    code = ("import sys; import retrace.commands.compare_run, retrace.compare.run, retrace.audit.gate, "
            "retrace.checkpoints.seal; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
