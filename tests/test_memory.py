"""Memory: the optimizer step's measured peak on CPU, and the per-GPU memory model (retrace.memory).

The step's peak is measured in a fresh subprocess (tests/memory_probe.py: VmHWM reset through
/proc/self/clear_refs around the call), since torch's CPU allocations are invisible to tracemalloc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrace.errors import RetraceError
from retrace.memory import GIB, cell_memory
from retrace.model import ModelConfig, pythia_config

PROBE = Path(__file__).with_name("memory_probe.py")
A40 = 48 * 10**9


# glibc's default mmap threshold grows once a large block is freed, after which large tensors come from the
# heap and a freed one stays resident: the RSS peak then counts the heap's slack, which differs between
# machines (a checkpointed forward/backward measured 1.39x its live peak here and 1.51x on CI). A fixed
# threshold turns that off (mallopt(3), M_MMAP_THRESHOLD): every tensor over 64 KiB is its own mapping,
# returned to the kernel when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, **MALLOC_ENV})
    return json.loads(out.stdout)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_optimizer_step_peak_bytes_per_param():
    """fp16: weights 2 + grads 2 + master 4 + moments 8 = 16 B/param resident, plus the fixed workspace;
    the step itself allocates (almost) nothing more (the unchunked step had three fp32 temporaries: ~28)."""
    r = probe("--hidden", "512", "--layers", "4", "--vocab", "8192", "--chunk", str(1 << 20))
    n = r["n_params"]
    assert r["persistent_b_per_param"] == 16.0
    assert r["workspace_bytes"] <= 16 << 20  # max(two 1M-element chunks, one 4M-element norm piece) × 4 B
    assert r["transient_b_per_param"] < 0.25, r
    assert r["peak_b_per_param"] < 16 + (16 << 20) / n + 0.25
    print(f"\noptimizer step peak: {r['peak_b_per_param']:.2f} B/param (N={n}; transient "
          f"{r['transient_b_per_param']:.3f} B/param, workspace {r['workspace_bytes'] / n:.3f} B/param)",
          file=sys.stderr)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_saves_stream_without_a_host_copy(tmp_path):
    """A save step's writes add almost nothing to the resident peak: the resume state (fp32 master and
    moments, 12 B/param) and the fp16 checkpoint are streamed in pieces of at most 64 MiB, where the old
    checkpoint path (export_params, then save_params) first copied every weight (2 B/param), measured
    in the same run (≈ 0.95 B/param of new resident memory here). On a GPU the old state path copied the whole state to the host too (16 B/param)."""
    common = ["--hidden", "384", "--layers", "4", "--vocab", "8192", "--out", str(tmp_path)]
    state = probe(*common, "--what", "save_state")
    ckpt = probe(*common, "--what", "save_checkpoint")
    old = probe(*common, "--what", "export_checkpoint")
    n = state["n_params"]
    print(f"\nsave transients (N={n}): state streamed {state['transient_b_per_param']:.3f} B/param, checkpoint "
          f"streamed {ckpt['transient_b_per_param']:.3f} B/param, checkpoint via export_params "
          f"{old['transient_b_per_param']:.2f} B/param", file=sys.stderr)
    assert state["transient_b_per_param"] < 0.25, state
    assert ckpt["transient_b_per_param"] < 0.25, ckpt
    # the baseline really holds a copy of the weights (up to 2 B/param; part of it lands in pages already
    # resident), far above the streamed writes
    assert old["transient_b_per_param"] > max(0.5, 20 * ckpt["transient_b_per_param"]), old


def test_pythia_2p8b_on_a40s_fits_with_zero1_not_replicated():
    m = pythia_config("2.8b")
    for dp in (8, 16):  # 8×A40 pdbs 8 gas 16; 16×A40 pdbs 8 gas 8
        z = cell_memory(model=m, pdbs=8, seq_len=2048, dp=dp, precision="fp16", zero1=True,
                        checkpoint_activations=True)
        rep = cell_memory(model=m, pdbs=8, seq_len=2048, dp=dp, precision="fp16", zero1=False,
                          checkpoint_activations=True)
        assert z.fits(A40) and not rep.fits(A40), (dp, z.total, rep.total)
        assert rep.model_states > A40 * 0.9  # replicated: 16 B/param of model states alone ≈ 44 GB
    no_ckpt = cell_memory(model=m, pdbs=8, seq_len=2048, dp=8, zero1=True, checkpoint_activations=False)
    assert not no_ckpt.fits(A40)  # Pythia checkpointed activations from 70m up for a reason


def test_breakdown_arithmetic():
    m = pythia_config("1.4b")
    n = m.n_params
    rep = cell_memory(model=m, pdbs=1, seq_len=2048, dp=4, zero1=False, context_bytes=0, fragmentation=0.0)
    z = cell_memory(model=m, pdbs=1, seq_len=2048, dp=4, zero1=True, context_bytes=0, fragmentation=0.0)
    assert rep.weights == rep.gradients == 2 * n and rep.master == 4 * n and rep.moments == 8 * n
    assert 12 * n / 4 <= z.master + z.moments <= 12 * (n / 4 + 8)  # 12·N/dp plus the padding
    assert z.activations == rep.activations and z.total < rep.total
    f32 = cell_memory(model=m, pdbs=1, seq_len=2048, dp=1, precision="fp32", zero1=False)
    assert f32.master == 0 and f32.weights == 4 * n  # fp32: the weights are the master
    assert rep.fragmentation == 0 and rep.context == 0
    d = z.to_dict()
    assert d["total"] == z.total == sum(v for k, v in d.items() if k not in ("total", "model_states"))
    with pytest.raises(RetraceError, match="precision"):
        cell_memory(model=m, pdbs=1, seq_len=8, dp=1, precision="fp8")
    with pytest.raises(RetraceError, match="dp"):
        cell_memory(model=m, pdbs=1, seq_len=8, dp=0)
    assert GIB == 1 << 30


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_activation_estimate_against_a_measured_cpu_peak(checkpoint):
    """One fp32 forward/backward of a small model on CPU (explicit 'global' attention, whose scores the
    formula's 5·a·s/h term counts) against the model's activations + logits.

    The formula overestimates this model: it keeps the paper's dropout masks (Pythia's dropout is 0) and
    counts tensors torch's CPU kernels do not keep. 0.73 (plain) and 0.74 (checkpointed) were measured: one
    common factor, so the recomputation is accounted for right. The bounds fail if the estimate ignored
    the recomputation (checkpointed: 0.43) or counted fp32 activations at 2 bytes (plain: 1.15)."""
    args = ["--hidden", "256", "--layers", "4", "--vocab", "4096", "--what", "forward_backward", "--pdbs", "8",
            "--seq", "256", "--precision", "fp32", "--attention", "global"] + (["--checkpoint"] if checkpoint else [])
    measured = probe(*args)["transient_bytes"]
    m = ModelConfig(n_layers=4, hidden=256, heads=4, vocab=4096, seq_len=256)
    est = cell_memory(model=m, pdbs=8, seq_len=256, dp=1, precision="fp32", zero1=False,
                      checkpoint_activations=checkpoint, flash_attention=False, context_bytes=0, fragmentation=0.0)
    ratio = measured / (est.activations + est.logits)
    print(f"\nactivations+logits measured/estimated ({'checkpointed' if checkpoint else 'plain'}): {ratio:.2f}",
          file=sys.stderr)
    assert 0.6 < ratio < 1.1
