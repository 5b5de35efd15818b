"""Cost of the per-step fingerprints (retrace.train.fingerprints) against the training step they follow.

Both fingerprints run once per optimizer step: the weight checksum over every parameter (on the weights'
device) and the batch hash over the global batch's tokens (on the host). This times each next to a real
builtin-engine step (forward, backward, update; fp16 semantics with the fp32 master) of the same shape,
in the same process, and prints their ratios to the step. A Pythia size (``--shape 160m``) also gives
the checksum's throughput in parameters/s, from which its cost at 2.8b follows (it is linear in the
parameter count; on a GPU run with ``--device cuda``).

    python benchmarks/fingerprints.py --smoke                     # CPU, tiny shape, seconds
    python benchmarks/fingerprints.py --shape 70m --seq 256 --batch 4
    python benchmarks/fingerprints.py --device cuda --shape 2.8b --seq 2048 --batch 8 --checksum-only
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from retrace.data.batch_hash import batch_hash
from retrace.model import GPTNeoX, ModelConfig, init_weights, pythia_config
from retrace.pythia.recipes import recipe_for
from retrace.train.engine import BuiltinEngine
from retrace.train.fingerprints import param_fingerprint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="tiny, or a Pythia size (70m, 160m, …, 2.8b)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="micro batch of the timed step")
    p.add_argument("--global-batch", type=int, default=1024, help="samples the batch hash digests per step")
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checksum-only", action="store_true", help="no training step (weights only: large sizes)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, fp32, 2 repeats, 64 samples: seconds")
    args = p.parse_args()
    if args.smoke:
        args.shape, args.seq, args.batch, args.repeats, args.global_batch = "tiny", 64, 4, 2, 64
        args.precision = "fp32"  # CPU fp16 is ~8x slower; the smoke run only has to run
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.shape == "tiny":
        cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=512, seq_len=max(args.seq, 64))
    else:
        cfg = pythia_config(args.shape, seq_len=max(args.seq, 2048))
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab, (args.batch, args.seq + 1), generator=g)
    if args.checksum_only:
        model = GPTNeoX(cfg).to(device=device, dtype=dtype)
        params = list(model.named_parameters())
        step_s = None
    else:
        model = GPTNeoX(cfg)
        init_weights(model, 0)
        engine = BuiltinEngine(model, recipe_for("70m", lr=1e-4, warmup_iters=0), args.precision, gas=1,
                               device=device, lr_iter=10)

        def step():
            engine.forward_backward(x.to(device))
            engine.step()

        step()  # warm up
        step_s = timed(step, device, args.repeats)
        params = list(engine.iter_params())
    n = sum(t.numel() for _, t in params)
    param_fingerprint(params)  # warm up (the position table)
    fp_s = timed(lambda: param_fingerprint(params), device, args.repeats)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (args.global_batch, args.seq + 1), dtype=np.int64)
    bh_s = timed(lambda: batch_hash(tokens), torch.device("cpu"), args.repeats)
    print(f"shape {args.shape} ({n / 1e6:.2f}M params, {params[0][1].dtype}), device {device}, "
          f"threads {args.threads}")
    if step_s is not None:
        print(f"  training step ({args.batch} x {args.seq} tokens):   {step_s * 1e3:10.3f} ms")
    print(f"  weight checksum (param_fp):          {fp_s * 1e3:10.3f} ms  ({n / fp_s / 1e9:.2f} G params/s)"
          + (f"  = {fp_s / step_s:.4f} x the step" if step_s else ""))
    print(f"  batch hash ({args.global_batch} x {args.seq + 1} tokens): {bh_s * 1e3:10.3f} ms"
          + (f"  = {bh_s / step_s:.4f} x the step" if step_s else ""))
    if step_s:
        print(f"  both: {(fp_s + bh_s) / step_s:.4f} x the step")
    print(f"  at 2.8b ({2.775e9 / 1e9:.3f}B params) on this device the checksum would take "
          f"{2.775e9 / (n / fp_s):.2f} s per step")


if __name__ == "__main__":
    main()
