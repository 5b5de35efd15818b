"""Streamed safetensors writes (retrace.train.tensorfile): the bytes safetensors and save_params agree on,
the sha256 computed while writing, piece by piece, and nothing left behind on failure."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from retrace.checkpoints import save_params
from retrace.checkpoints.names import canonical_order
from retrace.errors import RetraceError
from retrace.train.tensorfile import write_tensors
from test_train_helpers import tiny_config


def _weights(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*s, generator=g).to(dtype) for n, s in tiny_config().param_shapes().items()}


@pytest.mark.parametrize("piece", [1 << 20, 100, 7])
def test_checkpoint_bytes_equal_save_params_and_the_hash_is_of_the_file(tmp_path, piece):
    """fp32 weights cast to fp16 while streamed, in canonical order, equal save_params of the fp16 copy."""
    w = _weights()
    want = save_params({k: v.half() for k, v in w.items()}, tmp_path / "ref.safetensors",
                       metadata={"step": "3", "producer": "test"})
    sha = write_tensors(tmp_path / "got.safetensors", [(n, w[n]) for n in canonical_order(w)], dtype=torch.float16,
                        sort=False, metadata={"step": "3", "producer": "test"}, piece_bytes=piece)
    got = (tmp_path / "got.safetensors").read_bytes()
    assert got == want.read_bytes()
    assert sha == hashlib.sha256(got).hexdigest()


def test_state_with_mixed_dtypes_reads_back_exactly(tmp_path):
    t = {"group0.master": torch.randn(1001), "rng.torch": torch.get_rng_state(),
         "rng.numpy.keys": torch.arange(624, dtype=torch.int64), "flag": torch.tensor([True, False]),
         "half": torch.randn(3, 5).half(), "bf": torch.randn(17).bfloat16(), "empty": torch.zeros(0)}
    sha = write_tensors(tmp_path / "s.safetensors", t.items(), piece_bytes=64)
    back = load_file(str(tmp_path / "s.safetensors"))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    assert sha == hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()


def test_non_contiguous_views_are_written_by_value(tmp_path):
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    write_tensors(tmp_path / "v.safetensors", {"t": base.t(), "slice": base[:, 1:3]}, piece_bytes=8)
    back = load_file(str(tmp_path / "v.safetensors"))
    assert torch.equal(back["t"], base.t()) and torch.equal(back["slice"], base[:, 1:3])


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(RetraceError, match="cannot store"):
        write_tensors(path, {"a": torch.zeros(3), "c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(RetraceError, match="duplicate"):
        write_tensors(path, [("a", torch.zeros(1)), ("a", torch.zeros(1))])
    meta = torch.zeros(4, device="meta")  # its header entry is written, its data cannot be read
    with pytest.raises(RetraceError, match="could not write"):
        write_tensors(path, [("ok", torch.ones(1000)), ("bad", meta)])
    assert list(tmp_path.iterdir()) == []
