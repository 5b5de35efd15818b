"""GPT-NeoX v1.0's training order: the doc/sample/shuffle index maps and who reads which item.

``build_index_mappings(sizes, seq_length, seed, num_samples)`` returns the same three arrays, value for
value and dtype for dtype, as v1.0's ``gpt2_dataset._build_index_mappings`` over all documents:

* ``num_epochs`` is the smallest E with ``(E*T - 1) // seq_length >= num_samples`` (T = Σ sizes);
* one ``np.random.RandomState(seed)`` shuffles ``doc_idx`` (E stacked copies of ``arange(N)``, int32,
  epochs mixed together) and then ``shuffle_idx``;
* ``sample_idx`` is int32 ``[S+1, 2]``, S = ``(E*T - 1) // seq_length``: row k is (index into
  ``doc_idx``, token offset) of the start of sample k. Sample k covers stream tokens
  ``[k*L, k*L + L]`` (``L+1`` tokens), so consecutive samples share one token;
* ``shuffle_idx`` is ``arange(S)`` as uint32 (int64 when ``S >= 2**32 - 2``), shuffled.

The C++ helper walks documents one sample at a time. Here the sample index is computed with
vectorised numpy instead: the boundary of sample k sits at stream position ``k*L`` and belongs to the
(non-empty) document whose token range contains it, so each document's boundaries are a contiguous run
of k that ``np.repeat`` lays out, processed in chunks of documents to bound memory. No compiler needed.

Dataset item j (GPT-NeoX ``GPT2Dataset.__getitem__``) is sample ``shuffle_idx[j]``; the dataset has
``S - 1`` items. Item assignment (``batch_items``): step s, micro-step k, data-parallel rank r with micro
batch m and D ranks reads items ``B*s + k*m*D + r*m + [0, m)`` (B = global batch = m*D*gas).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrace.errors import RetraceError
from retrace.io import atomic_path
from retrace.pythia.constants import GLOBAL_BATCH, NUM_SAMPLES_MARGIN, TRAIN_ITERS

#: Name GPT-NeoX gives the (single) training dataset in its index-map file names.
NEOX_TRAIN_NAME = "train_0"

#: Refuse to build maps larger than this, or needing more epochs than this, unless asked: a forgotten
#: num_samples (Pythia's 147M by default) on a tiny corpus would otherwise need ~10^5 epochs. Pythia's
#: own maps need 1-2 epochs and ~3.5 GB.
DEFAULT_MAX_MAP_BYTES = 16 << 30
DEFAULT_MAX_EPOCHS = 1000

_DOC_CHUNK = 1 << 22  # documents per chunk in build_sample_idx


def neox_num_samples(train_iters: int, global_batch: int = GLOBAL_BATCH, weight: float = 1.0) -> int:
    """GPT-NeoX's sample count for one weighted training dataset: ceil(iters·batch·weight·1.005)."""
    return int(math.ceil(train_iters * global_batch * weight * NUM_SAMPLES_MARGIN))


def pythia_num_samples() -> int:
    """Pythia's training ``num_samples``: 143000 × 1024 × 1.005, rounded up = 147,164,160."""
    return neox_num_samples(TRAIN_ITERS, GLOBAL_BATCH)


