"""Step-0 forensics: are two checkpoints the same initialisation, the same scheme with other random
numbers, or a different scheme? ``forensics(a, b)`` answers in one call.

It runs ``retrace.compare.similarity.compare_params`` and reads the per-tensor rows by *kind* of tensor
(embedding, qkv, attention dense, MLP in/out, head, LayerNorm weights/biases, linear biases):

* which tensors are equal (value-equal; bitwise when the dtypes match), per kind;
* which tensors are deterministic — constant on both sides (LayerNorm ones and zeros, zero biases) —
  and whether those constants agree;
* the pooled standard deviation of each kind's random tensors on each side and their ratio B/A;
* for random tensors that differ, how correlated they are: independent zero-mean draws of n elements
  have cos ≈ N(0, 1/n), so ``|cos|·√n`` above ``z`` says "not independent" (the same draw, moved).

The reading, first match wins:

``identical``
    every tensor equal.
``partially identical``
    some random tensors equal and others not (a perturbed or swapped tensor, a shard from elsewhere).
``different scheme``
    some kind's std ratio is outside its tolerance, or a deterministic tensor differs (ones vs zeros),
    or one side is constant where the other is random; the kinds and ratios are named (e.g. small_init
    vs normal 0.02 on the embedding: ratio 0.02/√(2/5d)).
``related (not independent draws)``
    no random tensor equal, stds agree, but some differing tensors are strongly correlated.
``same init scheme, different RNG``
    no random tensor equal (deterministic ones may be), every kind's std ratio within tolerance,
    no correlation beyond chance.

Tolerance on a std ratio. For n independent normal draws the relative standard error of a sample
standard deviation is ≈ 1/√(2n); the ratio of two independent estimates has relative standard error
``se = √(1/(2n_a) + 1/(2n_b))``, ≈ 1/√n. A kind is consistent when ``|ratio − 1| ≤ max(floor, z·se)``
with ``floor = 5%`` and ``z = 5``. For real Pythia models every kind has n ≥ 98,304 (14m's
attention.dense over 6 layers), so se ≤ 0.32% and the 5% floor is > 15 standard errors — no false
"different scheme" from sampling, while the schemes it must tell apart differ by far more (14m:
small_init 0.0559 vs normal 0.02, a ratio of 2.8; wang 0.0295 vs scaled_normal 0.0058, a ratio of 5.1).
For tiny test models (n ≈ 1,000, se ≈ 3%) ``z·se`` takes over, so chance never reads as a scheme
change. The floor also absorbs fp16 rounding of the stored values and a non-normal law's different
sampling error (a std estimate's variance depends on the kurtosis).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from retrace.compare.similarity import ParamSource, SimilarityResult, TensorSimilarity, compare_params
from retrace.io import json_safe

IDENTICAL = "identical"
PARTIAL = "partially identical"
DIFFERENT_SCHEME = "different scheme"
RELATED = "related (not independent draws)"
SAME_SCHEME = "same init scheme, different RNG"
READINGS = (IDENTICAL, PARTIAL, DIFFERENT_SCHEME, RELATED, SAME_SCHEME)

#: Tensor kinds in report order, with a readable name.
KINDS = {
    "embedding": "embedding (embed_in)",
    "qkv": "attention query_key_value",
    "attn_dense": "attention dense",
    "mlp_in": "mlp dense_h_to_4h",
    "mlp_out": "mlp dense_4h_to_h",
    "head": "head (embed_out)",
    "layernorm_weight": "LayerNorm weights",
    "layernorm_bias": "LayerNorm biases",
    "bias": "linear biases",
    "other": "other",
}

FLOOR = 0.05
Z = 5.0
#: A tensor is constant when its std is below this fraction of its RMS (or it is all zeros).
_CONSTANT_REL = 1e-6


def tensor_kind(name: str) -> str:
    """The kind of a canonical (Hugging Face GPTNeoX) parameter name."""
    if name.endswith("embed_in.weight"):
        return "embedding"
    if name.endswith(("embed_out.weight", "lm_head.weight")):
        return "head"
    if "layernorm" in name or "layer_norm" in name or name.endswith(("norm.weight", "norm.bias")):
        return "layernorm_bias" if name.endswith(".bias") else "layernorm_weight"
    if name.endswith(".bias"):
        return "bias"
    if name.endswith("query_key_value.weight"):
        return "qkv"
    if name.endswith("attention.dense.weight"):
        return "attn_dense"
    if name.endswith("dense_h_to_4h.weight"):
        return "mlp_in"
    if name.endswith("dense_4h_to_h.weight"):
        return "mlp_out"
    return "other"


def _rms(norm: float, n: int) -> float:
    return norm / math.sqrt(n) if n else 0.0


def _constant(std: float, norm: float, n: int) -> bool:
    rms = _rms(norm, n)
    return rms == 0.0 or (math.isfinite(std) and std <= _CONSTANT_REL * rms)


def _equal(t: TensorSimilarity) -> bool:
    return t.bitwise_equal or (t.max_abs_diff == 0.0 and t.l2 == 0.0)


@dataclasses.dataclass
class KindSummary:
    """One kind of tensor across the model."""

    kind: str
    n_tensors: int
    numel: int
    n_equal: int
    n_bitwise: int
    n_constant: int  # constant on both sides (deterministic init)
    n_random: int  # random on both sides
    n_mixed: int  # constant on one side, random on the other
    std_a: float  # pooled over the random tensors (√(Σ nσ² / Σ n)); NaN if none
    std_b: float
    std_ratio: float  # std_b / std_a
    ratio_min: float  # per random tensor
    ratio_max: float
    se: float  # relative standard error of the pooled ratio
    tolerance: float
    corr_z: float  # max |cos|·√n over differing random tensors (NaN if none)
    rms_a: float  # RMS of the constant tensors (1 for LayerNorm ones, 0 for zeros)
    rms_b: float
    verdict: str  # equal | consistent | ratio-differs | constants-differ | random-vs-constant | n/a

    @property
    def title(self) -> str:
        return KINDS.get(self.kind, self.kind)


@dataclasses.dataclass
class ForensicsReport:
    source_a: str
    source_b: str
    reading: str
    headline: str
    findings: list[str]
    kinds: list[KindSummary]
    similarity: SimilarityResult
    z: float = Z
    floor: float = FLOOR

    def kind(self, kind: str) -> KindSummary:
        for k in self.kinds:
            if k.kind == kind:
                return k
        raise KeyError(kind)

    @property
    def scheme_differs(self) -> list[str]:
        """Kinds whose init scheme differs (std ratio out of tolerance, constants differ, …)."""
        return [
            k.kind
            for k in self.kinds
            if k.verdict in ("ratio-differs", "constants-differ", "random-vs-constant")
        ]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "source_a": self.source_a,
                "source_b": self.source_b,
                "reading": self.reading,
                "headline": self.headline,
                "findings": list(self.findings),
                "scheme_differs": self.scheme_differs,
                "tolerance": {"floor": self.floor, "z": self.z},
                "kinds": [dataclasses.asdict(k) for k in self.kinds],
                "similarity": self.similarity.summary(),
            }
        )

    def render(self) -> str:
        s = self.similarity
        lines = [
            f"A: {self.source_a}",
            f"B: {self.source_b}",
            f"{len(s.tensors)} tensors, {s.n_params:,} parameters; θ Cos {s.cos:.6g}, L2 {s.l2:.6g}",
            "",
            f"reading: {self.reading}",
            f"  {self.headline}",
        ]
        lines += [f"  - {f}" for f in self.findings]
        lines.append("")
        header = (
            f"{'kind':<26} {'tensors':>7} {'equal':>5} {'const':>5} {'elements':>11} "
            f"{'std A':>10} {'std B':>10} {'B/A':>8} {'tol':>6} {'|cos|√n':>8}  verdict"
        )
        lines.append(header)
        for k in self.kinds:
            lines.append(
                f"{k.title:<26} {k.n_tensors:>7} {k.n_equal:>5} {k.n_constant:>5} {k.numel:>11,} "
                f"{_fmt(k.std_a, '.5g'):>10} {_fmt(k.std_b, '.5g'):>10} {_fmt(k.std_ratio, '.4f'):>8} "
                f"{_fmt(k.tolerance, '.3f'):>6} {_fmt(k.corr_z, '.1f'):>8}  {k.verdict}"
            )
        lines.append("")
        lines.append(
            f"tolerance per kind: |B/A − 1| ≤ max({self.floor:g}, {self.z:g}·se), se = √(1/2n_A + 1/2n_B) "
            "(sampling error of a std estimate); |cos|·√n > "
            f"{self.z:g}: not independent draws"
        )
        return "\n".join(lines) + "\n"


def _fmt(x: float, spec: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _summarise(kind: str, rows: list[TensorSimilarity], z: float, floor: float) -> KindSummary:
    n_equal = sum(_equal(t) for t in rows)
    n_bitwise = sum(t.bitwise_equal for t in rows)
    const_a = [_constant(t.std_a, t.norm_a, t.numel) for t in rows]
    const_b = [_constant(t.std_b, t.norm_b, t.numel) for t in rows]
    constant = [t for t, ca, cb in zip(rows, const_a, const_b, strict=True) if ca and cb]
    random = [t for t, ca, cb in zip(rows, const_a, const_b, strict=True) if not ca and not cb]
    mixed = [t for t, ca, cb in zip(rows, const_a, const_b, strict=True) if ca != cb]
    nan = math.nan
    std_a = std_b = ratio = rmin = rmax = se = corr = nan
    tol = nan
    if random:
        na = sum(t.numel for t in random)
        std_a = math.sqrt(math.fsum(t.numel * t.std_a**2 for t in random) / na)
        std_b = math.sqrt(math.fsum(t.numel * t.std_b**2 for t in random) / na)
        ratio = std_b / std_a if std_a > 0 else nan
        ratios = [t.std_ratio for t in random]
        rmin, rmax = min(ratios), max(ratios)
        se = math.sqrt(1 / (2 * na) + 1 / (2 * na))
        tol = max(floor, z * se)
        differing = [t for t in random if not _equal(t)]
        if differing:
            corr = max(abs(t.cos) * math.sqrt(t.numel) for t in differing)
    const_differ = [t for t in constant if not _equal(t)]
    rms_a = (
        math.sqrt(math.fsum(t.norm_a**2 for t in constant) / sum(t.numel for t in constant))
        if constant
        else nan
    )
    rms_b = (
        math.sqrt(math.fsum(t.norm_b**2 for t in constant) / sum(t.numel for t in constant))
        if constant
        else nan
    )
    if n_equal == len(rows):
        verdict = "equal"
    elif mixed:
        verdict = "random-vs-constant"
    elif const_differ:
        verdict = "constants-differ"
    elif random and not (abs(ratio - 1) <= tol):
        verdict = "ratio-differs"
    elif random:
        verdict = "consistent"
    else:
        verdict = "n/a"
    return KindSummary(
        kind=kind,
        n_tensors=len(rows),
        numel=sum(t.numel for t in rows),
        n_equal=n_equal,
        n_bitwise=n_bitwise,
        n_constant=len(constant),
        n_random=len(random),
        n_mixed=len(mixed),
        std_a=std_a,
        std_b=std_b,
        std_ratio=ratio,
        ratio_min=rmin,
        ratio_max=rmax,
        se=se,
        tolerance=tol,
        corr_z=corr,
        rms_a=rms_a,
        rms_b=rms_b,
        verdict=verdict,
    )


def _preview(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def read_similarity(result: SimilarityResult, *, z: float = Z, floor: float = FLOOR) -> ForensicsReport:
    """The forensic reading of an existing ``compare_params`` result."""
    groups: dict[str, list[TensorSimilarity]] = {}
    for t in result.tensors:
        groups.setdefault(tensor_kind(t.name), []).append(t)
    kinds = [_summarise(k, groups[k], z, floor) for k in KINDS if k in groups]
    rows = result.tensors
    equal = [t for t in rows if _equal(t)]
    rand = [
        t
        for t in rows
        if not _constant(t.std_a, t.norm_a, t.numel) and not _constant(t.std_b, t.norm_b, t.numel)
    ]
    rand_equal = [t for t in rand if _equal(t)]
    rand_diff = [t for t in rand if not _equal(t)]
    det_equal = [t for t in equal if t not in rand_equal]
    findings: list[str] = []

    scheme = [k for k in kinds if k.verdict in ("ratio-differs", "constants-differ", "random-vs-constant")]
    for k in scheme:
        if k.verdict == "ratio-differs":
            findings.append(
                f"{k.title}: std {k.std_a:.5g} (A) vs {k.std_b:.5g} (B), ratio B/A {k.std_ratio:.4f} "
                f"(tolerance ±{k.tolerance:.3f})"
            )
        elif k.verdict == "constants-differ":
            findings.append(
                f"{k.title}: constant on both sides but different (RMS {k.rms_a:.4g} vs {k.rms_b:.4g})"
            )
        else:
            findings.append(f"{k.title}: {k.n_mixed} tensor(s) constant on one side and random on the other")
    related = [t for t in rand_diff if abs(t.cos) * math.sqrt(t.numel) > z]

    if len(equal) == len(rows):
        all_bitwise = all(t.bitwise_equal for t in rows)
        reading = IDENTICAL
        headline = f"all {len(rows)} tensors " + (
            "bitwise equal" if all_bitwise else "equal in value (not all bitwise: the dtypes differ)"
        )
    elif rand_equal and rand_diff:
        reading = PARTIAL
        diff = [t for t in rows if not _equal(t)]
        headline = (
            f"{len(rand_equal)} of {len(rand)} random tensors are equal; {len(diff)} tensor(s) differ: "
            + _preview(
                [f"{t.name} (1 − cos {t.one_minus_cos:.3g}, std ratio {t.std_ratio:.4g})" for t in diff]
            )
        )
    elif scheme:
        reading = DIFFERENT_SCHEME
        headline = "the init scheme differs in: " + ", ".join(
            f"{k.title} (B/A {k.std_ratio:.4g})"
            if k.verdict == "ratio-differs"
            else f"{k.title} ({k.verdict})"
            for k in scheme
        )
    elif related:
        reading = RELATED
        headline = (
            f"no random tensor is equal, stds agree, but {len(related)} of {len(rand_diff)} differing random tensors "
            f"are correlated beyond chance (|cos|·√n > {z:g}; e.g. {related[0].name}: cos {related[0].cos:.4g})"
        )
    else:
        reading = SAME_SCHEME
        headline = (
            f"no random tensor is equal ({len(rand)} compared); {len(det_equal)} deterministic tensor(s) "
            "(LayerNorm ones/zeros, zero biases) equal; std ratios within tolerance in every kind; "
            "correlations at chance level"
        )
    if reading == PARTIAL:
        findings = ["also: " + f for f in findings]
    if reading == DIFFERENT_SCHEME:
        same_draws = [k.title for k in scheme if k.verdict == "ratio-differs" and k.corr_z > z]
        if same_draws:
            findings.append(
                "the random draws are correlated beyond chance in "
                + ", ".join(same_draws)
                + " (|cos|·√n > "
                + f"{z:g}): the same random numbers at another scale — same RNG, different scheme"
            )
    if reading in (DIFFERENT_SCHEME, RELATED) and det_equal:
        findings.append(f"deterministic tensors equal: {len(det_equal)} (LayerNorm ones/zeros, zero biases)")
    return ForensicsReport(
        source_a=result.source_a,
        source_b=result.source_b,
        reading=reading,
        headline=headline,
        findings=findings,
        kinds=kinds,
        similarity=result,
        z=z,
        floor=floor,
    )


def forensics(
    a: ParamSource | str | os.PathLike,
    b: ParamSource | str | os.PathLike,
    *,
    z: float = Z,
    floor: float = FLOOR,
    intersection: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> ForensicsReport:
    """Compare ``a`` and ``b`` (ParamReaders, mappings name → tensor, or anything ``open_params`` opens:
    a file, a directory, ``org/repo@step0``) and read the result (see the module docstring)."""
    if isinstance(a, (str, os.PathLike)) or isinstance(b, (str, os.PathLike)):
        from retrace.checkpoints import open_params

        ra = open_params(a, cache_dir=cache_dir) if isinstance(a, (str, os.PathLike)) else a
        try:
            rb = open_params(b, cache_dir=cache_dir) if isinstance(b, (str, os.PathLike)) else b
            try:
                result = compare_params(ra, rb, intersection=intersection)
            finally:
                if rb is not b:
                    rb.close()
        finally:
            if ra is not a:
                ra.close()
    else:
        if not isinstance(a, Mapping) and not hasattr(a, "names"):
            raise TypeError(f"forensics: cannot read parameters from {type(a).__name__}")
        result = compare_params(a, b, intersection=intersection)
    return read_similarity(result, z=z, floor=floor)
