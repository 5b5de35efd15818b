"""Benchmark: GPT-NeoX index maps at Pile scale, built with numpy only (no compiler).

    .venv/bin/python benchmarks/data_order.py               # full scale: ~134M documents, ~207B tokens
    .venv/bin/python benchmarks/data_order.py --scale 0.01  # a quick 1% run

Synthetic document sizes shaped like the deduplicated Pile (134,318,121 documents, lognormal lengths,
~207B tokens), seq_length 2048 and Pythia's num_samples 147,164,160 (2 epochs, as for deduped). Prints
the wall time of each of the three maps, the peak memory (numpy allocations traced during the build, and
the process's max RSS), and the ratio against a straightforward per-sample Python loop (the C++ helper's
algorithm, literally) measured on a 1% slice of the samples and extrapolated; the loop's rows are also
checked against the vectorised ones. Goal on a 2-core machine: whole build < 10 min and < 12 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from retrace.data import order  # noqa: E402

GB = 1e9


def synthetic_sizes(n_docs: int, mean_tokens: float, seed: int, sigma: float = 1.4) -> np.ndarray:
    """Lognormal int32 document sizes (>= 1) with the given mean, generated in chunks."""
    rng = np.random.RandomState(seed)
    mu = np.log(mean_tokens) - sigma**2 / 2
    sizes = np.empty(n_docs, dtype=np.int32)
    chunk = 1 << 22
    for a in range(0, n_docs, chunk):
        b = min(n_docs, a + chunk)
        x = rng.lognormal(mu, sigma, b - a)
        np.clip(x, 1, 2**31 - 1, out=x)
        sizes[a:b] = x
    return sizes


def loop_sample_idx(lens: list[int], seq_length: int, n_rows: int) -> np.ndarray:
    """The first ``n_rows`` rows of sample_idx, one sample at a time (the C++ helper's loop in Python).

    ``lens`` are the sizes of the documents in doc_idx order (``sizes[doc_idx[i]]``)."""
    out = np.zeros((n_rows, 2), dtype=np.int32)
    rows = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(1, n_rows):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = lens[pos] - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - 1
                remaining = 0
            else:
                pos += 1
                offset = 0
        rows.append((pos, offset))
    out[:] = rows
    return out


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=134_318_121)
    p.add_argument("--tokens", type=float, default=207e9, help="target tokens per epoch")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=order.pythia_num_samples())
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--scale", type=float, default=1.0, help="scale documents and num_samples (quick runs)")
    p.add_argument("--slice", type=float, default=0.01, help="share of samples the Python loop builds")
    p.add_argument("--save", action="store_true", help="also time np.save of the maps (to a temporary dir)")
    p.add_argument("--smoke", action="store_true", help="1e-5 of the Pile's size, with --save: checks the script")
    args = p.parse_args()
    if args.smoke:
        args.scale, args.slice, args.save = 1e-5, 0.05, True

    n_docs = int(args.docs * args.scale)
    num_samples = int(args.num_samples * args.scale)
    L = args.seq_length
    print(f"# data_order: {n_docs:,} documents, mean {args.tokens / args.docs:.0f} tokens, seq_length {L}, "
          f"num_samples {num_samples:,}, {os.cpu_count()} cores")
    t = time.perf_counter()
    sizes = synthetic_sizes(n_docs, args.tokens / args.docs, args.seed)
    tokens = int(sizes.sum(dtype=np.int64))
    epochs = order.num_epochs(tokens, L, num_samples)
    S = order.num_samples_in(epochs, tokens, L)
    print(f"sizes: {tokens:,} tokens/epoch, {epochs} epochs, S = {S:,} samples "
          f"(generated in {time.perf_counter() - t:.1f}s, not counted)")
    rss_before = max_rss_gb()

    tracemalloc.start()
    rng = np.random.RandomState(seed=args.seed)
    t0 = time.perf_counter()
    documents = np.arange(n_docs, dtype=np.int32)
    doc_idx = order.build_doc_idx(documents, epochs, rng)
    del documents
    t1 = time.perf_counter()
    sample_idx = order.build_sample_idx(sizes, doc_idx, L, epochs, tokens)
    t2 = time.perf_counter()
    shuffle_idx = order.build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    t3 = time.perf_counter()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maps_bytes = doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes
    total = t3 - t0
    print(f"doc_idx     {doc_idx.shape[0]:>13,} int32   {t1 - t0:7.1f}s  (tile + RandomState.shuffle)")
    print(f"sample_idx  {sample_idx.shape[0]:>13,}x2 int32 {t2 - t1:7.1f}s  (vectorised)")
    print(f"shuffle_idx {shuffle_idx.shape[0]:>13,} {str(shuffle_idx.dtype):<7} {t3 - t2:7.1f}s  (RandomState.shuffle)")
    print(f"total build {total:7.1f}s = {total / 60:.2f} min; maps {maps_bytes / GB:.2f} GB; peak numpy memory "
          f"during the build {traced_peak / GB:.2f} GB; process max RSS {max_rss_gb():.2f} GB "
          f"({rss_before:.2f} GB before the build, incl. the {sizes.nbytes / GB:.2f} GB sizes array)")

    save_s = None
    if args.save:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            t = time.perf_counter()
            paths = order.index_map_paths(Path(d) / "bench", num_samples, L, args.seed)
            for path, arr in zip(paths.all(), (doc_idx, sample_idx, shuffle_idx), strict=True):
                order.save_npy(path, arr)
            save_s = time.perf_counter() - t
        print(f"save (np.save + rename, 3 files): {save_s:.1f}s")

    # the per-sample loop on a slice of the samples
    n_rows = max(2, int(S * args.slice))
    last_doc = int(sample_idx[n_rows - 1, 0]) + 2
    t = time.perf_counter()
    lens = sizes[doc_idx[:last_doc]].tolist()
    loop_rows = loop_sample_idx(lens, L, n_rows)
    loop_s = time.perf_counter() - t
    ok = bool(np.array_equal(loop_rows, sample_idx[:n_rows]))
    t = time.perf_counter()
    order.build_sample_idx(sizes, doc_idx[:last_doc], L, 1, int(np.sum(sizes[doc_idx[:last_doc]], dtype=np.int64)))
    vec_slice_s = time.perf_counter() - t
    loop_full = loop_s * (S + 1) / n_rows
    print(f"per-sample Python loop: {n_rows:,} rows ({args.slice:.0%}) in {loop_s:.1f}s -> {loop_full / 60:.1f} min "
          f"extrapolated for all {S + 1:,} rows; vectorised sample_idx {t2 - t1:.1f}s: "
          f"{loop_full / (t2 - t1):.0f}x faster (same slice vectorised: {vec_slice_s:.2f}s, "
          f"{loop_s / vec_slice_s:.0f}x); loop rows == vectorised rows: {ok}")
    print(json.dumps({
        "docs": n_docs, "tokens_per_epoch": tokens, "epochs": epochs, "samples": S, "num_samples": num_samples,
        "doc_idx_s": round(t1 - t0, 2), "sample_idx_s": round(t2 - t1, 2), "shuffle_idx_s": round(t3 - t2, 2),
        "total_s": round(total, 2), "maps_gb": round(maps_bytes / GB, 3), "traced_peak_gb": round(traced_peak / GB, 3),
        "max_rss_gb": round(max_rss_gb(), 3), "save_s": None if save_s is None else round(save_s, 2),
        "loop_slice_rows": n_rows, "loop_slice_s": round(loop_s, 2), "loop_extrapolated_s": round(loop_full, 1),
        "speedup_vs_loop": round(loop_full / (t2 - t1), 1), "loop_matches": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
