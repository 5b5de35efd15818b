"""retrace.compare.similarity against exact rational arithmetic, and its edge cases.

The exact reference turns every stored float (fp16, bf16, fp32, fp64 values of tests) into the integer
``value · 2¹⁴⁹`` — all of them are integer multiples of 2⁻¹⁴⁹ — so Σa², Σb², Σab and Σ(a−b)² are exact
Python integers and 1 − cos is evaluated from them with mpmath at 2000 bits.
"""

from __future__ import annotations

import json
import math
import operator

import mpmath
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retrace.checkpoints import DictReader, open_params
from retrace.compare.similarity import (
    CHUNK,
    TASK,
    TENSOR_COLUMNS,
    SimilarityResult,
    _Workspace,
    compare_params,
    compare_sources,
    one_minus_cos_from_sums,
    tensor_sums,
)
from retrace.errors import RetraceError

SCALE = 149  # every fp16/bf16/fp32 value is an integer multiple of 2**-149


def exact_ints(t: torch.Tensor) -> list[int]:
    """Each element's exact value times 2**SCALE, as a Python int (float64-representable inputs)."""
    v = t.detach().to(torch.float64).reshape(-1).numpy()
    assert np.isfinite(v).all()
    m, e = np.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1; fp32 values have 24-bit m
    mi = (m * 2.0**53).astype(np.int64).tolist()  # exact
    out = []
    for mant, exp in zip(mi, e.tolist(), strict=True):
        shift = exp - 53 + SCALE
        if shift >= 0:
            out.append(mant << shift)
        else:
            assert mant % (1 << -shift) == 0, "value not a multiple of 2**-149"
            out.append(mant >> -shift)
    return out


class Exact:
    """Exact sums over the concatenation of several tensor pairs."""

    def __init__(self, pairs):
        xa, xb = [], []
        for a, b in pairs:
            xa += exact_ints(a)
            xb += exact_ints(b)
        self.saa = sum(map(operator.mul, xa, xa))
        self.sbb = sum(map(operator.mul, xb, xb))
        self.sab = sum(map(operator.mul, xa, xb))
        diff = list(map(operator.sub, xa, xb))
        self.sdd = sum(map(operator.mul, diff, diff))
        assert self.sdd == self.saa + self.sbb - 2 * self.sab

    def one_minus_cos(self) -> float:
        with mpmath.workprec(2000):
            return float(1 - mpmath.mpf(self.sab) / mpmath.sqrt(mpmath.mpf(self.saa) * mpmath.mpf(self.sbb)))

    def l2(self) -> float:
        with mpmath.workprec(2000):
            return float(mpmath.sqrt(mpmath.mpf(self.sdd)) / mpmath.mpf(2) ** SCALE)


