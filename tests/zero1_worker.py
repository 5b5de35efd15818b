"""One rank of the ZeRO-1 checks (started by tests/test_zero1.py through retrace's local launcher, gloo).

For each precision: a replicated builtin engine and a ZeRO-1 engine train the same model on the same
rank-specific micro-batches for STEPS steps; a third ZeRO-1 engine stops halfway, writes its shard state to
a file, is rebuilt from a differently initialised model, loads the file and continues. Each rank compares
its shard with the same slice of the replicated state (bitwise) and writes what it found as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from retrace.model import GPTNeoX, ModelConfig, init_weights
from retrace.pythia.recipes import recipe_for
from retrace.train.engine import BuiltinEngine

STEPS, PDBS, GAS, SEQ = 20, 2, 2, 16
CFG = ModelConfig(n_layers=2, hidden=32, heads=4, vocab=128, seq_len=SEQ)


def make_engine(precision: str, zero1: bool, seed: int = 0, chunk: int = 1 << 22) -> BuiltinEngine:
    model = GPTNeoX(CFG)
    init_weights(model, seed)
    r = recipe_for("70m", global_batch=PDBS * GAS * dist.get_world_size(), seq_length=SEQ, train_iters=100,
                   warmup_iters=2, lr=3e-3)
    return BuiltinEngine(model, r, precision, gas=GAS, world_size=dist.get_world_size(), zero1=zero1,
                         chunk_elems=chunk)


def batch(rank: int, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randint(0, CFG.vocab, (PDBS, SEQ + 1), generator=g)


def run(eng: BuiltinEngine, rank: int, steps: range) -> list[dict]:
    out = []
    for s in steps:
        for k in range(GAS):
            eng.forward_backward(batch(rank, s, k))
        res = eng.step(step=s + 1)
        out.append({"grad_norm": res.grad_norm, "skipped": res.skipped, "lr": res.lr})
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    report: dict = {"rank": rank, "world": world}
    for precision in ("fp32", "fp16"):
        rep = make_engine(precision, zero1=False)
        z = make_engine(precision, zero1=True, chunk=5)  # a tiny chunk: chunking must not change a bit
        log_rep = run(rep, rank, range(STEPS))
        log_z = run(z, rank, range(STEPS))
        same = {"log": log_rep == log_z, "weights": True, "master": True, "exp_avg": True, "exp_avg_sq": True}
        for gr, gz in zip(rep.groups, z.groups, strict=True):
            same["weights"] &= torch.equal(gr.model[: gr.numel], gz.model[: gz.numel])
            hi = min(gz.hi, gz.numel)
            n = max(0, hi - gz.lo)
            for key in ("master", "exp_avg", "exp_avg_sq"):
                same[key] &= torch.equal(getattr(gr, key)[gz.lo : gz.lo + n], getattr(gz, key)[:n])
                same[key] &= bool((getattr(gz, key)[n:] == 0).all())  # the padding stays zero
        # stop halfway, save this rank's shard, rebuild from another init, load, continue
        a = make_engine(precision, zero1=True)
        run(a, rank, range(STEPS // 2))
        path = out_dir / f"{precision}.rank{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in a.iter_state_tensors()}, str(path))
        meta = json.loads(json.dumps(a.state_meta()))
        del a
        b = make_engine(precision, zero1=True, seed=99)
        b.load_state(load_file(str(path)), meta)
        run(b, rank, range(STEPS // 2, STEPS))
        resumed = all(torch.equal(gb.model, gz.model) and torch.equal(gb.master, gz.master)
                      and torch.equal(gb.exp_avg, gz.exp_avg) and torch.equal(gb.exp_avg_sq, gz.exp_avg_sq)
                      for gb, gz in zip(b.groups, z.groups, strict=True))
        moved = float(sum((gz.master - gi.master[: gz.master.numel()]).abs().sum()
                          for gz, gi in zip(z.groups, make_engine(precision, zero1=True).groups, strict=True)))
        report[precision] = {"same": same, "resumed": resumed, "moved": moved,
                             "bytes_replicated": rep.optimizer_bytes(), "bytes_zero1": z.optimizer_bytes(),
                             "n_params": CFG.n_params, "skipped": sum(x["skipped"] for x in log_z)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
