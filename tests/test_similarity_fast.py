"""The NumPy/C path of retrace.compare (safetensors files memory-mapped, no torch) against exact arithmetic.

Both kernels — the C one compiled at first use and the NumPy fallback — are checked against the exact
reference of tests/test_similarity.py, against each other within their stated bounds
(retrace.compare.kernel), and through ``retrace compare`` on real files, where torch must not be imported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from retrace.checkpoints import open_params
from retrace.compare import kernel
from retrace.compare.similarity import compare_params, compare_sources
from retrace.errors import RetraceError
from test_similarity import CASES, Exact, U, base, dense_perturbed

ROOT = Path(__file__).resolve().parents[1]
#: the bounds retrace.compare.kernel states for its two paths
C_BOUND = (kernel.BLOCK / 8 + 8 + 2) * U
NUMPY_BOUND = kernel.CHUNK * U
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc"))


@pytest.fixture(params=["c", "numpy"])
def kernel_mode(request, monkeypatch):
    """Each test once with the C kernel (where a compiler exists: then it must build) and once with NumPy."""
    if request.param == "c":
        if not HAS_CC:
            pytest.skip("no C compiler on this machine")
        monkeypatch.delenv(kernel.KERNEL_ENV, raising=False)
        assert kernel.kernel_name() == "c", "a C compiler is here but the kernel did not build"
    else:
        monkeypatch.setenv(kernel.KERNEL_ENV, "numpy")
        assert kernel.kernel_name() == "numpy"
    return request.param


FP_CASES = [c for c in CASES if c[0].startswith(("fp16", "fp32"))]


@pytest.mark.parametrize("case", FP_CASES, ids=[c[0] for c in FP_CASES])
def test_numpy_arrays_match_exact_reference(case, kernel_mode):
    """fp16 down to 1 − cos = 1e-12 (and fp32, NumPy path): relative error ≤ 1e-6, as the torch path."""
    _, a, b, (lo, hi) = case
    ex = Exact([(a, b)])
    ref = ex.one_minus_cos()
    assert lo <= ref <= hi
    r = compare_params({"w": a.numpy()}, {"w": b.numpy()})
    assert abs(r.one_minus_cos - ref) <= 1e-6 * ref
    assert r.l2 == pytest.approx(ex.l2(), rel=1e-12)
    assert r.tensors[0].dtype_a == str(a.dtype).removeprefix("torch.")


@pytest.mark.parametrize("scale", [1.001, 1.1])
def test_fp16_error_bound_when_the_norms_differ(scale, kernel_mode):
    a = base(1 << 16, torch.float16)
    b = dense_perturbed((a.double() * scale).half(), scale * 0.5 * math.sqrt(2e-8), 3)
    ref = Exact([(a, b)]).one_minus_cos()
    r = compare_params({"w": a.numpy()}, {"w": b.numpy()})
    gap = (r.norm_a - r.norm_b) ** 2 / (r.norm_a * r.norm_b)
    assert abs(r.one_minus_cos - ref) <= 3 * NUMPY_BOUND * (ref + gap)


def exact_sums(a: np.ndarray, b: np.ndarray) -> list[Fraction]:
    fa, fb = [Fraction(float(x)) for x in a], [Fraction(float(y)) for y in b]
    return [sum(x * x for x in fa), sum(y * y for y in fb), sum((x - y) ** 2 for x, y in zip(fa, fb, strict=True)),
            sum((x - y) * (x + y) for x, y in zip(fa, fb, strict=True)), sum(fa), sum(fb)]


def awkward_fp16(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal, subnormal and near-overflow fp16 values, and pairs whose difference is not a float32."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 0.02).astype(np.float16)
    b = (a.astype(np.float64) + rng.standard_normal(n) * 1e-4).astype(np.float16)
    k = n // 10
    a[:k] = rng.integers(1, 1024, k).astype(np.float64) * 2.0**-24  # subnormals
    a[k : 2 * k] = rng.choice([-60000.0, 1024.0, 60000.0], k)
    b[k : 2 * k] = 2.0**-24  # 1024 − 2⁻²⁴ needs 35 bits
    return a, b


@pytest.mark.parametrize("n", [1, 7, 8, 9, 511, 513, 2000, 4099])
def test_kernel_sums_are_within_the_stated_bound(n, kernel_mode):
    a, b = awkward_fp16(n, n)
    got = kernel.pair_sums(a, b)
    exact = exact_sums(a, b)
    bound = C_BOUND if kernel_mode == "c" else NUMPY_BOUND
    for k in range(3):  # non-negative sums: relative
        assert abs(Fraction(got[k]) - exact[k]) <= bound * exact[k] + Fraction(2.0**-1074)
    mags = [sum(abs(Fraction(float(x)) - Fraction(float(y))) * abs(Fraction(float(x)) + Fraction(float(y)))
                for x, y in zip(a, b, strict=True))]
    assert abs(Fraction(got[3]) - exact[3]) <= bound * mags[0] + Fraction(2.0**-1074)
    assert got[6] == float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def test_c_and_numpy_agree_within_the_bound_and_on_non_finite_values(monkeypatch):
    if not HAS_CC:
        pytest.skip("no C compiler on this machine")
    a, b = awkward_fp16(100_003, 1)
    monkeypatch.setenv(kernel.KERNEL_ENV, "numpy")
    slow = kernel.pair_sums(a, b)
    monkeypatch.delenv(kernel.KERNEL_ENV)
    fast = kernel.pair_sums(a, b)
    for k in range(3):
        assert fast[k] == pytest.approx(slow[k], rel=C_BOUND + NUMPY_BOUND)
    assert fast[6] == slow[6]
    for x, y in (([1, np.nan, 2], [1, 1, 2]), ([np.inf, 1], [1, 1]), ([np.inf, 1], [np.inf, 1]), ([-np.inf], [1])):
        xa, yb = np.array(x, np.float16), np.array(y, np.float16)
        monkeypatch.setenv(kernel.KERNEL_ENV, "numpy")
        ref = kernel.pair_sums(xa, yb)
        monkeypatch.delenv(kernel.KERNEL_ENV)
        got = kernel.pair_sums(xa, yb)
        assert [repr(v) for v in got] == [repr(v) for v in ref], (x, y)


def test_portable_and_avx2_loops_match_the_native_one(tmp_path, monkeypatch):
    """The scalar loop (built without AVX2/F16C, as on a CPU without them), the AVX2 loop and the native
    build (AVX-512 where the CPU has it) give the same sums within the bound, and the scalar loop converts
    every fp16 bit pattern exactly."""
    if not HAS_CC:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = {"scalar": kernel._build(("-mno-avx2", "-mno-f16c", "-mno-fma")),
              "avx2": kernel._build(("-mno-avx512f",)), "native": kernel._build()}
    assert all(dll is not None for dll in builds.values())
    a, b = awkward_fp16(20_011, 2)
    outs, simd = {}, {}
    for name, dll in builds.items():
        out = np.zeros(7)
        simd[name] = dll.retrace_f16_sums(a.view(np.uint16).ctypes.data, b.view(np.uint16).ctypes.data, a.size,
                                          out.ctypes.data)
        outs[name] = out
    assert simd["scalar"] == 0
    exact = exact_sums(a, b)
    for name, out in outs.items():
        for k in range(3):
            assert abs(Fraction(out[k]) - exact[k]) <= C_BOUND * exact[k], (name, k)
        assert out[6] == outs["scalar"][6]
    every_half = np.arange(1 << 16, dtype=np.uint16)
    want = every_half.view(np.float16).astype(np.float64)
    got = np.array([builds["scalar"].retrace_probe_half(int(h)) for h in every_half])
    assert np.array_equal(want, got, equal_nan=True)


def write_pair(tmp_path: Path, dtype=np.float16) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    a = {"gpt_neox.embed_in.weight": (rng.standard_normal((300, 64)) * 0.02).astype(dtype),
         "gpt_neox.layers.0.attention.dense.bias": np.zeros(64, dtype),
         "gpt_neox.layers.0.attention.bias": np.ones((4, 4), dtype),  # a buffer: not compared
         "embed_out.weight": (rng.standard_normal((300, 64)) * 0.02).astype(dtype)}
    b = dict(a)
    b["embed_out.weight"] = (a["embed_out.weight"].astype(np.float64) + 1e-4 * rng.standard_normal((300, 64))
                             ).astype(dtype)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_numpy(a, str(pa))
    save_numpy(b, str(pb))
    return pa, pb


def test_safetensors_files_give_the_torch_readers_result(tmp_path, kernel_mode):
    pa, pb = write_pair(tmp_path)
    fast = compare_sources(str(pa), str(pb))
    with open_params(pa) as ra, open_params(pb) as rb:
        slow = compare_params(ra, rb)
    assert fast.source_a == slow.source_a == str(pa)
    assert [t.name for t in fast.tensors] == [t.name for t in slow.tensors]
    assert "gpt_neox.layers.0.attention.bias" not in [t.name for t in fast.tensors]
    assert fast.one_minus_cos == pytest.approx(slow.one_minus_cos, rel=1e-9)
    assert fast.l2 == pytest.approx(slow.l2, rel=1e-12)
    for f, s in zip(fast.tensors, slow.tensors, strict=True):
        assert (f.dtype_a, f.bitwise_equal, f.shape, f.numel) == (s.dtype_a, s.bitwise_equal, s.shape, s.numel)
        assert f.max_abs_diff == s.max_abs_diff
        assert (math.isnan(f.cos) and math.isnan(s.cos)) or f.cos == pytest.approx(s.cos, rel=1e-12)


def test_cli_compare_of_two_files_imports_no_torch(tmp_path):
    pa, pb = write_pair(tmp_path)
    code = ("import sys, runpy; sys.argv = ['retrace', 'compare', sys.argv[1], sys.argv[2], '--json'];"
            "from retrace.cli import main; rc = main(sys.argv[1:]);"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, str(pa), str(pb)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stderr
    out = json.loads(r.stdout)
    assert out["n_tensors"] == 3 and out["n_bitwise_equal"] == 2 and out["one_minus_cos"] > 0
    assert list((tmp_path / "cache" / "retrace" / "kernels").glob("similarity-*.so")) or not HAS_CC


def test_without_a_compiler_the_numpy_path_runs(tmp_path):
    pa, pb = write_pair(tmp_path)
    code = ("import sys, json; from retrace.compare import kernel; from retrace.compare.similarity import "
            "compare_sources; r = compare_sources(sys.argv[1], sys.argv[2]);"
            "print(json.dumps([kernel.kernel_name(), r.one_minus_cos, r.l2]))")
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env.update(PATH=str(tmp_path / "empty"), PYTHONPATH=str(ROOT / "workflow"), XDG_CACHE_HOME=str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(pa), str(pb)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    name, omc, l2 = json.loads(r.stdout)
    assert name == "numpy"
    ref = compare_sources(str(pa), str(pb))
    assert omc == pytest.approx(ref.one_minus_cos, rel=1e-9) and l2 == pytest.approx(ref.l2, rel=1e-12)


def test_files_the_numpy_reader_declines_go_through_the_torch_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"embed_out.weight": torch.randn(50, 8, generator=g).bfloat16()}
    b = {"embed_out.weight": (a["embed_out.weight"].float() + 0.01).bfloat16()}
    save_torch(a, tmp_path / "a.safetensors")
    save_torch(b, tmp_path / "b.safetensors")
    r = compare_sources(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert r.tensors[0].dtype_a == "bfloat16"
    ex = Exact([(a["embed_out.weight"], b["embed_out.weight"])])
    assert abs(r.one_minus_cos - ex.one_minus_cos()) <= 1e-6 * ex.one_minus_cos()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((tmp_path / "a.safetensors").read_bytes()[:-7])
    with pytest.raises(RetraceError, match="not a readable safetensors file"):
        compare_sources(str(bad), str(tmp_path / "b.safetensors"))


def test_kernel_is_only_loaded_from_a_private_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not kernel._private(shared)  # anyone could plant a library there
    shared.chmod(0o700)
    assert kernel._private(shared)
