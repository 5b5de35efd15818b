"""The batch hash: which tokens a training step consumed, independent of how the batch was split.

sha256 over the per-sample digests in global sample order; a sample's digest is blake2b-128 of its
``seq_length + 1`` token ids as little-endian int64. Global sample order is the item order of the step,
items [B·s, B·(s+1)) (``retrace.data.order.batch_items`` with the whole step), so gpus × pdbs × gas does
not change it. The trainer digests each sample as it feeds it (``retrace.train.fingerprints``);
``retrace batch --hash STEP`` computes the same value from the data alone. Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

#: bytes of one sample's digest
DIGEST_BYTES = 16


def sample_digest(tokens: np.ndarray) -> bytes:
    """blake2b-128 of one sample's token ids (little-endian int64)."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i8").tobytes(), digest_size=DIGEST_BYTES).digest()


def combine(digests: Iterable[bytes]) -> str:
    """The batch hash from the per-sample digests in global sample order."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def batch_hash(tokens: np.ndarray) -> str:
    """The batch hash of a whole global batch: ``[B, seq_length + 1]`` token ids in global sample order."""
    return combine(sample_digest(row) for row in np.asarray(tokens))
