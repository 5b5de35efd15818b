"""The device a cell trains on (never a silent CPU fallback, the GPU its gpu_type names, the device type in the
resume fingerprint), deterministic mode, and run.json's record of what changes GPU numerics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrace.errors import RetraceError
from retrace.train import TrainConfig, train
from retrace.train.device import check_gpu_name, gpu_name_matches, select_device
from test_train_helpers import SEQ, B


@pytest.mark.parametrize(("device", "name", "ok"), [
    ("NVIDIA A100-SXM4-80GB", "a100", True),
    ("NVIDIA A100-SXM4-80GB", "a100_80gb", True),
    ("NVIDIA A100-SXM4-80GB", "nvidia_a100-sxm4-80gb", True),
    ("NVIDIA A100-SXM4-40GB", "a100_80gb", False),
    ("NVIDIA A100 80GB PCIe", "a100", True),
    ("NVIDIA A100-SXM4-80GB", "a10", False),
    ("NVIDIA A40", "a40", True),
    ("NVIDIA A40", "a4", False),
    ("NVIDIA H100 80GB HBM3", "h100", True),
    ("Quadro RTX 6000", "rtx6000", True),
    ("Tesla V100-SXM2-32GB", "v100", True),
    ("NVIDIA GeForce RTX 4090", "a100", False),
    ("NVIDIA A100-SXM4-80GB", "", False),
])
def test_gpu_names_match_word_by_word(device, name, ok):
    assert gpu_name_matches(device, name) is ok


def test_the_wrong_gpu_is_one_error_naming_both():
    check_gpu_name("NVIDIA A40", ["a40", "a40_48gb"])
    check_gpu_name("NVIDIA A40", None)  # nothing asked: any GPU
    with pytest.raises(RetraceError, match=r"the GPU is 'NVIDIA A40', but the cell asks for a100 / a100_80gb"):
        check_gpu_name("NVIDIA A40", ["a100", "a100_80gb"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_cell_never_falls_back_to_the_cpu(world):
    with pytest.raises(RetraceError, match="no GPU is usable.*never falls back"):
        select_device("cuda", local_rank=0)
    cfg = TrainConfig(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / "cuda"),
                      steps=2, recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, pdbs=8, gas=1,
                      threads=1, progress=False, device="cuda", gpu_names=["a100"])
    with pytest.raises(RetraceError, match="no GPU is usable"):
        train(cfg)
    assert not (world / "cuda" / "state").exists()
    assert select_device("auto", local_rank=3) == torch.device("cpu")


def _cfg(world, out, steps=2, **over):
    kw = dict(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / out), steps=steps,
              recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, pdbs=8, gas=1,
              precision="fp16", threads=1, progress=False, device="cpu")
    kw.update(over)
    return TrainConfig(**kw)


def test_the_device_type_is_part_of_the_resume_fingerprint(world):
    """A state written on one device type is refused on the other (here: one marked as written on cuda)."""
    cfg = _cfg(world, "fp_device", steps=2)
    train(cfg)
    state = world / "fp_device" / "state" / "step2" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["fingerprint"]["device"] == "cpu"
    meta["fingerprint"]["device"] = "cuda"
    state.write_text(json.dumps(meta))
    (world / "fp_device" / "checkpoints" / "manifest.json").unlink()
    with pytest.raises(RetraceError, match=r"different run \(differs in: device\)"):
        train(_cfg(world, "fp_device", steps=4))


def test_run_json_records_what_changes_gpu_numerics(world, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    train(_cfg(world, "env_flash"))
    train(_cfg(world, "env_global", attention="global", deterministic=False))
    assert torch.are_deterministic_algorithms_enabled() == before  # restored after the run
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    flash = json.loads((world / "env_flash" / "run.json").read_text())
    env = flash["attempts"][-1]["environment"]
    assert flash["deterministic"] is True
    num = env["numerics"]
    assert num["deterministic_mode"] is True and num["deterministic_algorithms"] is True
    assert num["cublas_workspace_config"] == ":4096:8" and num["tf32_matmul"] is False
    assert num["cudnn_deterministic"] is True and num["tf32_cudnn"] is False
    assert {"fp16_reduced_precision_reduction", "bf16_reduced_precision_reduction",
            "float32_matmul_precision", "sdpa_enabled"} <= set(num)
    assert env["nccl_env"]["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["nccl_env"]["NCCL_ALGO"] == "Ring" and env["nccl_env"]["NCCL_PROTO"] == "Simple"
    assert {"driver", "nccl", "gpu", "cuda_driver_api", "gpus"} <= set(env)  # None/empty on this CPU machine
    # the SDPA kernel the cell's attention really dispatched to, forward and backward
    assert env["sdpa"]["backend"] == "flash (CPU kernel)", env["sdpa"]
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in env["sdpa"]["autograd_nodes"]
    glob = json.loads((world / "env_global" / "run.json").read_text())["attempts"][-1]["environment"]
    assert glob["sdpa"]["backend"] is None and glob["numerics"]["deterministic_algorithms"] is before
    assert "NCCL_ALGO" not in glob["nccl_env"]  # not deterministic: nothing pinned


def test_deterministic_mode_leaves_a_users_nccl_choice(monkeypatch):
    from retrace.train import determinism

    monkeypatch.setenv("NCCL_ALGO", "Tree")
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    restore = determinism.apply(deterministic=True)
    try:
        assert os.environ["NCCL_ALGO"] == "Tree" and os.environ["NCCL_PROTO"] == "Simple"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        restore()
    assert os.environ["NCCL_ALGO"] == "Tree" and "NCCL_PROTO" not in os.environ


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter: what a rank process imports, not what this test process has."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "workflow")})


def test_sdpa_probe_names_the_cpu_flash_kernels_without_importing_dynamo():
    """The main rank's SDPA record comes from the autograd graph, not a TorchDispatchMode, which would import
    torch._dynamo (1.4 s of CPU while every other rank waits); the math path is told apart."""
    code = """
