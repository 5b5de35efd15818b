"""Measure resident-memory peaks of the builtin engine on CPU (run as a subprocess; prints JSON).

The peak RSS (VmHWM) is reset through /proc/self/clear_refs ("5") just before the measured call and read
after it; the call's transient bytes are that peak minus the RSS just before. Two warm-up steps first, so
that lazily touched buffers (the Adam workspace) are resident before the measured step; a measured
forward_backward is the process's first (freed activations would otherwise stay resident in the heap). Measures the
engine found on PYTHONPATH (so an older checkout can be measured the same way).

Saves (no step first: the state is filled in place, so no freed heap hides a copy; into ``--out``,
default a temporary directory): ``--what save_state``
writes the engine's resume state as the trainer does (streamed, retrace.train.state.save_tensors);
``--what save_checkpoint`` the fp16 checkpoint as the trainer does (streamed from the weights);
``--what export_checkpoint`` the checkpoint the old way (``save_params(engine.export_params(fp16))``:
a host copy of every weight first).

Usage: memory_probe.py --hidden H --layers L --vocab V [--chunk N]
       [--what step|forward_backward|save_state|save_checkpoint|export_checkpoint]
       [--pdbs B --seq S --precision P --attention flash|global --checkpoint] [--out DIR]
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser()
    for key, default in (("hidden", 512), ("layers", 4), ("vocab", 8192), ("chunk", 0), ("pdbs", 1), ("seq", 8)):
        ap.add_argument(f"--{key}", type=int, default=default)
    ap.add_argument("--what", default="step")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--attention", default="flash")
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from retrace.model import GPTNeoX, ModelConfig
    from retrace.pythia.recipes import recipe_for
    from retrace.train.engine import DTYPES, BuiltinEngine

    torch.set_num_threads(1)
    cfg = ModelConfig(n_layers=a.layers, hidden=a.hidden, heads=max(1, a.hidden // 64), vocab=a.vocab,
                      seq_len=a.seq, attention=a.attention)
    model = GPTNeoX(cfg, checkpoint_activations=a.checkpoint, device="meta", dtype=DTYPES[a.precision])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    r = recipe_for("70m", global_batch=a.pdbs, seq_length=a.seq, train_iters=100, warmup_iters=1)
    kw = {}
    if a.chunk and "chunk_elems" in inspect.signature(BuiltinEngine).parameters:
        kw["chunk_elems"] = a.chunk
    eng = BuiltinEngine(model, r, a.precision, gas=1, **kw)
    n = sum(g.numel for g in eng.groups)
    tokens = torch.randint(0, a.vocab, (a.pdbs, a.seq + 1), generator=torch.Generator().manual_seed(0))
    if a.what.endswith(("_state", "_checkpoint")):  # saves: every buffer resident, no freed heap to reuse
        with torch.no_grad():
            for _, t in eng.iter_state_tensors():
                t.uniform_(0.0, 1.0)
    for _ in range(2 if a.what == "step" else 0):  # forward_backward: the first one, on a fresh heap
        eng.forward_backward(tokens)
        eng.step()
    persistent = 0
    for g in eng.groups:
        for t in {id(x): x for x in (g.model, g.grad, g.master, g.exp_avg, g.exp_avg_sq)}.values():
            persistent += t.numel() * t.element_size()
    workspace = getattr(eng, "workspace", None)
    ws = workspace.numel() * workspace.element_size() if workspace is not None else 0
    if a.what == "step":
        eng.forward_backward(tokens)
    import tempfile

    out = Path(a.out or tempfile.mkdtemp(prefix="probe-"))
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    if a.what == "step":
        eng.step()
    elif a.what == "save_state":
        from retrace.train.state import save_tensors

        save_tensors(out / "saved.safetensors", eng.iter_state_tensors())
    elif a.what == "save_checkpoint":
        from retrace.train.tensorfile import write_tensors

        write_tensors(out / "saved.safetensors", list(eng.iter_params()), dtype=torch.float16)
    elif a.what == "export_checkpoint":
        from retrace.checkpoints import save_params

        save_params(eng.export_params(torch.float16), out / "saved.safetensors")
    else:
        eng.forward_backward(tokens)
    transient = (rss_kib("VmHWM") - before) * 1024
    if a.what.endswith(("_state", "_checkpoint")):
        (out / "saved.safetensors").unlink()
    print(json.dumps({"n_params": n, "persistent_bytes": persistent, "workspace_bytes": ws,
                      "transient_bytes": transient, "persistent_b_per_param": persistent / n,
                      "transient_b_per_param": transient / n,
                      "peak_b_per_param": (persistent + ws + transient) / n}))


if __name__ == "__main__":
    main()
