"""Per-step fingerprints of a run: which batch it trained on, and which weights it holds after the step.

Two columns of the train log (``LOG_COLUMNS``), one value per step:

``batch_hash``
    ``retrace.data.batch_hash`` of the tokens the step trained on: each rank digests the samples it
    actually fed the model, keyed by their position in the global batch (item − B·step), and the
    digests are put in that order (gathered over the ranks when they are separate processes), so the
    value does not depend on gpus × pdbs × gas. ``retrace batch --hash`` prints it from the data alone.

``param_fp``
    an exact integer checksum of the weights after the step, as the run holds them (the fp16 weights
    under fp16): the bits of each tensor (by name) read as unsigned 16-bit words x_i (an fp32 weight is
    two), in chunks of 2^20, with s1 = Σ x_i and s2 = Σ (i+1)·x_i per chunk — exact int64 sums, so the value is the
    same whatever order a GPU reduces in; the chunk sums are hashed with the names into 128 bits. Equal
    weights always give equal values; any single changed bit changes s1. It runs on the weights'
    device, one transfer of the chunk sums per step (``benchmarks/fingerprints.py`` measures its cost).

Two runs are bit-identical through step s if their ``param_fp`` agree at every step up to s
(``retrace diverge``: the first step where they do not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from retrace.data.batch_hash import DIGEST_BYTES, combine, sample_digest

#: The train-log columns this module fills.
LOG_COLUMNS = ("batch_hash", "param_fp")
#: 16-bit words per checksum chunk: (2^16 − 1) · 2^20 · 2^20 < 2^63, so a chunk's s2 never overflows.
CHUNK = 1 << 20
#: Chunks per slab: bounds the int64 working copy to 8 B × 2^26 = 512 MiB per slab.
SLAB = 64


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _positions(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(1, CHUNK + 1, dtype=torch.int64, device=device)
    return _WEIGHTS[device]


def _chunk_sums(t: torch.Tensor) -> torch.Tensor:
    """[n_chunks, 2] int64: (s1, s2) of each chunk of ``t``'s bits as unsigned 16-bit words. A slab of
    ``SLAB`` whole chunks is one [chunks, CHUNK] matrix (a few kernels per slab, not per chunk)."""
    flat = t.detach().contiguous().reshape(-1)
    bits = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    pos = _positions(bits.device)
    out = []
    n = bits.numel()
    whole = n - n % CHUNK
    for start in range(0, whole, SLAB * CHUNK):  # whole chunks, a slab at a time
        x = (bits[start:min(start + SLAB * CHUNK, whole)].to(torch.int64) & 0xFFFF).view(-1, CHUNK)
        out.append(torch.stack((x.sum(dim=1), (x * pos).sum(dim=1)), dim=1))
    if whole < n:  # the last, partial chunk (most tensors of a small model are one)
        x = bits[whole:].to(torch.int64) & 0xFFFF
        out.append(torch.stack((x.sum(), (x * pos[: n - whole]).sum())).view(1, 2))
    if not out:
        return torch.zeros((0, 2), dtype=torch.int64, device=bits.device)
    return torch.cat(out)


def param_fingerprint(params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The exact checksum of named weights (any device), as 32 hex digits."""
    named = sorted(params, key=lambda kv: kv[0])
    sums = [_chunk_sums(t) for _, t in named]
    h = hashlib.blake2b(digest_size=16)
    flat = torch.cat(sums).cpu().numpy() if sums else np.zeros((0, 2), dtype=np.int64)  # one transfer
    row = 0
    for (name, t), s in zip(named, sums, strict=True):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(flat[row:row + len(s)].astype("<i8").tobytes())
        row += len(s)
    return h.hexdigest()


class StepFingerprints:
    """Collects one step's fingerprints inside the training loop.

    ``saw(step, ids, tokens)`` after reading each micro-batch; after the optimizer step, ``take()`` hands
    over this rank's digests (the trainer exchanges them over the ranks together with the loss:
    ``pack``/``unpack``) and ``row(engine, digests)`` returns the log columns from all of them. ``is_main``:
    only it computes ``param_fp`` (the weights are the same on every rank); the others log None.
    """

    def __init__(self, global_batch: int, *, is_main: bool = True):
        self.global_batch = global_batch
        self.is_main = is_main
        self._digests: dict[int, bytes] = {}

    def saw(self, step: int, ids, tokens) -> None:
        rows = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        for item, row in zip(np.asarray(ids).tolist(), rows, strict=True):
            self._digests[int(item) - self.global_batch * step] = sample_digest(row)

    def take(self) -> dict[int, bytes]:
        """This rank's digests of the step (position in the global batch → digest); starts the next step."""
        digests, self._digests = self._digests, {}
        return digests

    def row(self, engine, digests: dict[int, bytes]) -> dict[str, str | None]:
        """The log columns, from every rank's digests of the step."""
        if sorted(digests) != list(range(self.global_batch)):
            raise RuntimeError(f"batch fingerprint: saw {len(digests)} of {self.global_batch} samples")
        batch = combine(digests[i] for i in range(self.global_batch))
        params = param_fingerprint(engine.iter_params()) if self.is_main else None
        return {"batch_hash": batch, "param_fp": params}


#: bytes of one sample's entry in ``pack``: its position (int64) and its digest
_ENTRY = 8 + DIGEST_BYTES


def pack(values: Sequence[float], digests: dict[int, bytes]) -> np.ndarray:
    """One rank's part of a step's exchange as bytes: float64 ``values``, then (position, digest) pairs in
    position order. Every rank packs as many values and samples (pdbs·gas), so the parts are one size and
    a single tensor all_gather exchanges them."""
    head = np.asarray(values, dtype="<f8").tobytes()
    body = b"".join(int(i).to_bytes(8, "little") + digests[i] for i in sorted(digests))
    return np.frombuffer(bytearray(head + body), dtype=np.uint8)  # writable: torch.from_numpy takes it as is


def unpack(part: np.ndarray, n_values: int) -> tuple[list[float], dict[int, bytes]]:
    """``pack``'s inverse."""
    raw = part.tobytes()
    values = np.frombuffer(raw[: 8 * n_values], dtype="<f8").tolist()
    body = raw[8 * n_values:]
    digests = {int.from_bytes(body[k:k + 8], "little"): body[k + 8:k + _ENTRY] for k in range(0, len(body), _ENTRY)}
    return values, digests