def num_tokens(sizes: np.ndarray, documents: np.ndarray | None = None) -> int:
    """Tokens per epoch (int64 sum of the documents' sizes)."""
    if documents is None:
        return int(np.sum(sizes, dtype=np.int64))
    return int(np.sum(np.asarray(sizes)[documents], dtype=np.int64))


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E with ``(E*T - 1) // seq_length >= num_samples`` (v1.0 ``_num_epochs``)."""
    if tokens_per_epoch <= 1:
        raise RetraceError(f"dataset has {tokens_per_epoch} tokens; need at least 2")
    need = num_samples * seq_length + 1  # E*T - 1 >= num_samples*seq_length
    return max(1, -(-need // tokens_per_epoch))


def num_samples_in(num_epochs_: int, tokens_per_epoch: int, seq_length: int) -> int:
    """S, the number of samples the maps hold (``sample_idx`` has S+1 rows)."""
    return (num_epochs_ * tokens_per_epoch - 1) // seq_length


def shuffle_dtype(size: int) -> np.dtype:
    """uint32, or int64 when ``size >= 2**32 - 2`` (v1.0 ``_build_shuffle_idx``)."""
    return np.dtype(np.int64) if size >= np.iinfo(np.uint32).max - 1 else np.dtype(np.uint32)


def build_doc_idx(documents: np.ndarray, num_epochs_: int, rng: np.random.RandomState) -> np.ndarray:
    """E stacked copies of ``documents`` as int32, shuffled in place by ``rng`` (all epochs mixed)."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs_)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs_: int,
                     tokens_per_epoch: int, *, chunk: int = _DOC_CHUNK) -> np.ndarray:
    """int32 ``[S+1, 2]``: (index into doc_idx, offset) of each sample start. Vectorised, chunked.

    Same inputs and output as GPT-NeoX's C++ ``helpers.build_sample_idx``.
    """
    if seq_length <= 1:
        raise RetraceError(f"seq_length must be > 1, got {seq_length}")
    L = int(seq_length)
    S = num_samples_in(num_epochs_, tokens_per_epoch, L)
    if S < 0:
        raise RetraceError("dataset has no tokens")
    if len(doc_idx) >= np.iinfo(np.int32).max:
        raise RetraceError(f"doc_idx has {len(doc_idx)} entries; GPT-NeoX's int32 sample_idx cannot index it")
    sizes = np.asarray(sizes)
    out = np.empty((S + 1, 2), dtype=np.int32)
    k = 0  # next boundary to place; invariant: k == ceil(base / L) while k <= S
    base = 0  # stream position of the first token of the current chunk
    n_docs = len(doc_idx)
    for a in range(0, n_docs, chunk):
        if k > S:
            break
        b = min(n_docs, a + chunk)
        lens = sizes[doc_idx[a:b]].astype(np.int64)
        ends = np.cumsum(lens)
        ends += base  # exclusive end position of each document in the stream
        # boundaries k*L falling inside document j: ceil(start_j/L) <= k < ceil(end_j/L)
        kend = ends + (L - 1)
        kend //= L
        np.minimum(kend, S + 1, out=kend)
        n = int(kend[-1]) - k
        next_base = int(ends[-1])
        if n:
            counts = np.empty_like(kend)
            counts[0] = kend[0] - k
            np.subtract(kend[1:], kend[:-1], out=counts[1:])
            local = np.repeat(np.arange(b - a, dtype=np.int32), counts)  # document (in chunk) of each row
            del counts
            ends -= lens  # now the start position of each document
            del lens
            offs = np.arange(k, k + n, dtype=np.int64)
            offs *= L
            offs -= ends[local]
            rows = out[k:k + n]
            rows[:, 1] = offs
            del offs
            local += a
            rows[:, 0] = local
            del local
        k += n
        base = next_base
    if k != S + 1:  # cannot happen: S*L < E*T, so the last boundary lies inside the stream
        raise RetraceError(f"internal error: placed {k} of {S + 1} sample boundaries")
    # The helper records (0, 0) for sample 0 whatever doc_idx[0]'s size (matters only if it is empty).
    out[0] = 0
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    """``arange(size)`` (uint32, or int64 for huge sizes) shuffled in place by ``rng``."""
    shuffle_idx = np.arange(size, dtype=shuffle_dtype(size))
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def estimate_map_bytes(n_docs: int, tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Bytes of the three maps for these inputs (doc_idx + sample_idx + shuffle_idx)."""
    e = num_epochs(tokens_per_epoch, seq_length, num_samples)
    s = num_samples_in(e, tokens_per_epoch, seq_length)
    return 4 * e * n_docs + 8 * (s + 1) + shuffle_dtype(s).itemsize * s


def build_index_mappings(sizes: np.ndarray, seq_length: int, seed: int, num_samples: int, *,
                         documents: np.ndarray | None = None,
                         max_bytes: int | None = DEFAULT_MAX_MAP_BYTES,
                         log=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` exactly as GPT-NeoX v1.0 builds them.

    ``documents`` defaults to every document (``arange(len(sizes))`` as int32), which is what GPT-NeoX
    uses for Pythia's train data. ``log`` (e.g. ``print``) receives one line per phase with timings.
    """
    sizes = np.asarray(sizes)
    if sizes.dtype != np.int32:
        sizes = sizes.astype(np.int32)
    if documents is None:
        documents = np.arange(len(sizes), dtype=np.int32)
    else:
        documents = np.asarray(documents, dtype=np.int32)
    if len(documents) == 0:
        raise RetraceError("no documents to build index maps from")
    tokens = num_tokens(sizes, None if len(documents) == len(sizes) else documents)
    if num_samples < 0:
        raise RetraceError(f"num_samples must be >= 0, got {num_samples}")
    epochs = num_epochs(tokens, seq_length, num_samples)
    if max_bytes is not None:
        need = estimate_map_bytes(len(documents), tokens, seq_length, num_samples)
        if need > max_bytes or epochs > DEFAULT_MAX_EPOCHS:
            raise RetraceError(
                f"index maps for num_samples={num_samples} at seq_length={seq_length} need {epochs} epochs of "
                f"{len(documents)} documents ({tokens} tokens) and about {need / 2**30:.1f} GiB; pass the "
                f"num_samples your run really uses (e.g. neox_num_samples(train_iters, global_batch))")
    rng = np.random.RandomState(seed=seed)
    t0 = time.perf_counter()
    doc_idx = build_doc_idx(documents, epochs, rng)
    t1 = time.perf_counter()
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
    t2 = time.perf_counter()
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    t3 = time.perf_counter()
    if log is not None:
        log(f"index maps: {len(documents)} documents, {tokens} tokens/epoch, {epochs} epochs, "
            f"{sample_idx.shape[0] - 1} samples; doc_idx {t1 - t0:.1f}s, sample_idx {t2 - t1:.1f}s, "
            f"shuffle_idx {t3 - t2:.1f}s")
    return doc_idx, sample_idx, shuffle_idx


# -- GPT-NeoX's on-disk cache --------------------------------------------------------------------

@dataclass(frozen=True)
class IndexMapPaths:
    doc_idx: Path
    sample_idx: Path
    shuffle_idx: Path

    def all(self) -> tuple[Path, Path, Path]:
        return (self.doc_idx, self.sample_idx, self.shuffle_idx)

    def exist(self) -> bool:
        return all(p.is_file() for p in self.all())


def index_map_paths(data_prefix: str | os.PathLike, num_samples: int, seq_length: int, seed: int, *,
                    name: str = NEOX_TRAIN_NAME, cache_dir: str | os.PathLike | None = None) -> IndexMapPaths:
    """GPT-NeoX's file names: ``{prefix}_{name}_indexmap_{ns}ns_{sl}sl_{seed}s_{doc|sample|shuffle}_idx.npy``.

    With ``cache_dir`` the names are under it with the prefix's base name; without, beside the data, where
    GPT-NeoX itself writes them (a name only: :func:`load_or_build_index_mappings` never reads or writes
    there).
    """
    prefix = Path(str(data_prefix))
    if cache_dir is not None:
        prefix = Path(cache_dir) / prefix.name
    stem = f"{prefix}_{name}_indexmap_{int(num_samples)}ns_{int(seq_length)}sl_{int(seed)}s"
    return IndexMapPaths(Path(stem + "_doc_idx.npy"), Path(stem + "_sample_idx.npy"),
                         Path(stem + "_shuffle_idx.npy"))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to a temporary file in the same directory, then rename (never a half-written map)."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RetraceError(f"{path}: unreadable index map ({exc}); delete it to rebuild") from exc


def load_index_mappings(paths: IndexMapPaths, *, n_docs: int, tokens_per_epoch: int, seq_length: int,
                        num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-map cached maps and check their shapes/dtypes against the data they claim to index."""
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    s = num_samples_in(epochs, tokens_per_epoch, seq_length)
    doc_idx = _load_npy(paths.doc_idx)
    sample_idx = _load_npy(paths.sample_idx)
    shuffle_idx = _load_npy(paths.shuffle_idx)
    checks = [
        (paths.doc_idx, doc_idx, (epochs * n_docs,), np.dtype(np.int32)),
        (paths.sample_idx, sample_idx, (s + 1, 2), np.dtype(np.int32)),
        (paths.shuffle_idx, shuffle_idx, (s,), shuffle_dtype(s)),
    ]
    for path, arr, shape, dtype in checks:
        if arr.shape != shape or arr.dtype != dtype:
            raise RetraceError(
                f"{path}: index map has shape {arr.shape} {arr.dtype}, expected {shape} {dtype} for this "
                f"dataset ({n_docs} documents, {tokens_per_epoch} tokens, {epochs} epochs); it was built for "
                "other data — delete it to rebuild")
    return doc_idx, sample_idx, shuffle_idx


def load_or_build_index_mappings(data_prefix: str | os.PathLike, sizes: np.ndarray, seq_length: int, seed: int,
                                 num_samples: int, *, name: str = NEOX_TRAIN_NAME,
                                 cache_dir: str | os.PathLike | None = None, write: bool = True,
                                 max_bytes: int | None = DEFAULT_MAX_MAP_BYTES, log=None,
                                 ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], IndexMapPaths | None]:
    """The maps, from GPT-NeoX-named files in ``cache_dir`` when all three exist, else built (and saved
    there unless ``write=False``).

    ``cache_dir`` is a directory the caller owns (the workflow: ``resources/order/<variant>``). Without it
    the maps are built in memory and the returned paths are None: files beside the data (an external
    directory anyone may write) are never read, so a planted map cannot change the order. Maps written by
    GPT-NeoX can be copied into ``cache_dir``, and ours used by GPT-NeoX.
    """
    tokens = num_tokens(sizes)
    if cache_dir is None:
        return build_index_mappings(sizes, seq_length, seed, num_samples, max_bytes=max_bytes, log=log), None
    paths = index_map_paths(data_prefix, num_samples, seq_length, seed, name=name, cache_dir=cache_dir)
    if paths.exist():
        maps = load_index_mappings(paths, n_docs=len(sizes), tokens_per_epoch=tokens,
                                   seq_length=seq_length, num_samples=num_samples)
        return maps, paths
    maps = build_index_mappings(sizes, seq_length, seed, num_samples, max_bytes=max_bytes, log=log)
    if write:
        try:
            for path, arr in zip(paths.all(), maps, strict=True):
                save_npy(path, arr)
        except OSError as exc:
            raise RetraceError(f"cannot write index maps to {paths.doc_idx.parent} ({exc})") from exc
    return maps, paths


# -- who reads what ------------------------------------------------------------------------------

def batch_items(step: int, *, micro: int = 0, rank: int = 0, pdbs: int | None = None, gpus: int = 1,
                global_batch: int = GLOBAL_BATCH) -> np.ndarray:
    """Dataset item ids read at ``step`` by data-parallel ``rank`` at micro-step ``micro``.

    GPT-NeoX v1.0: a SequentialSampler and a DistributedBatchSampler (interleave off) of batch
    ``pdbs*gpus`` give items ``global_batch*step + micro*pdbs*gpus + rank*pdbs + [0, pdbs)``.
    ``pdbs=None`` means the whole step (all micro-steps and ranks): ``global_batch*step + [0, global_batch)``.
    """
    check_layout(global_batch, pdbs, gpus, micro=micro, rank=rank)
    if step < 0:
        raise RetraceError(f"step must be >= 0, got {step}")
    if pdbs is None:
        start = global_batch * step
        return np.arange(start, start + global_batch, dtype=np.int64)
    start = global_batch * step + micro * pdbs * gpus + rank * pdbs
    return np.arange(start, start + pdbs, dtype=np.int64)


def check_layout(global_batch: int, pdbs: int | None, gpus: int, *, micro: int = 0, rank: int = 0) -> int:
    """Check that (gpus, pdbs) tile ``global_batch``; returns gas (gradient accumulation steps)."""
    if global_batch <= 0:
        raise RetraceError(f"global batch must be > 0, got {global_batch}")
    if pdbs is None:
        return 1
    if pdbs <= 0 or gpus <= 0:
        raise RetraceError(f"pdbs and gpus must be > 0, got pdbs={pdbs}, gpus={gpus}")
    if global_batch % (pdbs * gpus):
        raise RetraceError(f"global batch {global_batch} is not a multiple of pdbs*gpus = {pdbs}*{gpus}")
    gas = global_batch // (pdbs * gpus)
    if not 0 <= micro < gas:
        raise RetraceError(f"micro-step {micro} out of range [0, {gas}) for global batch {global_batch} "
                           f"= {gpus} gpus x {pdbs} pdbs x {gas} gas")
    if not 0 <= rank < gpus:
        raise RetraceError(f"rank {rank} out of range [0, {gpus})")
    return gas
