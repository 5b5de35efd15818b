"""θ Cos and L2 between two parameter sets, streamed tensor by tensor in float64.

Everything is computed from four float64 sums per tensor — ``Σa²``, ``Σb²``, ``Σ(a−b)²`` and
``Σ(a−b)(a+b)`` — plus ``Σa``, ``Σb`` (for the standard deviations) and ``max |a−b|``. The totals over all
parameters flattened are the sums of the per-tensor sums, so one pass over the two checkpoints gives both
the per-tensor rows and θ Cos / L2 of the whole model.

Accuracy. ``1 − cos`` is never formed as ``1 − a·b/(‖a‖‖b‖)``: near cos = 1 that subtraction cancels
every significant digit (at 1 − cos = 1e-12 a float64 dot product keeps about four). It is derived
from the distance instead::

    1 − cos = (‖a−b‖² − (‖a‖ − ‖b‖)²) / (2‖a‖‖b‖),   ‖a‖ − ‖b‖ = Σ(a−b)(a+b) / (‖a‖ + ‖b‖)

both identities (expand ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b, and ‖a‖² − ‖b‖² = Σ(a−b)(a+b)). ``‖a−b‖²`` is a sum
of non-negative terms, so its float64 relative error δ stays near the rounding unit whatever its size;
``(‖a‖ − ‖b‖)²`` is at most ``‖a−b‖²`` (triangle inequality), and taking the norm difference from
``Σ(a−b)(a+b)`` (whose error is δ·Σ|a−b||a+b| ≤ δ·‖a−b‖(‖a‖+‖b‖)) instead of subtracting two rounded
norms keeps its absolute error at δ·‖a−b‖². So the absolute error of ``1 − cos`` is of order

    δ · (1 − cos + (‖a‖ − ‖b‖)² / (‖a‖‖b‖))

— relative δ when the norms are close (near-identical checkpoints), never worse than δ absolute.
What δ is: a float64 sum of m non-negative terms, in any order a BLAS may choose, has relative error
at most (m − 1)·u with u = 2⁻⁵³ (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2); the
sums here run over at most ``CHUNK`` elements (torch's dot products, NumPy's pairwise sums) or over
blocks of ``kernel.BLOCK`` with compensated block totals (the C kernel: δ ≤ 74u), and piece sums are
combined with ``math.fsum`` (correctly rounded), so δ ≤ CHUNK·u ≈ 3e-11 on every CPU and every path, and
in practice (rounding errors of random sign) about √m·u ≈ 1e-14. The textbook formula's error is δ absolute instead, 1e-4 relative
at 1 − cos = 1e-12. tests/test_similarity.py checks both regimes against exact rational arithmetic.
``cos`` is then ``1 − (1 − cos)``. Identical inputs give exactly 0 (every difference is 0, and Σa² and Σb²
are the same computation on the same values). Parallel vectors of different norms give a value within
a few δ of 0, on either side (which side depends on the CPU's BLAS); ``1 − cos`` is clamped to [0, 2].

The differences are formed in float64, where they are exact for fp16 inputs: every fp16 value is an
integer multiple of 2⁻²⁴ below 2¹⁶ in magnitude, so a difference of two needs at most 41 significant
bits (< 53). They are *not* exact in float32 in general — 1024 − 2⁻²⁴ needs 35 bits — which is why no
part of the computation runs in float32. For fp32/bf16 inputs the float64 difference is exact or
correctly rounded (relative error ≤ 2⁻⁵³ per term), which is all a sum of squares needs.

Memory and speed. Two safetensors files of fp16/fp32/fp64 tensors (every published Pythia checkpoint)
are memory-mapped as NumPy arrays (``retrace.checkpoints.safetensors_np``: no torch import, nothing
copied) and each fp16 pair is summed in one fused pass by a small C kernel compiled at first use, or
chunk by chunk in NumPy where no compiler is (``retrace.compare.kernel``, which states both error
bounds: δ ≤ 74u for the kernel, δ ≤ CHUNK·u for NumPy, so the bound above holds on either path). Other
sources (directories, .bin, the Hub, bf16) are read as torch tensors and walked in chunks of ``CHUNK``
elements converted into four reused float64 buffers (a, b, a−b, a+b; 2 MiB each, so they stay in
cache), on which BLAS dot products (``torch.dot``) and one-pass reductions run. Either way, pieces of
``TASK`` elements are summed on one thread per core (``_Workers``). Peak memory is a few tensor pairs in their stored dtype
(memory-mapped pages for safetensors files) plus those buffers: the largest pair of a 12B model (its
50688×5120 embeddings in fp16) is about 1 GB. benchmarks/similarity.py measures the speed against a
naive float64 NumPy pass and against plain reading of the same files. (Paging the next pair in ahead
of the workers, on the reading thread, was measured and dropped: no gain with a cold page cache, 40%
slower with a warm one.)

Conventions (also in the per-tensor rows):

* ``cos`` and ``one_minus_cos`` are NaN for a tensor where either side has zero norm (an all-zero
  tensor, e.g. a bias initialised to zero): the angle is undefined. ``l2`` is still defined.
  The totals are NaN only if a whole side is zero.
* ``std_a``/``std_b`` are population standard deviations (ddof = 0) of each tensor's elements, and
  ``std_ratio = std_b / std_a`` (NaN where ``std_a`` is 0). At step 0 a ratio of 1 with cos ≈ 0 says
  "same initialisation scheme, different random numbers".
* ``bitwise_equal`` is True only when both tensors have the same dtype and the same bytes (so −0.0 and
  +0.0 differ, and fp16 vs fp32 copies of the same values are not bitwise equal).
* Non-finite parameters propagate: an inf or NaN anywhere makes that tensor's figures (and the
  totals) non-finite rather than being silently dropped.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from retrace.compare import kernel
from retrace.errors import RetraceError
from retrace.io import json_safe

#: Elements per float64 chunk: four 2 MiB buffers that stay in the CPU cache.
CHUNK = kernel.CHUNK
#: Elements per task handed to a worker thread. Tensors are always split at these boundaries, so the
#: result does not depend on the number of workers.
TASK = 16 * CHUNK

#: A ParamReader (or any reader with its methods, e.g. ``NumpySafetensorsReader``) or a mapping
#: name → tensor (torch or NumPy). Spelled loosely so that importing this module imports no torch.
ParamSource = Any
#: ``progress(name, done, total)``: called after each tensor, with parameter (element) counts.
Progress = Callable[[str, int, int], Any]



class _Sums(NamedTuple):
    """Float64 sums of one tensor pair (or of all of them)."""

    n: int
    saa: float  # Σ a²
    sbb: float  # Σ b²
    sdd: float  # Σ (a − b)²
    sds: float  # Σ (a − b)(a + b) = Σ a² − Σ b², without the cancellation
    sa: float  # Σ a
    sb: float  # Σ b
    max_abs: float  # max |a − b|


@dataclass(frozen=True)
class TensorSimilarity:
    """One row of the per-tensor table."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype_a: str
    dtype_b: str
    cos: float
    one_minus_cos: float
    l2: float
    max_abs_diff: float
    bitwise_equal: bool
    norm_a: float
    norm_b: float
    std_a: float
    std_b: float
    std_ratio: float


