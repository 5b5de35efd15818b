"""The GPU check (issue 9 §3, issue 16): what only a GPU can show, in one run of a few minutes, written to one file.

Sections (each records its figures and a pass/fail where there is one):

  speed        builtin engine, fp16, flash and global attention, at the 160m and 410m shapes: tokens/s and MFU
               against transformers + torch AdamW timed alternately in the same process (train_step.measure)
  determinism  two identical 20-step ``retrace train`` runs (8 in --smoke) with the deterministic settings (the default):
               every checkpoint and the final resume state bitwise equal; a third run with
               ``--no-deterministic`` for the cost (tokens/s) and whether it happened to match
  resume       the same run killed by SIGUSR2 mid-run and rerun: bitwise equal to the uninterrupted one
  memory       replicated vs ZeRO-1 (2 ranks on the one GPU over gloo): torch.cuda.max_memory_allocated of
               rank 0 after two steps, and the optimizer bytes the engine allocated (ZeRO-1 ≈ 12·N/dp less)

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.json          # on a GPU (about 5 minutes)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json        # CPU, tiny shapes, seconds

``--smoke`` runs every section on the CPU with tiny shapes (the test suite runs it, so the script cannot rot);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "workflow"), os.environ.get("PYTHONPATH", "")])}


# ---- speed ------------------------------------------------------------------------------------------------
def speed(smoke: bool) -> list[dict]:
    from train_step import measure

    out = []
    shapes = ["tiny"] if smoke else ["160m", "410m"]
    for shape in shapes:
        for attention in ("flash", "global"):
            kw = dict(shape=shape, attention=attention, precision="fp32" if smoke else "fp16",
                      device="cpu" if smoke else "cuda")
            kw.update(dict(seq=32, batch=2, steps=1, rounds=1, warmup=1) if smoke else
                      dict(seq=2048, batch=4 if shape == "410m" else 8, steps=5, rounds=3, warmup=3))
            r = measure(**kw)
            out.append(r)
            sides = ", ".join(f"{n} {s['tokens_per_s']:,.0f} tok/s" + (f" MFU {100 * s['mfu']:.1f}%" if "mfu" in s else "")
                              for n, s in r["sides"].items())
            print(f"speed {shape} {attention}: {sides}, ratio {r['ratio']:.3f}", flush=True)
            if not smoke:
                torch.cuda.empty_cache()
    return out


# ---- a run directory of our own: reference, data, `retrace train` --------------------------------------
def make_world(root: Path, smoke: bool) -> dict:
    from retrace.checkpoints import save_params
    from retrace.data.indexed import write_indexed
    from retrace.model import GPTNeoX, config_to_hf, init_weights, pythia_config
    from retrace.pythia.sizes import ModelConfig

    cfg = ModelConfig(n_layers=2, hidden=32, heads=4, vocab=128, seq_len=64) if smoke else \
        pythia_config("160m", seq_len=512)
    seq, batch = (32, 8) if smoke else (512, 32)
    model = GPTNeoX(cfg)
    init_weights(model, 0)
    ref = root / "ref"
    ref.mkdir(parents=True)
    (ref / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype="float16", hidden_act="gelu")))
    save_params({k: v.half() for k, v in model.state_dict().items()}, ref / "model.safetensors")
    rng = np.random.default_rng(0)
    docs = [((rng.integers(0, cfg.vocab) + rng.integers(1, 5) * np.arange(seq + 1)) % cfg.vocab).astype(np.uint16)
            for _ in range(40 * batch)]
    write_indexed(root / "data" / "d", docs)
    steps = 8 if smoke else 20
    return {"ref": ref, "data": root / "data" / "d", "seq": seq, "batch": batch, "smoke": smoke, "steps": steps,
            "save_steps": ",".join(str(steps * k // 4) for k in (1, 2, 3))}


def train_cmd(w: dict, out: Path, steps: int, *extra: str) -> list[str]:
    pdbs = 4 if w["smoke"] else 8
    return [sys.executable, "-m", "retrace", "train", "--reference", str(w["ref"]), "--data", str(w["data"]),
            "--recipe", "160m", "--global-batch", str(w["batch"]), "--seq-length", str(w["seq"]), "--train-iters",
            "1000", "--warmup-iters", "5", "--gpus", "1", "--pdbs", str(pdbs), "--gas", str(w["batch"] // pdbs),
            "--precision", "fp16", "--device", "cpu" if w["smoke"] else "cuda", "--threads", "1",
            "--save-steps", w["save_steps"], "--steps", str(steps), "--out", str(out), *extra]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({r.returncode}):\n{r.stderr[-3000:]}")


def bitwise_equal(a: Path, b: Path) -> dict:
    """Every checkpoint of the two runs, and their final resume states (RNG aside), equal bit for bit."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in (a / "checkpoints").glob("step*.safetensors"))
    ckpt = all((a / "checkpoints" / n).read_bytes() == (b / "checkpoints" / n).read_bytes() for n in names)
    last = max(int(p.name[4:]) for p in (a / "state").iterdir())
    sa, sb = (load_file(str(x / "state" / f"step{last}" / "tensors.safetensors")) for x in (a, b))
    state = all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("rng."))
    return {"checkpoints": names, "checkpoints_equal": ckpt, "state_step": last, "state_equal": state}


