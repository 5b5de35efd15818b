"""Benchmark ``retrace.compare.similarity.compare_params`` against a naive float64 NumPy pass and a plain read.

Writes two fp16 safetensors checkpoints of a Pythia-shaped model (default ~1 GB each, ~500M parameters:
Pythia-410m's width with as many layers as the size allows) into a temporary directory, removed
afterwards, then times in the same process, each the best of ``--repeat`` runs with the files in the page
cache (one untimed read first):

  read (mmap)  every byte of both files read through the reader retrace compare uses for them
               (``NumpySafetensorsReader``: memory-mapped NumPy views) and copied chunk by chunk into
               one small reused buffer on one thread: the same access path as retrace, computing nothing. This is the
               baseline for "retrace / read-through": it is the fair one, since retrace pays the same
               page faults.
  read (raw)   both files read with ``readinto`` into preallocated buffers: the fastest way to get the
               bytes into the process at all (a different access path), shown for reference.
  naive        load all parameters (``safetensors.numpy.load_file``), flatten and concatenate into one
               float64 vector per side, then NumPy (BLAS) dot products a·a, b·b, a·b and (a−b)·(a−b).
  retrace      ``compare_sources(A, B)``: totals and every per-tensor row.
  cat          ``cat A B > /dev/null`` in a subprocess: the floor of any command reading both files.
  CLI          ``retrace compare A B --quiet`` in a subprocess, end to end (interpreter start-up, imports,
               the comparison).
  verified     one step of the workflow's compare-run: A checked against its sha256 (as a manifest
               records it), B against its seal (as fetch-reference writes it), and the comparison.
               "one after another" runs the three passes in turn; retrace (``compare_checked``) hashes
               on two threads while it compares.

Prints seconds, GB/s of checkpoint bytes, and the ratios naive/retrace, retrace/read and CLI/cat.

``--cold`` also times the reads and retrace with the two files dropped from the page cache before each
run (``posix_fadvise(DONTNEED)`` on these files only): the case of checkpoints larger than memory,
where every byte comes from the disk.

    python benchmarks/similarity.py               # ~1 GB per checkpoint (needs ~12 GB RAM for naive)
    python benchmarks/similarity.py --size-gb 0.1 # quick run
    python benchmarks/similarity.py --smoke       # tiny pair, one run each: what the test suite runs
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrace.checkpoints import save_params
from retrace.checkpoints.safetensors_np import NumpySafetensorsReader
from retrace.checkpoints.save import check_sealed
from retrace.compare.kernel import kernel_name
from retrace.compare.run import check_checkpoint, compare_checked
from retrace.compare.similarity import compare_sources, default_workers
from retrace.io import sha256_file
from retrace.pythia.sizes import ModelConfig, pythia_config


def model_config(n_params: int) -> ModelConfig:
    """Pythia-410m's width (hidden 1024, 16 heads, vocabulary 50304) with as many layers as make about
    ``n_params`` parameters; below ~130M the vocabulary shrinks instead, so the tensor mix stays a
    real model's (a few big matrices per layer, small norms and biases)."""
    base = pythia_config("410m")
    h, vocab = base.hidden, base.vocab
    per_layer = base.replace(n_layers=2).n_params - base.replace(n_layers=1).n_params
    if n_params < 2 * vocab * h + 2 * per_layer:
        vocab = max(256, (n_params - 2 * per_layer) // (2 * h))
    layers = max(1, round((n_params - 2 * vocab * h) / per_layer))
    return base.replace(n_layers=layers, vocab=vocab)


def write_pair(directory: Path, n_params: int, seed: int = 0) -> tuple[Path, Path, int]:
    """A: an initialisation-like checkpoint; B: A after a small perturbation, norms and biases of
    some layers left identical (bitwise-equal rows, as in an early reproduction)."""
    g = torch.Generator().manual_seed(seed)
    shapes = model_config(n_params).param_shapes()
    a, b = {}, {}
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        a[name] = t.half()
        if "layers.0." in name or "norm" in name:
            b[name] = a[name].clone()
        else:
            b[name] = (t + torch.randn(shape, generator=g) * 2e-4).half()
        del t
    pa, pb = directory / "a.safetensors", directory / "b.safetensors"
    save_params(a, pa)
    save_params(b, pb, seal=True)  # B as fetch-reference writes a published step
    return pa, pb, sum(math.prod(s) for s in shapes.values())


def read_raw(paths, buffers) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            view = memoryview(buffers[p])
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"{p}: short read")
                got += n


def read_mmap(paths, chunk: int = 1 << 21) -> None:
    """Every byte of every tensor, as the reader retrace compare uses hands it out (memory-mapped NumPy
    views), copied into one reused buffer by NumPy on one thread."""
    buf = np.empty(chunk, dtype=np.uint8)
    for p in paths:
        with NumpySafetensorsReader(p) as r:
            for name in r.names():
                t = r.get(name).reshape(-1).view(np.uint8)
                for s in range(0, t.size, chunk):
                    part = t[s : s + chunk]
                    np.copyto(buf[: part.size], part)


def time_raw(paths, repeat: int) -> float:
    buffers = {p: bytearray(os.path.getsize(p)) for p in paths}
    read_raw(paths, buffers)  # fault the buffers in, untimed
    return best_of(lambda: read_raw(paths, buffers), repeat)[0]