def ulp_perturbed(a: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """``a`` with ``m`` random elements moved one ulp up (in a's own dtype)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(a.numel(), generator=g)[:m]
    b = a.clone().reshape(-1)
    b[idx] = torch.nextafter(b[idx], torch.full_like(b[idx], math.inf))
    return b.reshape(a.shape)


def dense_perturbed(a: torch.Tensor, sigma: float, seed: int, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(a.shape, generator=g, dtype=torch.float64) * sigma
    return (a.to(torch.float64) + noise).to(dtype or a.dtype)


def base(n: int, dtype: torch.dtype, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


# (id, a, b, expected range of the exact 1 - cos): near-identical vectors from 1e-4 down to ~1e-12.
def _cases():
    n = 1 << 18
    a16 = base(n, torch.float16)
    a32 = base(1 << 16, torch.float32)
    abf = base(n, torch.bfloat16)
    return [
        ("fp16-1e-4", a16, dense_perturbed(a16, 0.5 * math.sqrt(2e-4), 1), (3e-5, 3e-4)),
        ("fp16-1e-8", a16, ulp_perturbed(a16, 4000, 2), (1e-9, 1e-7)),
        ("fp16-1e-10", a16, ulp_perturbed(a16, 80, 3), (1e-11, 1e-9)),
        ("fp16-1e-12", a16, ulp_perturbed(a16, 1, 4), (1e-13, 2e-12)),
        ("fp32-1e-6", a32, dense_perturbed(a32, 0.5 * math.sqrt(2e-6), 5), (3e-7, 3e-6)),
        ("fp32-1e-12", a32, dense_perturbed(a32, 0.5 * math.sqrt(2e-12), 6), (3e-13, 3e-12)),
        ("fp32-1e-16", a32, ulp_perturbed(a32, 3000, 7), (3e-17, 1e-15)),
        ("bf16-1e-10", abf, ulp_perturbed(abf, 2, 8), (1e-12, 1e-9)),
        ("fp16-vs-fp32-1e-12", a16, dense_perturbed(a16, 0.5 * math.sqrt(2e-12), 9, torch.float32), (3e-13, 3e-12)),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_minus_cos_matches_exact_reference(case):
    _, a, b, (lo, hi) = case
    ex = Exact([(a, b)])
    ref = ex.one_minus_cos()
    assert lo <= ref <= hi, f"case does not test the intended regime: exact 1 - cos = {ref:.3e}"
    r = compare_params({"w": a}, {"w": b})
    assert abs(r.one_minus_cos - ref) <= 1e-6 * ref
    assert r.tensors[0].one_minus_cos == r.one_minus_cos
    assert r.cos == 1.0 - r.one_minus_cos
    assert abs(r.cos - (1.0 - ref)) <= 2.3e-16
    assert r.l2 == pytest.approx(ex.l2(), rel=1e-12)
    assert not r.tensors[0].bitwise_equal


#: The unit roundoff of float64.
U = 2.0**-53


def sum_bound(m: int) -> float:
    """The relative error bound of a float64 sum of ``m`` non-negative terms in any summation order
    ((m − 1)·u, Higham §4.2), plus one rounding for combining chunk sums with fsum: what the code
    guarantees on every CPU, whatever order its BLAS adds in."""
    return (max(m, 1) - 1) * U / (1 - m * U) + U


@pytest.mark.parametrize("scale", [1.001, 1.1, 2.0])
@pytest.mark.parametrize("target", [1e-8, 1e-12])
def test_error_bound_when_the_norms_differ(scale, target):
    """b = scale·a + noise: the absolute error stays within the bound of retrace.compare.similarity's docstring,
    3δ·(1 − cos + (‖a‖−‖b‖)²/(‖a‖‖b‖)) with δ the guaranteed relative error of a 2¹⁶-term sum; and within
    1e-6 relative for norms equal to 1e-3 (the norm difference taken from Σ(a−b)(a+b), not from two
    rounded norms: subtracting the norms left 0.55e-6 here, a margin a different BLAS could eat)."""
    a = base(1 << 16, torch.float32)
    b = dense_perturbed((a.double() * scale).float(), scale * 0.5 * math.sqrt(2 * target), 3)
    ref = Exact([(a, b)]).one_minus_cos()
    assert target / 3 < ref < target * 3
    r = compare_params({"w": a}, {"w": b})
    err = abs(r.one_minus_cos - ref)
    gap = (r.norm_a - r.norm_b) ** 2 / (r.norm_a * r.norm_b)
    assert err <= 3 * sum_bound(a.numel()) * (ref + gap)
    if scale == 1.001:
        assert err <= 1e-6 * ref


@pytest.mark.parametrize("case_id, factor", [("fp16-1e-12", 1e-6), ("fp32-1e-16", 0.1)])
def test_reference_is_sensitive_to_the_naive_formula(case_id, factor):
    """The textbook 1 - a·b/(‖a‖‖b‖) in float64 misses the exact value by more than the tolerance
    above (at 1e-16, by more than 10%): the accuracy test can fail."""
    _, a, b, _ = next(c for c in CASES if c[0] == case_id)
    ref = Exact([(a, b)]).one_minus_cos()
    a64, b64 = a.double(), b.double()
    naive = 1.0 - float(a64 @ b64) / math.sqrt(float(a64 @ a64) * float(b64 @ b64))
    assert abs(naive - ref) > factor * ref
    r = compare_params({"w": a}, {"w": b})
    assert abs(r.one_minus_cos - ref) <= 1e-6 * ref


def test_totals_over_many_tensors_equal_the_flattened_exact_value():
    g = torch.Generator().manual_seed(11)
    shapes = {"emb": (300, 64), "w1": (64, 256), "b1": (256,), "ln": (64,), "w2": (256, 64)}
    a = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    b = {k: ulp_perturbed(v, 3, i) for i, (k, v) in enumerate(a.items())}
    b["ln"] = a["ln"].clone()
    ex = Exact([(a[k], b[k]) for k in shapes])
    r = compare_params(a, b)
    assert [t.name for t in r.tensors] == list(shapes)
    assert r.n_params == sum(math.prod(s) for s in shapes.values())
    assert abs(r.one_minus_cos - ex.one_minus_cos()) <= 1e-6 * ex.one_minus_cos()
    assert r.l2 == pytest.approx(ex.l2(), rel=1e-12)
    for t in r.tensors:
        ex_t = Exact([(a[t.name], b[t.name])])
        if t.name == "ln":
            assert t.one_minus_cos == 0.0 and t.bitwise_equal
        else:
            assert abs(t.one_minus_cos - ex_t.one_minus_cos()) <= 1e-6 * ex_t.one_minus_cos()
        assert t.l2 == pytest.approx(ex_t.l2(), rel=1e-12)
        assert t.max_abs_diff == float((a[t.name].double() - b[t.name].double()).abs().max())


@pytest.mark.parametrize("chunk", [7, 1000, CHUNK])
def test_chunking_gives_the_same_sums(chunk):
    """Each sum is within the guaranteed bound of its exact value (squares, products and differences of
    fp16 values are exact in float64, so fsum of them is the correctly rounded exact sum)."""
    a = base(10_007, torch.float16, seed=3)
    b = ulp_perturbed(a, 50, 5)
    s = tensor_sums(a, b, _Workspace(chunk))
    a64, b64 = a.double().tolist(), b.double().tolist()
    d64 = [x - y for x, y in zip(a64, b64, strict=True)]
    bound = sum_bound(min(chunk, a.numel()))
    assert s.n == a.numel()
    for got, terms in ((s.saa, [x * x for x in a64]), (s.sbb, [y * y for y in b64]), (s.sdd, [d * d for d in d64])):
        assert abs(got - math.fsum(terms)) <= bound * math.fsum(terms)
    # Signed sums: the bound is relative to the sum of the magnitudes.
    sds_terms = [d * (x + y) for d, x, y in zip(d64, a64, b64, strict=True)]
    assert abs(s.sds - math.fsum(sds_terms)) <= bound * math.fsum(map(abs, sds_terms))
    assert abs(s.sa - math.fsum(a64)) <= bound * math.fsum(map(abs, a64))
    assert s.max_abs == max(map(abs, d64))
    ex = Exact([(a, b)])
    assert abs(one_minus_cos_from_sums(s.saa, s.sbb, s.sdd, s.sds) - ex.one_minus_cos()) <= 1e-6 * ex.one_minus_cos()


def test_identical_inputs_give_exactly_zero():
    a = {"x": base(5000, torch.float16), "y": base(77, torch.bfloat16, 1), "z": base(30, torch.float32, 2)}
    b = {k: v.clone() for k, v in a.items()}
    r = compare_params(a, b)
    assert r.one_minus_cos == 0.0 and r.cos == 1.0 and r.l2 == 0.0 and r.max_abs_diff == 0.0
    assert r.norm_a == r.norm_b
    for t in r.tensors:
        assert t.bitwise_equal and t.one_minus_cos == 0.0 and t.cos == 1.0 and t.l2 == 0.0
        assert t.std_ratio == 1.0
    assert r.n_bitwise_equal == 3


def test_zero_norm_tensor_has_nan_cos_but_finite_totals():
    a = {"w": base(100, torch.float32), "bias": torch.zeros(10)}
    b = {"w": a["w"] * 2, "bias": torch.zeros(10)}
    r = compare_params(a, b)
    bias = r.tensors[1]
    assert math.isnan(bias.cos) and math.isnan(bias.one_minus_cos) and math.isnan(bias.std_ratio)
    assert bias.l2 == 0.0 and bias.bitwise_equal
    # Parallel vectors of different norms: 1 − cos is 0 up to the documented error, δ·(0 + (‖a‖−‖b‖)²/(‖a‖‖b‖))
    # = δ/2 for b = 2a; not exactly 0 (the rounding of Σa² decides the side, and it differs between CPUs).
    assert 0.0 <= r.one_minus_cos <= 3 * sum_bound(100) * 0.5
    w64 = a["w"].double().tolist()
    assert abs(r.l2 - math.sqrt(math.fsum(x * x for x in w64))) <= sum_bound(100) * r.l2
    # One side zero: undefined angle, finite distance.
    r = compare_params({"bias": torch.zeros(4)}, {"bias": torch.ones(4)})
    assert math.isnan(r.cos) and math.isnan(r.one_minus_cos) and r.l2 == 2.0


def test_bitwise_equal_is_about_bytes_not_values():
    r = compare_params({"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([1.0, -0.0])})
    assert r.l2 == 0.0 and r.one_minus_cos == 0.0 and not r.tensors[0].bitwise_equal
    v = base(64, torch.float16)
    r = compare_params({"x": v}, {"x": v.float()})
    t = r.tensors[0]
    assert t.one_minus_cos == 0.0 and not t.bitwise_equal and (t.dtype_a, t.dtype_b) == ("float16", "float32")


def test_std_and_std_ratio():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 300, generator=g) * 0.02 + 0.001
    b = torch.randn(400, 300, generator=g) * 0.03
    t = compare_params({"w": a}, {"w": b}).tensors[0]
    assert t.std_a == pytest.approx(float(a.double().std(correction=0)), rel=1e-12)
    assert t.std_b == pytest.approx(float(b.double().std(correction=0)), rel=1e-12)
    assert t.std_ratio == pytest.approx(t.std_b / t.std_a, rel=1e-15)
    assert t.std_ratio == pytest.approx(1.5, rel=0.02)
    assert abs(t.cos) < 0.02  # different random numbers: nearly orthogonal
    ones = compare_params({"ln": torch.ones(64)}, {"ln": torch.ones(64)}).tensors[0]
    assert ones.std_a == 0.0 and math.isnan(ones.std_ratio)


def test_non_finite_values_propagate():
    a = torch.tensor([1.0, float("nan"), 2.0])
    r = compare_params({"x": a}, {"x": torch.tensor([1.0, 0.0, 2.0])})
    assert math.isnan(r.one_minus_cos) and math.isnan(r.l2) and math.isnan(r.max_abs_diff)
    assert not r.tensors[0].bitwise_equal


def test_fp16_differences_exact_in_float64_not_in_float32():
    big, tiny = torch.tensor(1024.0, dtype=torch.float16), torch.tensor(2.0**-24, dtype=torch.float16)
    assert float(tiny) == 2.0**-24
    assert float(big.float() - tiny.float()) == 1024.0  # rounded away in float32
    assert float(big.double() - tiny.double()) == 1024.0 - 2.0**-24  # exact in float64
    # Random fp16 pairs over the whole finite range: the float64 difference is the exact difference.
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**15), 2**15, (2, 200_000), generator=g, dtype=torch.int16)
    vals = bits.view(torch.float16)
    vals = vals[:, torch.isfinite(vals).all(0)]
    a, b = vals[0], vals[1]
    d = (a.double() - b.double()) * 2.0**24
    ia, ib = (a.double() * 2.0**24).long(), (b.double() * 2.0**24).long()
    assert torch.equal(d.long(), ia - ib) and torch.equal(d, d.round())


def test_buffers_in_mappings_are_not_parameters():
    w = base(10, torch.float32)
    a = {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(4), "w": w}
    b = {"gpt_neox.layers.0.attention.bias": torch.ones(2, 2, dtype=torch.bool), "w": w.clone()}
    r = compare_params(a, b)
    assert [t.name for t in r.tensors] == ["w"] and r.n_params == 10


def test_name_and_shape_mismatch_is_an_error_listing_the_differences():
    a = {"shared": torch.ones(3), "bad": torch.ones(2, 3), "only_a": torch.ones(1)}
    b = {"shared": torch.ones(3), "bad": torch.ones(3, 2), "only_b1": torch.ones(1), "only_b2": torch.ones(1)}
    with pytest.raises(RetraceError) as err:
        compare_params(DictReader(a, "ckptA"), DictReader(b, "ckptB"))
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("ckptA", "ckptB", "only in A (1): only_a", "only in B (2): only_b1, only_b2",
                 "shape mismatch (1): bad [2, 3] vs [3, 2]"):
        assert part in msg
    r = compare_params(a, b, intersection=True)
    assert [t.name for t in r.tensors] == ["shared"] and r.n_params == 3
    assert r.only_in_a == ["only_a"] and r.only_in_b == ["only_b1", "only_b2"]
    assert r.shape_mismatch == {"bad": ((2, 3), (3, 2))}
    assert sorted(r.skipped) == ["bad", "only_a", "only_b1", "only_b2"]
    assert r.to_dict()["skipped"]["shape_mismatch"] == {"bad": [[2, 3], [3, 2]]}
    with pytest.raises(RetraceError, match="no parameters in common"):
        compare_params({"x": torch.ones(1)}, {"y": torch.ones(1)}, intersection=True)


def test_progress_reports_each_tensor():
    a = {"x": torch.ones(3), "y": torch.ones(5)}
    calls = []
    compare_params(a, a, progress=lambda *args: calls.append(args))
    assert calls == [("x", 3, 8), ("y", 8, 8)]


def test_result_dict_and_frames():
    a = {"w": base(50, torch.float16), "z": torch.zeros(4)}
    b = {"w": ulp_perturbed(a["w"], 2, 0), "z": torch.zeros(4)}
    r = compare_params(a, b)
    assert isinstance(r, SimilarityResult)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)  # NaN cos of the zero tensor became null
    for key in ("cos", "one_minus_cos", "l2", "n_params", "norm_a", "norm_b", "max_abs_diff", "tensors"):
        assert key in d
    assert d["tensors"][1]["cos"] is None and d["tensors"][0]["one_minus_cos"] == r.tensors[0].one_minus_cos
    tf = r.tensor_frame()
    assert list(tf.columns) == TENSOR_COLUMNS
    assert tf["numel"].dtype == "int64" and tf["bitwise_equal"].dtype == bool
    assert tf.loc[0, "one_minus_cos"] == r.tensors[0].one_minus_cos and math.isnan(tf.loc[1, "cos"])
    assert tf.attrs["similarity"]["one_minus_cos"] == r.one_minus_cos
    sf = r.summary_frame()
    assert len(sf) == 1 and sf.loc[0, "n_params"] == 54 and sf.loc[0, "n_tensors"] == 2


def test_readers_over_safetensors_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    a = {"gpt_neox.embed_in.weight": (torch.randn(100, 16, generator=g) * 0.02).half(),
         "embed_out.weight": (torch.randn(100, 16, generator=g) * 0.02).half()}
    b = {k: ulp_perturbed(v, 1, i) for i, (k, v) in enumerate(a.items())}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    ex = Exact([(a[k], b[k]) for k in a])
    r = compare_sources(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert abs(r.one_minus_cos - ex.one_minus_cos()) <= 1e-6 * ex.one_minus_cos()
    assert r.source_a == str(tmp_path / "a.safetensors")
    with open_params(tmp_path / "a.safetensors") as ra:
        r2 = compare_params(ra, b)
    assert r2.one_minus_cos == r.one_minus_cos


def test_module_parameters_that_require_grad():
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 4)
    r = compare_params(dict(m.named_parameters()), {k: v.detach().clone() for k, v in m.state_dict().items()})
    assert r.one_minus_cos == 0.0 and all(t.bitwise_equal for t in r.tensors)


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_memory_stays_at_the_chunk_buffers(workers):
    """A 20M-element pair adds only the chunk buffers to the peak RSS (a float64 copy would add 160 MB)."""
    import subprocess
    import sys

    code = """
import resource, torch
from retrace.compare.similarity import compare_params
torch.set_num_threads(1)
a = torch.randn(4000, 5000, dtype=torch.float16)
b = torch.randn(4000, 5000, dtype=torch.float16)
compare_params({"w": a[:1]}, {"w": b[:1]})  # load everything lazily loaded, at small size
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = compare_params({"w": a}, {"w": b}, workers=WORKERS)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""
    code = code.replace("WORKERS", str(workers))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 40, f"peak RSS grew by {grown_mib:.0f} MiB during the comparison"


def test_result_does_not_depend_on_the_number_of_workers():
    g = torch.Generator().manual_seed(5)
    shapes = {"big": (3 * TASK + 123,), "mid": (1000, 700), "small": (5,), "empty": (0,)}
    a = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    b = {k: (v.float() + 1e-4 * torch.randn(v.shape, generator=g)).half() for k, v in a.items()}
    results = [compare_params(a, b, workers=w) for w in (1, 2, 3)]
    for r in results[1:]:
        assert r.to_dict() == results[0].to_dict()
    big = results[0].tensors[0]
    # Squares and differences of fp16 values are exact in float64, so fsum gives the correctly rounded sums;
    # retrace's are within the guaranteed bound of a CHUNK-term dot product (halved by the square root).
    a64, b64 = a["big"].double().numpy(), b["big"].double().numpy()
    rel = sum_bound(CHUNK) / 2 + U
    assert big.norm_a == pytest.approx(math.sqrt(math.fsum((a64 * a64).tolist())), rel=rel)
    assert big.l2 == pytest.approx(math.sqrt(math.fsum(((a64 - b64) ** 2).tolist())), rel=rel)
    assert results[0].tensors[3].numel == 0 and math.isnan(results[0].tensors[3].cos)
