"""Training-step speed of retrace's builtin engine, against transformers + torch AdamW in the same run.

One optimizer step = ``gas`` micro-batches of ``batch × seq`` tokens (forward, token-mean CE in fp32,
backward) then the update. Both sides get the same shape, batch, threads and data:

  retrace       retrace.model.GPTNeoX + retrace.train.engine.BuiltinEngine (flat buffers, apex-FusedAdam
                update, DeepSpeed-style clip/unscale; in fp16 also the fp32 master copy and loss scale)
  transformers  GPTNeoXForCausalLM (SDPA attention) + torch.optim.AdamW (foreach), the same weight-decay
                groups, clip_grad_norm_(1.0); in fp16/bf16 torch.autocast with an fp32 model

The two are timed alternately (``--rounds`` rounds of ``--steps`` steps each, after ``--warmup``), and the
median step time of each is reported with the ratio retrace / transformers (goal ≤ 1.0).

On a GPU (``--device cuda``) it also prints tokens/s and MFU = (6·N + 12·L·h·T) · tokens/s / peak, where N
counts every matmul parameter (all but the input embedding), the second term is attention's QKᵀ and PV
(forward + backward, no causal saving), and peak defaults to 989 TFLOP/s (H100 SXM dense bf16/fp16).

    python benchmarks/train_step.py                                  # CPU, tiny shape, fp32, vs transformers
    python benchmarks/train_step.py --shape 14m --seq 256 --batch 8
    python benchmarks/train_step.py --device cuda --shape 160m --precision fp16 --attention flash
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from retrace.model import GPTNeoX, ModelConfig, config_to_hf, init_weights, lm_loss, pythia_config
from retrace.pythia.recipes import recipe_for
from retrace.train.engine import BuiltinEngine
from retrace.train.optim import decay_groups

SHAPES = {
    "tiny": dict(n_layers=2, hidden=64, heads=4, vocab=512),  # the shape of reference/torch-deepspeed-cpu.md
}


def model_config(shape: str, seq: int, attention: str) -> ModelConfig:
    if shape in SHAPES:
        return ModelConfig(**SHAPES[shape], seq_len=max(seq, 64), attention=attention)
    return pythia_config(shape, attention=attention, seq_len=max(seq, 2048))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class RetraceSide:
    name = "retrace"

    def __init__(self, cfg, precision, device, gas, ckpt):
        model = GPTNeoX(cfg, checkpoint_activations=ckpt)
        init_weights(model, 0)
        r = recipe_for("70m", lr=1e-4, warmup_iters=0)
        self.engine = BuiltinEngine(model, r, precision, gas=gas, device=device, lr_iter=10)
        self.gas = gas

    def step(self, batches):
        for x in batches:
            self.engine.forward_backward(x)
        self.engine.step()


class HFSide:
    name = "transformers"

    def __init__(self, cfg, precision, device, gas, ckpt):
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        hf = config_to_hf(cfg)
        hf_cfg = GPTNeoXConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
        hf_cfg._attn_implementation = "sdpa"
        self.model = GPTNeoXForCausalLM(hf_cfg).to(device)
        if ckpt:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        groups = decay_groups(self.model, 0.1)
        self.opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                     lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        self.gas = gas
        self.device = device
        self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, batches):
        for x in batches:
            x = x.to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.model(input_ids=x[:, :-1]).logits
            loss = lm_loss(logits, x[:, 1:]) / self.gas
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=False)


def time_steps(side, batches, n, device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        side.step(batches)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    n_matmul = cfg.n_params - cfg.vocab * cfg.hidden  # every parameter but the input embedding
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.hidden * seq


def measure(*, shape: str = "tiny", seq: int | None = None, batch: int | None = None, gas: int = 1,
            precision: str = "fp32", attention: str = "flash", device: str = "cpu", steps: int = 5, rounds: int = 4,
            warmup: int = 2, compare: bool = True, checkpoint_activations: bool = False,
            peak_tflops: float = 989.0) -> dict:
    """Median step time, tokens/s (and MFU on a GPU) of retrace and, with ``compare``, transformers, timed
    alternately in this process; ``ratio`` = retrace / transformers step time."""
    dev = torch.device(device)
    seq = seq or (128 if shape in SHAPES else 2048)
    batch = batch or (16 if shape in SHAPES else 8)
    cfg = model_config(shape, seq, attention)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab, (batch, seq + 1), generator=g).to(dev) for _ in range(gas)]
    tokens = batch * seq * gas
    sides = [RetraceSide(cfg, precision, dev, gas, checkpoint_activations)]
    if compare:
        sides.append(HFSide(cfg, precision, dev, gas, checkpoint_activations))
    for s in sides:
        time_steps(s, batches, warmup, dev)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for _ in range(rounds):
        for s in sides:
            times[s.name] += time_steps(s, batches, steps, dev)
    out = {"shape": shape, "n_params": cfg.n_params, "layers": cfg.n_layers, "hidden": cfg.hidden, "vocab": cfg.vocab,
           "batch": batch, "seq": seq, "gas": gas, "precision": precision, "attention": attention,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "sides": {}}
    for s in sides:
        med = statistics.median(times[s.name])
        side = {"step_s": med, "steps_timed": len(times[s.name]), "tokens_per_s": tokens / med}
        if dev.type == "cuda":
            side["mfu"] = flops_per_token(cfg, seq) * side["tokens_per_s"] / (peak_tflops * 1e12)
        out["sides"][s.name] = side
    if compare:
        out["ratio"] = out["sides"]["retrace"]["step_s"] / out["sides"]["transformers"]["step_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="tiny, or a Pythia size (14m, 70m, 160m, 410m, ...)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128 tiny, 2048 Pythia)")
    p.add_argument("--batch", type=int, default=None, help="micro batch (default 16 tiny, 8 Pythia)")
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--attention", choices=("flash", "global"), default="flash")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: all cores")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compare", action="store_true", help="time retrace only (no transformers baseline)")
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 SXM dense fp16/bf16)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, seq 16, one timed step: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.seq, args.batch, args.steps, args.rounds, args.warmup = "tiny", 16, 2, 1, 1, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(shape=args.shape, seq=args.seq, batch=args.batch, gas=args.gas, precision=args.precision,
                attention=args.attention, device=args.device, steps=args.steps, rounds=args.rounds,
                warmup=args.warmup, compare=not args.no_compare, checkpoint_activations=args.checkpoint_activations,
                peak_tflops=args.peak_tflops)
    print(f"shape {r['shape']} ({r['n_params'] / 1e6:.2f}M params, L{r['layers']} h{r['hidden']} vocab {r['vocab']}), "
          f"batch {r['batch']} x seq {r['seq']} x gas {r['gas']}, {r['precision']}, attention {r['attention']}, "
          f"{r['device']}, torch {r['torch']}")
    for name, side in r["sides"].items():
        line = (f"  {name:<13} step {side['step_s'] * 1e3:9.2f} ms (median of {side['steps_timed']})  "
                f"{side['tokens_per_s']:12,.0f} tokens/s")
        if "mfu" in side:
            line += f"  MFU {100 * side['mfu']:5.1f}%"
        print(line)
    if "ratio" in r:
        print(f"  ratio retrace / transformers = {r['ratio']:.3f}  (goal <= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