def tokens_per_s(out: Path) -> float:
    import pandas as pd

    log = pd.read_parquet(out / "train_log.parquet")
    return float(log["tokens_per_s"].iloc[2:].median())


def determinism(w: dict, root: Path) -> dict:
    steps = w["steps"]
    a, b, c = root / "det_a", root / "det_b", root / "nondet"
    for out in (a, b):
        run(train_cmd(w, out, steps))
    run(train_cmd(w, c, steps, "--no-deterministic"))
    res = {"steps": steps, "deterministic": bitwise_equal(a, b), "nondeterministic_vs_deterministic": bitwise_equal(a, c),
           "tokens_per_s": {"deterministic": tokens_per_s(a), "nondeterministic": tokens_per_s(c)}}
    t = res["tokens_per_s"]
    res["deterministic_cost"] = t["nondeterministic"] / t["deterministic"]
    res["pass"] = res["deterministic"]["checkpoints_equal"] and res["deterministic"]["state_equal"]
    env = json.loads((a / "run.json").read_text())["attempts"][-1]["environment"]
    res["environment"] = {k: env.get(k) for k in ("gpu", "driver", "nccl", "cuda", "torch", "sdpa", "numerics")}
    print(f"determinism: bitwise {res['pass']}, deterministic mode costs x{res['deterministic_cost']:.3f} in "
          f"tokens/s, SDPA {env.get('sdpa', {}).get('backend')}", flush=True)
    return res