def evict(paths) -> None:
    """Drop these files' pages from the page cache (they are clean: written and fsynced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold(fn, paths):
    def run():
        evict(paths)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def naive(pa, pb) -> tuple[float, float, float]:
    from safetensors.numpy import load_file

    def flat(path):
        params = load_file(path)
        names = sorted(params)
        return np.concatenate([params[k].ravel() for k in names], dtype=np.float64)

    a = flat(pa)
    b = flat(pb)
    aa, bb, ab = a @ a, b @ b, a @ b
    np.subtract(a, b, out=a)
    dd = a @ a
    return ab / math.sqrt(aa * bb), 1.0 - ab / math.sqrt(aa * bb), math.sqrt(dd)


def run_command(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow")}
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")


def best_of(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each fp16 checkpoint (default 1.0)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (default 3)")
    ap.add_argument("--naive-repeat", type=int, default=2, help="runs of the naive pass (default 2; 0 leaves it out: "
                    "it needs 16 bytes per parameter)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--cold", action="store_true", help="also time reads and retrace from a cold page cache")
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (default: the system's)")
    ap.add_argument("--smoke", action="store_true", help="a ~4 MB pair, one run each: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.size_gb, args.repeat, args.naive_repeat = 0.004, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="retrace-bench-", dir=args.dir) as tmp:
        t0 = time.perf_counter()
        pa, pb, n = write_pair(Path(tmp), int(args.size_gb * 1e9 / 2))
        paths = [pa, pb]
        nbytes = sum(os.path.getsize(p) for p in paths)
        print(f"checkpoints: 2 x {nbytes / 2e9:.2f} GB fp16, {n:,} parameters each, "
              f"{len(model_config(int(args.size_gb * 1e9 / 2)).param_shapes())} tensors (written in {time.perf_counter() - t0:.1f}s)")
        print(f"retrace's workers: {default_workers()}, CPUs: {os.cpu_count()}, fp16 kernel: {kernel_name()}")

        read_mmap(paths)  # warm the page cache, untimed
        t_mmap, _ = best_of(lambda: read_mmap(paths), args.repeat)
        t_raw = time_raw(paths, args.repeat)
        t_ret, res = best_of(lambda: compare_sources(str(pa), str(pb)), args.repeat)
        cli = [sys.executable, "-m", "retrace", "compare", str(pa), str(pb), "--quiet"]
        run_command(cli)  # untimed: a kernel compiled at first use is built here
        t_cat, _ = best_of(lambda: run_command(["cat", str(pa), str(pb)]), args.repeat)
        t_cli, _ = best_of(lambda: run_command(cli), args.repeat)
        t_naive, (cos_n, omc_n, l2_n) = (best_of(lambda: naive(pa, pb), args.naive_repeat) if args.naive_repeat
                                         else (math.nan, (math.nan, math.nan, math.nan)))
        sha_a = sha256_file(pa)

        def one_after_another():
            check_checkpoint(pa, sha_a)
            check_sealed(pb)
            return compare_sources(str(pa), str(pb))

        t_seq, _ = best_of(one_after_another, args.repeat)
        t_ver, res_ver = best_of(lambda: compare_checked(pa, sha_a, str(pb), pb), args.repeat)
        if args.cold:
            c_mmap = min(cold(lambda: read_mmap(paths), paths)() for _ in range(args.repeat))
            c_ret = min(cold(lambda: compare_sources(str(pa), str(pb)), paths)() for _ in range(args.repeat))

    gb = nbytes / 1e9
    print()
    print(f"{'':14s}{'seconds':>9s}{'GB/s':>8s}")
    for label, t in (("read (mmap)", t_mmap), ("read (raw)", t_raw), ("naive numpy", t_naive), ("retrace", t_ret),
                     ("cat", t_cat), ("CLI", t_cli)):
        print(f"{label:14s}{t:9.3f}{gb / t:8.2f}")
    print()
    print(f"naive / retrace         {t_naive / t_ret:6.2f}x   (goal >= 3)")
    print(f"retrace / read (mmap)   {t_ret / t_mmap:6.2f}x   (goal <= 2; the baseline: same access path)")
    print(f"retrace / read (raw)    {t_ret / t_raw:6.2f}x   (for reference)")
    print(f"retrace / cat (CLI)     {t_cli / t_cat:6.2f}x   (goal <= 3; `retrace compare A B --quiet` "
          f"against `cat A B`, both end to end)")
    print(f"verified step: one after another {t_seq:.3f}s, retrace {t_ver:.3f}s, "
          f"one after another / retrace {t_seq / t_ver:.2f}x (the checks overlap the comparison)")
    assert (res_ver.one_minus_cos, res_ver.l2) == (res.one_minus_cos, res.l2), "verified compare differs"
    if args.cold:
        print()
        print(f"cold page cache: read (mmap) {c_mmap:.3f}s ({gb / c_mmap:.2f} GB/s), retrace {c_ret:.3f}s, "
              f"retrace / read {c_ret / c_mmap:.2f}x")
    print()
    print(f"retrace: 1 - cos = {res.one_minus_cos:.6e}, L2 = {res.l2:.6e}, "
          f"{res.n_bitwise_equal}/{len(res.tensors)} tensors bitwise equal")
    print(f"naive:   1 - cos = {omc_n:.6e}, L2 = {l2_n:.6e}, "
          f"|cos difference| = {abs(cos_n - res.cos):.1e}")


if __name__ == "__main__":
    main()
