"""The float64 sums of a tensor pair held as NumPy arrays: one fused C pass, or NumPy chunk by chunk.

``pair_sums(a, b)`` returns ``(Σa², Σb², Σ(a−b)², Σ(a−b)(a+b), Σa, Σb, max|a−b|)`` of two 1-D arrays of
the same size (any float dtype NumPy has: fp16, fp32, fp64), with no torch import.

The C kernel (fp16 × fp16 only, the dtype of every published Pythia checkpoint) reads each pair once:
8 halves at a time (16 with AVX-512) converted to float64 (exact), difference and sum formed there
(exact: fp16 values are multiples of 2⁻²⁴ below 2¹⁶, so a sum or difference of two needs at most 41 of
float64's 53 bits), the four products accumulated with FMA in L = 8 (16) float64 lanes over blocks of
``BLOCK`` elements, each block's lane totals added into Neumaier-compensated sums. Error bound of each
returned non-negative sum (Σa², Σb², Σ(a−b)²), relative: every product is rounded once (u = 2⁻⁵³), a
lane adds BLOCK/L of them, the L lanes are added, and the compensated sum over blocks adds at most 2u:

    δ_C ≤ (BLOCK/L + L + 2) · u ≤ (BLOCK/8 + 8 + 2) · u ≈ 74 u ≈ 8.2e-15   (BLOCK = 512),

whatever the tensor's size; the signed sums (Σ(a−b)(a+b), Σa, Σb) have absolute error δ_C times the sum
of the terms' magnitudes. (Hint followed and why it is not needed: a product of two fp16 values is exact
in float32, but a difference of two is not — 1024 − 2⁻²⁴ needs 35 bits — so the pass stays in float64,
where everything but the products' rounding is exact.)

The NumPy fallback (any float dtypes, or when no C compiler is available) converts chunks of ``CHUNK``
elements into float64 buffers, forms the products there (one rounding each) and sums them with NumPy's
pairwise summation; any order of summing m terms gives δ ≤ (m − 1)·u (Higham §4.2), so δ_numpy ≤
CHUNK · u ≈ 2.9e-11, and pairwise summation gives far less (≈ (16 + log₂ m)·u). Not BLAS dot products:
a multi-threaded BLAS on a busy machine took 24 ms for a chunk NumPy sums in 1.5 ms. Chunk sums are
combined with ``math.fsum``. So both paths agree within δ ≤ CHUNK · u, the bound similarity.py's
accuracy argument uses; tests/test_similarity.py checks both against exact rational arithmetic.

NaN: ``max|a−b|`` is NaN exactly when Σ(a−b)² is (a NaN difference makes both NaN; a square is never
negative, so no other NaN arises), which is how the C result is made to propagate NaN.

The kernel is compiled at first use with the system ``cc``/``gcc`` (``-O3 -march=native``) into a
per-user cache directory (``$XDG_CACHE_HOME/retrace/kernels``, else a private one under the temp dir;
only a directory this user owns and nobody else can write is used), keyed by the source, the compiler
binary (path, size, mtime), the flags and the CPU's flags, and loaded with ctypes (which releases the
GIL, so worker threads run in parallel). No compiler, a failed build, no private cache directory or
``RETRACE_SIMILARITY_KERNEL=numpy`` give the NumPy fallback; nothing fails for want of gcc.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

#: Elements per float64 chunk of the NumPy fallback (four 2 MiB buffers that stay in the CPU cache).
CHUNK = 1 << 18
#: Elements per block of the C kernel (each block's lane sums go into compensated totals).
BLOCK = 512
#: ``RETRACE_SIMILARITY_KERNEL``: ``auto`` (default: C if it builds, else NumPy) or ``numpy``.
KERNEL_ENV = "RETRACE_SIMILARITY_KERNEL"

Sums7 = tuple[float, float, float, float, float, float, float]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define RETRACE_SIMD 1
#endif
#define BLOCK @BLOCK@

/* Neumaier: s + c carries the running total; error 2u|total| + O(n u^2). */
static inline void add_comp(double *s, double *c, double x) {
    double t = *s + x;
    if (isfinite(t)) *c += fabs(*s) >= fabs(x) ? (*s - t) + x : (x - t) + *s; /* inf/NaN: t alone */
    *s = t;
}

static double half_to_double(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp((double)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp((double)(m + 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

/* out: saa, sbb, sdd, sds, sa, sb, max|d|; returns 1 when built with SIMD. */
int retrace_f16_sums(const uint16_t *a, const uint16_t *b, int64_t n, double *out) {
    double tot[6] = {0}, comp[6] = {0}, mx = 0.0;
    int64_t i = 0;
#if defined(RETRACE_SIMD) && defined(__AVX512F__)
    /* 16 halves at a time, two 8-lane float64 halves; blocks of BLOCK as below (16 lanes per sum) */
    const __m512d sign = _mm512_set1_pd(-0.0);
    __m512d vmx = _mm512_setzero_pd();
    uint16_t ta[16], tb[16];
    while (i < n) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        __m512d acc[6][2];
        for (int k = 0; k < 6; k++) acc[k][0] = acc[k][1] = _mm512_setzero_pd();
        for (; i < end; i += 16) {
            __m256i ha, hb;
            if (end - i >= 16) {
                ha = _mm256_loadu_si256((const __m256i *)(a + i));
                hb = _mm256_loadu_si256((const __m256i *)(b + i));
            } else {
                memset(ta, 0, sizeof ta); memset(tb, 0, sizeof tb);
                memcpy(ta, a + i, (size_t)(end - i) * 2); memcpy(tb, b + i, (size_t)(end - i) * 2);
                ha = _mm256_loadu_si256((const __m256i *)ta);
                hb = _mm256_loadu_si256((const __m256i *)tb);
            }
            __m512 fa = _mm512_cvtph_ps(ha), fb = _mm512_cvtph_ps(hb);
            for (int h = 0; h < 2; h++) {
                __m512d x = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(fa, 1) : _mm512_castps512_ps256(fa));
                __m512d y = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(fb, 1) : _mm512_castps512_ps256(fb));
                __m512d d = _mm512_sub_pd(x, y), s = _mm512_add_pd(x, y);
                acc[0][h] = _mm512_fmadd_pd(x, x, acc[0][h]);
                acc[1][h] = _mm512_fmadd_pd(y, y, acc[1][h]);
                acc[2][h] = _mm512_fmadd_pd(d, d, acc[2][h]);
                acc[3][h] = _mm512_fmadd_pd(d, s, acc[3][h]);
                acc[4][h] = _mm512_add_pd(x, acc[4][h]);
                acc[5][h] = _mm512_add_pd(y, acc[5][h]);
                vmx = _mm512_max_pd(vmx, _mm512_andnot_pd(sign, d));
            }
        }
        for (int k = 0; k < 6; k++) {
            double lane[8];
            _mm512_storeu_pd(lane, _mm512_add_pd(acc[k][0], acc[k][1]));
            add_comp(&tot[k], &comp[k], ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])));
        }
        i = end;
    }
    double lm[8];
    _mm512_storeu_pd(lm, vmx);
    for (int k = 0; k < 8; k++) mx = lm[k] > mx ? lm[k] : mx;
#elif defined(RETRACE_SIMD)
    const __m256d sign = _mm256_set1_pd(-0.0);
    __m256d vmx = _mm256_setzero_pd();
    uint16_t ta[8], tb[8];
    while (i < n) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        __m256d acc[6][2];
        for (int k = 0; k < 6; k++) acc[k][0] = acc[k][1] = _mm256_setzero_pd();
        for (; i < end; i += 8) {
            __m128i ha, hb;
            if (end - i >= 8) {
                ha = _mm_loadu_si128((const __m128i *)(a + i));
                hb = _mm_loadu_si128((const __m128i *)(b + i));
            } else { /* the tail, zero-padded: zeros add nothing to any sum or maximum */
                memset(ta, 0, sizeof ta); memset(tb, 0, sizeof tb);
                memcpy(ta, a + i, (size_t)(end - i) * 2); memcpy(tb, b + i, (size_t)(end - i) * 2);
                ha = _mm_loadu_si128((const __m128i *)ta);
                hb = _mm_loadu_si128((const __m128i *)tb);
            }
            __m256 fa = _mm256_cvtph_ps(ha), fb = _mm256_cvtph_ps(hb);
            for (int h = 0; h < 2; h++) {
                __m256d x = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(fa, 1) : _mm256_castps256_ps128(fa));
                __m256d y = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(fb, 1) : _mm256_castps256_ps128(fb));
                __m256d d = _mm256_sub_pd(x, y), s = _mm256_add_pd(x, y);
                acc[0][h] = _mm256_fmadd_pd(x, x, acc[0][h]);
                acc[1][h] = _mm256_fmadd_pd(y, y, acc[1][h]);
                acc[2][h] = _mm256_fmadd_pd(d, d, acc[2][h]);
                acc[3][h] = _mm256_fmadd_pd(d, s, acc[3][h]);
                acc[4][h] = _mm256_add_pd(x, acc[4][h]);
                acc[5][h] = _mm256_add_pd(y, acc[5][h]);
                vmx = _mm256_max_pd(vmx, _mm256_andnot_pd(sign, d));
            }
        }
        for (int k = 0; k < 6; k++) {
            double lane[4];
            _mm256_storeu_pd(lane, _mm256_add_pd(acc[k][0], acc[k][1]));
            add_comp(&tot[k], &comp[k], (lane[0] + lane[1]) + (lane[2] + lane[3]));
        }
        i = end;
    }
    double lm[4];
    _mm256_storeu_pd(lm, vmx);
    for (int k = 0; k < 4; k++) mx = lm[k] > mx ? lm[k] : mx;
#else
    while (i < n) {
        int64_t end = i + BLOCK < n ? i + BLOCK : n;
        double acc[6][8] = {{0}};
        for (; i < end; i++) {
            int l = (int)(i & 7);
            double x = half_to_double(a[i]), y = half_to_double(b[i]);
            double d = x - y, s = x + y;
            acc[0][l] = fma(x, x, acc[0][l]);
            acc[1][l] = fma(y, y, acc[1][l]);
            acc[2][l] = fma(d, d, acc[2][l]);
            acc[3][l] = fma(d, s, acc[3][l]);
            acc[4][l] += x;
            acc[5][l] += y;
            mx = fabs(d) > mx ? fabs(d) : mx;
        }
        for (int k = 0; k < 6; k++) {
            double t = 0.0;
            for (int l = 0; l < 8; l++) t += acc[k][l];
            add_comp(&tot[k], &comp[k], t);
        }
    }
#endif
    for (int k = 0; k < 6; k++) out[k] = isfinite(tot[k]) ? tot[k] + comp[k] : tot[k];
    out[6] = mx;
#ifdef RETRACE_SIMD
    return 1;
#else
    return 0;
#endif
}

double retrace_probe_half(uint16_t h) { return half_to_double(h); }
""".replace("@BLOCK@", str(BLOCK))

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dirs() -> list[Path]:
    """Where a built kernel may live: the user's cache, else a private directory under the temp dir."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [Path(base) / "retrace" / "kernels", Path(tempfile.gettempdir()) / f"retrace-kernels-{uid}"]


def _private(directory: Path) -> bool:
    """Ours and writable by nobody else: a library loaded from it runs as this user."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
    except OSError:
        return False
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return st.st_uid == uid and not st.st_mode & 0o022 and os.access(directory, os.W_OK)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel (built once per source, compiler, flags and CPU), or None where it cannot be
    built. ``extra_flags`` (tests: ``-mno-avx2`` builds the portable scalar loop) go after the defaults."""
    cc = _compiler()
    if cc is None:
        return None
    try:  # the compiler's identity without running it (this runs in every `retrace compare`)
        st = os.stat(os.path.realpath(cc))
    except OSError:
        return None
    version = f"{os.path.realpath(cc)} {st.st_size} {st.st_mtime_ns}"
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-fast-math", *extra_flags]
    key = hashlib.sha256("\0".join([_SOURCE, version, " ".join(flags), _cpu_flags(), platform.machine()])
                         .encode()).hexdigest()[:20]
    directory = next((d for d in _cache_dirs() if _private(d)), None)
    if directory is None:
        return None
    lib = directory / f"similarity-{key}.so"
    try:
        if not lib.is_file():
            with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
                src, out = Path(tmp) / "similarity.c", Path(tmp) / "similarity.so"
                src.write_text(_SOURCE)
                r = subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, timeout=120)
                if r.returncode != 0 or not out.is_file():
                    return None
                os.replace(out, lib)  # atomic: a concurrent build replaces it with the same bytes
        dll = ctypes.CDLL(str(lib))
        fn = dll.retrace_f16_sums
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        probe = dll.retrace_probe_half
        probe.argtypes = [ctypes.c_uint16]
        probe.restype = ctypes.c_double
        return dll
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None


def c_kernel() -> ctypes.CDLL | None:
    """The C kernel, built on first call; None when disabled or unavailable (then NumPy is used)."""
    if os.environ.get(KERNEL_ENV, "auto") == "numpy":
        return None
    with _lock:
        if "dll" not in _state:
            _state["dll"] = _build()
        return _state["dll"]  # type: ignore[return-value]


def kernel_name() -> str:
    """``c`` or ``numpy``: which path ``pair_sums`` takes for an fp16 pair."""
    return "c" if c_kernel() is not None else "numpy"


def _c_sums(dll: ctypes.CDLL, a: np.ndarray, b: np.ndarray) -> Sums7:
    out = np.zeros(7, dtype=np.float64)
    a16, b16 = a.view(np.uint16), b.view(np.uint16)
    dll.retrace_f16_sums(a16.ctypes.data, b16.ctypes.data, a16.size, out.ctypes.data)
    saa, sbb, sdd, sds, sa, sb, mx = (float(v) for v in out)
    return saa, sbb, sdd, sds, sa, sb, (math.nan if sdd != sdd else mx)


def numpy_sums(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> Sums7:
    """The NumPy fallback: float64 chunks, BLAS dot products, chunk sums combined with ``math.fsum``."""
    with np.errstate(all="ignore"):  # inf/NaN propagate into the sums, as documented, without warnings
        return _numpy_sums(a, b, chunk)


def _numpy_sums(a: np.ndarray, b: np.ndarray, chunk: int) -> Sums7:
    n = a.size
    m0 = min(chunk, n)
    x, y, d, s, t = (np.empty(m0, dtype=np.float64) for _ in range(5))
    cols: list[list[float]] = [[] for _ in range(7)]
    for start in range(0, n, chunk):
        pa, pb = a[start : start + chunk], b[start : start + chunk]
        m = pa.size
        xa, yb, dd, ss, tt = x[:m], y[:m], d[:m], s[:m], t[:m]
        np.copyto(xa, pa, casting="unsafe")  # exact: fp16/fp32 → float64
        np.copyto(yb, pb, casting="unsafe")
        np.subtract(xa, yb, out=dd)
        np.add(xa, yb, out=ss)
        for col, (u, v) in zip(cols, ((xa, xa), (yb, yb), (dd, dd), (dd, ss)), strict=False):
            col.append(float(np.multiply(u, v, out=tt).sum()))
        cols[4].append(float(xa.sum()))
        cols[5].append(float(yb.sum()))
        cols[6].append(max(float(dd.max()), -float(dd.min())))  # NaN if any is (both are then); 5x abs+max
    if not n:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    maxes = cols[6]
    mx = math.nan if any(v != v for v in maxes) else max(maxes)
    return (*(math.fsum(c) for c in cols[:6]), mx)  # type: ignore[return-value]


def pair_sums(a: np.ndarray, b: np.ndarray) -> Sums7:
    """The seven float64 sums of two 1-D arrays of one size (see the module docstring for the bound)."""
    if a.size != b.size:
        raise ValueError(f"array sizes differ: {a.size} vs {b.size}")
    if a.dtype == np.float16 and b.dtype == np.float16 and a.size:
        dll = c_kernel()
        if dll is not None:
            return _c_sums(dll, np.ascontiguousarray(a), np.ascontiguousarray(b))
    return numpy_sums(a, b)