def resume(w: dict, root: Path) -> dict:
    steps, out = w["steps"], root / "killed"
    env = dict(ENV, RETRACE_TEST_STEP_DELAY="0.2")
    proc = subprocess.Popen(train_cmd(w, out, steps), env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step "):
            break
    time.sleep(0.5)  # a few steps later, in the middle of one
    proc.send_signal(signal.SIGUSR2)
    proc.stderr.read()
    code = proc.wait(timeout=600)
    stopped = max(int(p.name[4:]) for p in (out / "state").iterdir())
    run(train_cmd(w, out, steps))
    res = {"exit_status": code, "stopped_at": stopped, **bitwise_equal(root / "det_a", out)}
    res["pass"] = code == 128 + signal.SIGUSR2 and 0 < stopped < steps and res["checkpoints_equal"] and res["state_equal"]
    print(f"kill-and-resume: stopped at {stopped} (status {code}), bitwise {res['pass']}", flush=True)
    return res


# ---- memory: replicated vs ZeRO-1 on two ranks of the one GPU ---------------------------------------------
def _memory_rank(rank: int, port: int, zero1: bool, smoke: bool, q) -> None:
    import torch.distributed as dist

    from retrace.model import GPTNeoX, ModelConfig, init_weights, pythia_config
    from retrace.pythia.recipes import recipe_for
    from retrace.train.engine import BuiltinEngine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # gloo: two ranks may share one GPU
    dev = torch.device("cpu" if smoke else "cuda", 0)
    cfg = ModelConfig(n_layers=2, hidden=64, heads=4, vocab=512, seq_len=64) if smoke else \
        pythia_config("410m", seq_len=512)
    model = GPTNeoX(cfg)
    init_weights(model, 0)
    eng = BuiltinEngine(model, recipe_for("410m", global_batch=2, seq_length=64), "fp16", gas=1, device=dev,
                        world_size=2, zero1=zero1, rank=rank)
    x = torch.randint(0, cfg.vocab, (1, 65 if smoke else 513), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        eng.forward_backward(x)
        eng.step()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    q.put({"rank": rank, "zero1": zero1, "max_memory_allocated": peak, "optimizer_bytes": eng.optimizer_bytes(),
           "n_params": sum(g.numel for g in eng.groups)})
    dist.destroy_process_group()


def memory(smoke: bool) -> dict:
    import torch.multiprocessing as mp

    from retrace.train.distributed import free_port

    ctx = mp.get_context("spawn")
    res = {}
    for zero1 in (False, True):
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_memory_rank, args=(r, port, zero1, smoke, q)) for r in range(2)]
        for p in procs:
            p.start()
        got = sorted((q.get(timeout=600) for _ in procs), key=lambda d: d["rank"])
        for p in procs:
            p.join(timeout=60)
        res["zero1" if zero1 else "replicated"] = got[0]
    rep, z = res["replicated"], res["zero1"]
    n = rep["n_params"]
    def state(r):  # master and moments (the workspace shrinks with the shard too, but is not state)
        return r["optimizer_bytes"]["total"] - r["optimizer_bytes"]["workspace"]

    saved = state(rep) - state(z)
    res["optimizer_bytes_saved_per_param"] = saved / n
    res["pass"] = 5.5 < saved / n < 6.5  # 12·N·(1 − 1/2) bytes: the master and the moments halved
    if rep["max_memory_allocated"] is not None:
        res["max_memory_saved_per_param"] = (rep["max_memory_allocated"] - z["max_memory_allocated"]) / n
    print(f"memory: ZeRO-1 over 2 ranks saves {saved / n:.2f} B/param of optimizer state"
          + (f", {res['max_memory_saved_per_param']:.2f} B/param of peak" if "max_memory_saved_per_param" in res else ""),
          flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script, not the GPU")
    p.add_argument("--skip", action="append", default=[], choices=("speed", "determinism", "resume", "memory"))
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no GPU visible (use --smoke on a CPU)", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    t0 = time.perf_counter()
    report: dict = {"smoke": args.smoke, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else None}
    def section(name, fn, *a):
        """One section; a failure is recorded (and fails the check) without losing the other figures."""
        if name in args.skip:
            return
        try:
            report[name] = fn(*a)
        except Exception as exc:  # noqa: BLE001 - the point is to report every section
            report[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: FAILED: {exc}", file=sys.stderr, flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # keep what is done so far

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        section("speed", speed, args.smoke)
        if not {"determinism", "resume"} <= set(args.skip):
            w = make_world(root, args.smoke)
            section("determinism", determinism, w, root)
            section("resume", resume, w, root)
        section("memory", memory, args.smoke)
    report["seconds"] = time.perf_counter() - t0
    report["pass"] = all(v.get("pass", True) for v in report.values() if isinstance(v, dict))
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check: {'PASS' if report['pass'] else 'FAIL'} in {report['seconds']:.0f} s; figures in {args.out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