import sys, torch
from retrace.train.environment import sdpa_backend
rec = sdpa_backend(attention="flash", device=torch.device("cpu"), dtype=torch.float16, heads=2, seq_len=16,
                   head_dim=8)
assert rec["backend"] == "flash (CPU kernel)", rec
assert "ScaledDotProductFlashAttentionForCpuBackward0" in rec["autograd_nodes"], rec
assert "torch._dynamo" not in sys.modules, "dynamo imported"
from torch.nn.attention import SDPBackend, sdpa_kernel
with sdpa_kernel([SDPBackend.MATH]):
    math = sdpa_backend(attention="flash", device=torch.device("cpu"), dtype=torch.float32, heads=2, seq_len=16,
                        head_dim=8)
assert math["backend"] == "math", math
print("ok")
"""
    r = _fresh_python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_deterministic_mode_is_torchs_own_setting_without_importing_inductor():
    """apply() sets what torch.use_deterministic_algorithms sets, but loads no TorchInductor/dynamo (1.4 s of
    CPU per rank process); where inductor is loaded, its deterministic flag follows too."""
    code = """
import sys, torch
from retrace.train import determinism
restore = determinism.apply(deterministic=True)
assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
assert "torch._dynamo" not in sys.modules and "torch._inductor.config" not in sys.modules, "inductor imported"
restore()
assert not torch.are_deterministic_algorithms_enabled()
import torch._inductor.config as inductor
determinism.set_algorithms(True, warn_only=True)
assert inductor.deterministic is True and torch.is_deterministic_algorithms_warn_only_enabled()
determinism.set_algorithms(False)
assert inductor.deterministic is False and not torch.are_deterministic_algorithms_enabled()
print("ok")
"""
    r = _fresh_python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
