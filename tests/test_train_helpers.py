"""Shared fixtures of the trainer tests (no tests here): a 2-layer Pythia-shaped reference, a small token
stream, and the kill-and-resume check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

TINY = dict(n_layers=2, hidden=32, heads=4, vocab=128, seq_len=64)


def tiny_config(**over):
    from retrace.model import ModelConfig

    return ModelConfig(**{**TINY, **over})


def make_reference(path: Path, seed: int = 0, **over) -> Path:
    """A HF-layout directory (config.json + model.safetensors, fp16) holding a v1.0-initialised tiny model."""
    from retrace.checkpoints import save_params
    from retrace.model import GPTNeoX, config_to_hf, init_weights

    cfg = tiny_config(**over)
    model = GPTNeoX(cfg)
    init_weights(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype="float16", hidden_act="gelu")))
    save_params({k: v.half() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


def make_data(prefix: Path, seq_length: int, items: int, vocab: int = 128, seed: int = 0) -> Path:
    """A preshuffled-style stream: ``items`` documents of ``seq_length + 1`` tokens, with some structure
    (a noisy repeating pattern) so that the loss moves."""
    from retrace.data.indexed import write_indexed

    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(items):
        start = int(rng.integers(0, vocab))
        step = int(rng.integers(1, 5))
        base = (start + step * np.arange(seq_length + 1)) % vocab
        noise = rng.random(seq_length + 1) < 0.1
        base[noise] = rng.integers(0, vocab, noise.sum())
        docs.append(base.astype(np.uint16))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_indexed(prefix, docs, dtype=np.uint16)
    return prefix


def load_ckpt(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


B, SEQ = 8, 32


def argv(root: Path, out: str, steps: int, gpus: int = 1, pdbs: int = 4, gas: int = 2, precision="fp16"):
    return [sys.executable, "-m", "retrace", "train", "--reference", str(root / "ref"),
            "--data", str(root / "data" / "tiny"), "--recipe", "70m", "--global-batch", str(B),
            "--seq-length", str(SEQ), "--train-iters", "100", "--lr", "2e-3", "--gpus", str(gpus), "--pdbs",
            str(pdbs), "--gas", str(gas), "--precision", precision, "--threads", "1", "--steps", str(steps),
            "--out", str(root / out)]


def masters(out: Path, step: int, name: str = "tensors") -> dict[str, torch.Tensor]:
    """The resume state's tensors (fp32 master, Adam moments, RNG) at ``step``."""
    return load_file(str(out / "state" / f"step{step}" / f"{name}.safetensors"))


def kill_mid_run(cmd: list[str], min_step: int = 1) -> tuple[int, str]:
    env = dict(os.environ, RETRACE_TEST_STEP_DELAY="0.1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= min_step:
            break
        assert time.monotonic() < deadline
    time.sleep(0.35)  # a few steps later, in the middle of one
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    return proc.wait(timeout=120), "".join(lines) + rest


def check_sigterm_then_restart(world: Path, gpus: int) -> None:
    steps = 20
    pdbs, gas = (4, 2) if gpus == 1 else (2, 2)
    ref_out, out = f"ref{gpus}", f"killed{gpus}"
    # uninterrupted
    r = subprocess.run(argv(world, ref_out, steps, gpus, pdbs, gas), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # killed with a real SIGTERM mid-run (once the progress line shows step 1, plus a few steps) ...
    code, err = kill_mid_run(argv(world, out, steps, gpus, pdbs, gas))
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert not (world / out / "checkpoints" / "manifest.json").exists()
    saved = sorted(int(p.name[4:]) for p in (world / out / "state").iterdir())
    stopped_at = saved[-1]
    assert 1 <= stopped_at < steps, saved
    # ... and restarted with the same command
    r = subprocess.run(argv(world, out, steps, gpus, pdbs, gas), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_ckpt(world / ref_out / "checkpoints" / f"step{steps}.safetensors"), \
        load_ckpt(world / out / "checkpoints" / f"step{steps}.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one replicated state, or (builtin ZeRO-1 with several ranks) one shard per rank
    names = ["tensors"] if gpus == 1 else [f"rank{r}" for r in range(gpus)]
    for name in names:
        ma, mb = masters(world / ref_out, steps, name), masters(world / out, steps, name)
        assert all(torch.equal(ma[k], mb[k]) for k in ma if not k.startswith("rng.")), name
    ja = json.loads((world / ref_out / "checkpoints" / "manifest.json").read_text())
    jb = json.loads((world / out / "checkpoints" / "manifest.json").read_text())
    assert ja["steps"] == jb["steps"]
    assert [f["sha256"] for f in ja["files"]] == [f["sha256"] for f in jb["files"]]
    import pandas as pd

    la, lb = pd.read_parquet(world / ref_out / "train_log.parquet"), pd.read_parquet(world / out / "train_log.parquet")
    assert list(lb["step"]) == list(range(1, steps + 1))
    assert la["loss"].tolist() == lb["loss"].tolist()
    run = json.loads((world / out / "run.json").read_text())
    assert len(run["attempts"]) == 2 and run["attempts"][1]["resumed_from"] == stopped_at