@dataclass
class SimilarityResult:
    """θ Cos / L2 over all compared parameters flattened, and one row per tensor."""

    source_a: str
    source_b: str
    cos: float
    one_minus_cos: float
    l2: float
    n_params: int
    norm_a: float
    norm_b: float
    max_abs_diff: float
    tensors: list[TensorSimilarity]
    #: Names left out by ``intersection=True`` (empty otherwise: a mismatch is an error then).
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def skipped(self) -> list[str]:
        """Every name present on either side that was not compared."""
        return [*self.only_in_a, *self.only_in_b, *self.shape_mismatch]

    @property
    def n_bitwise_equal(self) -> int:
        return sum(t.bitwise_equal for t in self.tensors)

    def summary(self) -> dict[str, Any]:
        """The totals as plain Python values (NaN kept)."""
        return {
            "source_a": self.source_a,
            "source_b": self.source_b,
            "cos": self.cos,
            "one_minus_cos": self.one_minus_cos,
            "l2": self.l2,
            "n_params": self.n_params,
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "max_abs_diff": self.max_abs_diff,
            "n_tensors": len(self.tensors),
            "n_bitwise_equal": self.n_bitwise_equal,
            "n_skipped": len(self.skipped),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals, ``tensors`` (one dict per row) and ``skipped``; NaN/inf become None."""
        out = self.summary()
        out["tensors"] = [_row(t) for t in self.tensors]
        out["skipped"] = {
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatch": {k: [list(sa), list(sb)] for k, (sa, sb) in self.shape_mismatch.items()},
        }
        return json_safe(out)

    def tensor_frame(self):
        """Per-tensor rows as a pandas DataFrame; ``.attrs`` holds the totals (``summary()``)."""
        import pandas as pd

        frame = pd.DataFrame([_row(t) for t in self.tensors], columns=TENSOR_COLUMNS)
        frame["numel"] = frame["numel"].astype("int64")
        frame["bitwise_equal"] = frame["bitwise_equal"].astype(bool)
        frame.attrs = {"similarity": self.summary(), "skipped": self.skipped}
        return frame

    def summary_frame(self):
        """The totals as a one-row pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame([self.summary()])


#: Column order of ``SimilarityResult.tensor_frame()``.
TENSOR_COLUMNS = [
    "name",
    "shape",
    "numel",
    "dtype_a",
    "dtype_b",
    "cos",
    "one_minus_cos",
    "l2",
    "max_abs_diff",
    "bitwise_equal",
    "norm_a",
    "norm_b",
    "std_a",
    "std_b",
    "std_ratio",
]


def _row(t: TensorSimilarity) -> dict[str, Any]:
    row = asdict(t)
    row["shape"] = list(t.shape)
    return row


# ---------------------------------------------------------------------------------------------
# The arithmetic


def one_minus_cos_from_sums(saa: float, sbb: float, sdd: float, sds: float) -> float:
    """``1 − cos`` from ``‖a‖²``, ``‖b‖²``, ``‖a−b‖²`` and ``Σ(a−b)(a+b)`` without cancellation near cos = 1.

    NaN when either norm is zero (the angle is undefined); clamped to [0, 2] otherwise.
    """
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    if na == 0.0 or nb == 0.0:
        return math.nan
    norm_gap = sds / (na + nb)  # ‖a‖ − ‖b‖
    x = (sdd - norm_gap * norm_gap) / (2.0 * na * nb)
    # Comparisons are False for NaN, so NaN inputs stay NaN.
    if x < 0.0:
        return 0.0
    if x > 2.0:
        return 2.0
    return x


class _Workspace:
    """Four reusable float64 chunk buffers (a, b, a − b, a + b) per device."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._buffers: dict = {}

    def get(self, device):
        import torch

        buf = self._buffers.get(device)
        if buf is None:
            buf = self._buffers[device] = torch.empty(4, self.chunk, dtype=torch.float64, device=device)
        return buf


def tensor_sums(a, b, workspace: _Workspace | None = None) -> _Sums:
    """The float64 sums of one tensor pair (same number of elements), chunk by chunk.

    NumPy arrays go to ``kernel.pair_sums``. torch tensors: each chunk is converted into float64
    buffers (exact for fp16/bf16/fp32), its difference formed there, and the sums taken with BLAS dot
    products and one-pass reductions; per-chunk results are combined with ``math.fsum`` (correctly
    rounded).
    """
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _Sums(a.size, *kernel.pair_sums(a.reshape(-1), b.reshape(-1)))
    import torch

    a, b = _as_torch(a), _as_torch(b)
    ws = workspace or _Workspace()
    a = a.detach().reshape(-1)
    b = b.detach().reshape(-1)
    n = a.numel()
    if b.numel() != n:
        raise ValueError(f"tensor sizes differ: {n} vs {b.numel()}")
    if b.device != a.device:
        b = b.to(a.device)
    buf = ws.get(a.device)
    f64 = torch.float64
    parts = []
    for start in range(0, n, ws.chunk):
        x = a[start : start + ws.chunk]
        y = b[start : start + ws.chunk]
        m = x.numel()
        xa = x if x.dtype == f64 else buf[0, :m].copy_(x)
        yb = y if y.dtype == f64 else buf[1, :m].copy_(y)
        d = torch.sub(xa, yb, out=buf[2, :m])
        s = torch.add(xa, yb, out=buf[3, :m])
        parts.append(
            torch.stack(
                (
                    torch.dot(xa, xa),
                    torch.dot(yb, yb),
                    torch.dot(d, d),
                    torch.dot(d, s),
                    xa.sum(),
                    yb.sum(),
                    *torch.aminmax(d),
                )
            )
        )
    if not parts:
        return _Sums(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    cols = torch.stack(parts).T.tolist()
    return _Sums(n, *(math.fsum(c) for c in cols[:6]), _nanmax([*cols[7], *(-v for v in cols[6])]))


def _as_torch(t):
    """A NumPy array as a torch tensor (a reader of one kind against a mapping of the other)."""
    import torch

    return torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t


def _nanmax(values) -> float:
    """max() that returns NaN if any value is NaN (the builtin may silently skip one)."""
    values = list(values)
    return math.nan if any(v != v for v in values) else max(values, default=0.0)


def _combine(parts: list[_Sums]) -> _Sums:
    """The sums of a tensor from the sums of its consecutive pieces."""
    if len(parts) == 1:
        return parts[0]
    fields = list(zip(*parts, strict=True))
    return _Sums(sum(fields[0]), *(math.fsum(f) for f in fields[1:7]), _nanmax(fields[7]))


def _one_torch_thread() -> None:
    """A worker thread's torch runs one intra-op thread (only where torch is in use at all)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _flat(t):
    return t.reshape(-1) if isinstance(t, np.ndarray) else t.detach().reshape(-1)


def _numel(t) -> int:
    return t.size if isinstance(t, np.ndarray) else t.numel()


def _dtype_name(t) -> str:
    return t.dtype.name if isinstance(t, np.ndarray) else str(t.dtype).removeprefix("torch.")


def default_workers() -> int:
    """torch's intra-op thread count where torch is loaded, else the CPUs this process may use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Workers:
    """Sum tensor pairs in pieces of ``TASK`` elements on ``n`` threads, or inline for n = 1.

    Each worker thread runs torch with one intra-op thread (set per thread, so the caller's setting
    is untouched) and its own chunk buffers. Threads over single-threaded ops rather than torch's
    OpenMP threads over each op: every op is a short parallel region, and when the machine is busy
    (other jobs on the same cores) a descheduled OpenMP thread stalls every barrier. With one busy
    process beside it on a 2-core machine, 50M fp16 pairs took 1.26 s (median; up to 3.2 s) that way
    against 0.17 s with these threads, and both took 0.05 s on the idle machine. (torch ops release
    the GIL, so the threads run in parallel.)
    """

    def __init__(self, n: int):
        self.n = max(1, n)
        self._local = threading.local()
        self._pool = (
            ThreadPoolExecutor(self.n, initializer=_one_torch_thread, thread_name_prefix="retrace-similarity")
            if self.n > 1 else None
        )

    def _sums(self, a, b) -> _Sums:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = _Workspace()
        return tensor_sums(a, b, ws)

    def submit(self, a, b) -> list[Future]:
        """Futures of the sums of each piece of the pair (already done when inline)."""
        a, b = _flat(a), _flat(b)
        futures = []
        for start in range(0, max(_numel(a), 1), TASK):
            pa, pb = a[start : start + TASK], b[start : start + TASK]
            if self._pool is not None:
                futures.append(self._pool.submit(self._sums, pa, pb))
            else:
                done: Future = Future()
                done.set_result(self._sums(pa, pb))
                futures.append(done)
        return futures

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _bitwise_equal(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
            a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    import torch

    a, b = _as_torch(a), _as_torch(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    view = int_view.get(a.element_size()) if a.is_floating_point() else None
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view).to(a.device))


def _std(s: float, ss: float, n: int) -> float:
    if n == 0:
        return math.nan
    mean = s / n
    return math.sqrt(max(ss / n - mean * mean, 0.0))


def _tensor_row(name: str, a, b, s: _Sums) -> TensorSimilarity:
    omc = one_minus_cos_from_sums(s.saa, s.sbb, s.sdd, s.sds)
    # Identical values give Σ(a−b)² = 0; only then are the bytes worth comparing (NaN too).
    equal = False if s.sdd > 0 else _bitwise_equal(a, b)
    std_a, std_b = _std(s.sa, s.saa, s.n), _std(s.sb, s.sbb, s.n)
    return TensorSimilarity(
        name=name,
        shape=tuple(a.shape),
        numel=s.n,
        dtype_a=_dtype_name(a),
        dtype_b=_dtype_name(b),
        cos=1.0 - omc,
        one_minus_cos=omc,
        l2=math.sqrt(s.sdd),
        max_abs_diff=s.max_abs,
        bitwise_equal=equal,
        norm_a=math.sqrt(s.saa),
        norm_b=math.sqrt(s.sbb),
        std_a=std_a,
        std_b=std_b,
        std_ratio=std_b / std_a if std_a > 0 else math.nan,
    )


# ---------------------------------------------------------------------------------------------
# Whole parameter sets


def _as_reader(src: ParamSource, label: str):
    if all(callable(getattr(src, m, None)) for m in ("names", "shape", "get")) and hasattr(src, "source"):
        return src  # a ParamReader, or a reader with its methods (NumpySafetensorsReader)
    if isinstance(src, Mapping):
        if all(isinstance(v, np.ndarray) for v in src.values()):
            return _ArrayReader(src, f"<{label}: in-memory parameters>")
        from retrace.checkpoints.base import DictReader

        return DictReader(src, source=f"<{label}: in-memory parameters>")
    raise TypeError(f"expected a ParamReader or a mapping of name -> tensor for {label}, got {type(src).__name__}")


class _ArrayReader:
    """A mapping name → NumPy array as a reader (buffers skipped, canonical order), without torch."""

    def __init__(self, params: Mapping[str, np.ndarray], source: str):
        from retrace.checkpoints.names import canonical_hf_name, canonical_order

        self.source = source
        self._params = {canonical_hf_name(k): v for k, v in params.items() if canonical_hf_name(k) is not None}
        self._names = canonical_order(self._params)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self._params[name]


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")


def _mismatch_message(ra, rb, only_a, only_b, shapes) -> str:
    parts = []
    if only_a:
        parts.append(f"only in A ({len(only_a)}): {_preview(only_a)}")
    if only_b:
        parts.append(f"only in B ({len(only_b)}): {_preview(only_b)}")
    if shapes:
        items = [f"{k} {list(sa)} vs {list(sb)}" for k, (sa, sb) in shapes.items()]
        parts.append(f"shape mismatch ({len(items)}): {_preview(items)}")
    return (
        f"parameters of A ({ra.source}) and B ({rb.source}) differ: " + "; ".join(parts)
        + " (intersection=True / --intersection compares the common ones)"
    )


def compare_params(
    a: ParamSource,
    b: ParamSource,
    *,
    intersection: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> SimilarityResult:
    """Compare two parameter sets: θ Cos, 1 − θ Cos and L2 over all of them, and per tensor.

    ``a``/``b`` are ParamReaders (see ``retrace.checkpoints``) or mappings name → tensor (buffers in
    a mapping are skipped like a reader skips them). The names and shapes must match; otherwise a
    RetraceError lists what is only in A, only in B and which shapes differ — unless
    ``intersection=True``, which compares the names present on both sides with equal shapes and
    records the rest in ``only_in_a``/``only_in_b``/``shape_mismatch``. Tensors are visited in A's
    order, a few pairs in memory at a time, and summed on ``workers`` threads (default: torch's
    intra-op thread count where torch is loaded, else the usable CPUs; see ``_Workers``). The result does not depend on
    ``workers``. ``progress(name, done, total)`` is called after each tensor (element counts).
    """
    ra, rb = _as_reader(a, "A"), _as_reader(b, "B")
    names_a, names_b = ra.names(), rb.names()
    set_a, set_b = set(names_a), set(names_b)
    only_a = [n for n in names_a if n not in set_b]
    only_b = [n for n in names_b if n not in set_a]
    common = [n for n in names_a if n in set_b]
    shape_a = {n: tuple(ra.shape(n)) for n in common}
    shapes = {n: (shape_a[n], tuple(rb.shape(n))) for n in common}
    shapes = {n: pair for n, pair in shapes.items() if pair[0] != pair[1]}
    if (only_a or only_b or shapes) and not intersection:
        raise RetraceError(_mismatch_message(ra, rb, only_a, only_b, shapes))
    names = [n for n in common if n not in shapes]
    if not names:
        raise RetraceError(f"A ({ra.source}) and B ({rb.source}) have no parameters in common to compare")

    total = sum(math.prod(shape_a[n]) for n in names)
    rows: list[TensorSimilarity] = []
    sums: list[_Sums] = []
    done = 0
    pool = _Workers(default_workers() if workers is None else workers)
    pending: deque[tuple[str, Any, Any, list[Future]]] = deque()

    def finish_oldest() -> None:
        nonlocal done
        name, ta, tb, futures = pending.popleft()
        s = _combine([f.result() for f in futures])
        sums.append(s)
        rows.append(_tensor_row(name, ta, tb, s))
        done += s.n
        if progress is not None:
            progress(name, done, total)

    try:
        for name in names:
            ta, tb = ra.get(name), rb.get(name)
            if tuple(ta.shape) != tuple(tb.shape):
                raise RetraceError(
                    f"{name}: A ({ra.source}) has shape {list(ta.shape)} but B ({rb.source}) has {list(tb.shape)}"
                )
            pending.append((name, ta, tb, pool.submit(ta, tb)))
            # Keep the workers fed, but only a few tensors in memory.
            while sum(len(p[3]) for p in pending) > 2 * pool.n:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        pool.close()

    saa = math.fsum(s.saa for s in sums)
    sbb = math.fsum(s.sbb for s in sums)
    sdd = math.fsum(s.sdd for s in sums)
    sds = math.fsum(s.sds for s in sums)
    omc = one_minus_cos_from_sums(saa, sbb, sdd, sds)
    return SimilarityResult(
        source_a=ra.source,
        source_b=rb.source,
        cos=1.0 - omc,
        one_minus_cos=omc,
        l2=math.sqrt(sdd),
        n_params=sum(s.n for s in sums),
        norm_a=math.sqrt(saa),
        norm_b=math.sqrt(sbb),
        max_abs_diff=_nanmax(s.max_abs for s in sums),
        tensors=rows,
        only_in_a=only_a if intersection else [],
        only_in_b=only_b if intersection else [],
        shape_mismatch=shapes if intersection else {},
    )


def compare_sources(a: str, b: str, **kwargs: Any) -> SimilarityResult:
    """``compare_params`` on two sources opened with ``retrace.checkpoints.open_params``
    (a safetensors/.bin file, an HF or NeoX directory, a hub ``repo@stepN``).

    Two local ``.safetensors`` files that ``NumpySafetensorsReader`` takes (fp16/fp32/fp64) are read
    as memory-mapped NumPy arrays instead, without importing torch; any other pair, or a file that
    reader declines, goes through ``open_params`` (same figures within the bound in the module
    docstring, and its error messages).
    """
    fast = _open_numpy_pair(a, b)
    if fast is not None:
        with fast[0] as ra, fast[1] as rb:
            return compare_params(ra, rb, **kwargs)
    from retrace.checkpoints import open_params

    with open_params(a) as ra, open_params(b) as rb:
        return compare_params(ra, rb, **kwargs)


def _open_numpy_pair(a: str, b: str):
    """Both sources as ``NumpySafetensorsReader``s, or None (then ``open_params`` reads them)."""
    if not all(str(s).endswith(".safetensors") and Path(s).is_file() for s in (a, b)):
        return None
    from retrace.checkpoints.safetensors_np import NotReadableHere, NumpySafetensorsReader

    try:
        ra = NumpySafetensorsReader(a)
    except NotReadableHere:
        return None
    try:
        rb = NumpySafetensorsReader(b)
    except NotReadableHere:
        ra.close()
        return None
    return ra, rb
