"""The one interface the trainer reads data through: :class:`TrainingData`.

Two kinds of data give the same thing, a sequence of ``seq_length + 1``-token training items in
GPT-NeoX order:

* ``raw``: a tokenized corpus (one document per sequence); item j is GPT-NeoX's ``GPT2Dataset[j]``,
  i.e. sample ``shuffle_idx[j]`` of the index maps built with ``seed``/``num_samples``/``seq_length``.
* ``preshuffled``: the training stream already in order (Pythia's ``*-pythia-preshuffled`` repos);
  item i is tokens ``[(L+1)*i, (L+1)*(i+1))`` of the single stream. With ``shuffle_samples=True`` the
  items are additionally permuted by ``np.random.RandomState(seed)`` (one shuffle of ``arange(n)``).
  The stream may be read from its shards in place, only some of them fetched: an item in a shard that
  is not there is refused by ``check_enough`` and by every read, naming the shard.

Order maps (and the preshuffled permutation) are cached only in the ``cache_dir`` the caller gives (the
workflow: ``resources/order/<variant>``); nothing is ever read from, or written to, beside the data, so a
file planted in an external data directory is never trusted. Without ``cache_dir`` they are built in
memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrace.data import order
from retrace.data.indexed import IndexedDataset, split_prefix
from retrace.errors import RetraceError
from retrace.pythia.constants import GLOBAL_BATCH, SEED, SEQ_LENGTH

KINDS = ("raw", "preshuffled")


class TrainingData:
    """Training items in GPT-NeoX order. Build with :func:`open_training_data`.

    ``len(data)`` items; ``sample(i)`` -> int64 ``(seq_length+1,)``; ``samples(ids)`` -> ``[n, seq_length+1]``;
    ``batch_items(step, ...)`` -> the item ids a rank reads; ``batch(step, ...)`` -> their tokens.
    """

    def __init__(self, dataset: IndexedDataset, kind: str, seq_length: int, seed: int,
                 num_samples: int | None, *, shuffle_samples: bool = False,
                 maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 map_paths: order.IndexMapPaths | None = None, perm: np.ndarray | None = None,
                 length: int = 0):
        self.dataset = dataset
        self.prefix = dataset.prefix
        self.kind = kind
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = num_samples
        self.shuffle_samples = shuffle_samples
        self.map_paths = map_paths
        self.doc_idx, self.sample_idx, self.shuffle_idx = maps if maps is not None else (None, None, None)
        self._perm = perm
        self._len = int(length)
        #: preshuffled: stream rows [a, b) whose bytes lie in fetched shards
        self._readable = _readable_rows(dataset, seq_length + 1) if kind == "preshuffled" else None

    # -- size ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def check_enough(self, steps: int, global_batch: int = GLOBAL_BATCH,
                     start_step: int = 0) -> None:
        """Raise RetraceError unless steps ``[start_step, steps)`` at ``global_batch`` fit the data."""
        need = int(steps) * int(global_batch)
        if need > self._len or start_step < 0:
            raise RetraceError(
                f"{self.prefix} ({self.kind}): {steps} steps x global batch {global_batch} need {need} items "
                f"but the data has {self._len}" + (
                    f" (num_samples={self.num_samples}; build the maps with at least "
                    f"neox_num_samples({steps}, {global_batch}))" if self.kind == "raw" else ""))
        first = int(start_step) * int(global_batch)
        if self._readable is not None and need > first:
            what = f"steps [{start_step}, {steps}) x global batch {global_batch}"
            if self._perm is not None:
                self._check_rows(np.asarray(self._perm[first:need], dtype=np.int64), what=what)
            else:
                gap = _first_gap(self._readable, first, need)
                if gap is not None:
                    self._check_rows(np.array([gap], dtype=np.int64), what=what)

    def _check_rows(self, rows: np.ndarray, *, what: str) -> None:
        """Raise unless every stream row in ``rows`` lies in fetched shards (preshuffled)."""
        if self._readable is None or rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if any(a <= lo and hi < b for a, b in self._readable):
            return
        if self._readable:
            starts = np.array([a for a, _ in self._readable], dtype=np.int64)
            ends = np.array([b for _, b in self._readable], dtype=np.int64)
            k = np.searchsorted(starts, rows, side="right") - 1
            ok = (k >= 0) & (rows < ends[np.maximum(k, 0)])
        else:
            ok = np.zeros(rows.size, dtype=bool)
        if not ok.all():
            row = int(rows[np.argmax(~ok)])
            w = (self.seq_length + 1) * self.dataset.dtype.itemsize
            shards = self.dataset.bin.missing(row * w, (row + 1) * w)
            raise RetraceError(
                f"{self.prefix} ({self.kind}): {what} read stream item {row}, which lies in shard(s) "
                f"{', '.join(shards)} not fetched; prepare the data for at least these items")

    # -- items ---------------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self._len):
            bad = ids[(ids < 0) | (ids >= self._len)][0]
            raise RetraceError(f"{self.prefix} ({self.kind}): item {int(bad)} out of range [0, {self._len})")
        if self._readable is not None and ids.size:
            rows = np.asarray(self._perm[ids], dtype=np.int64) if self._perm is not None else ids
            self._check_rows(rows, what=f"items {int(ids.min())}..{int(ids.max())}")

    def sample(self, i: int) -> np.ndarray:
        """Item ``i``: ``seq_length + 1`` token ids as int64 (tokens = s[:-1], labels = s[1:])."""
        self._check_ids(np.asarray([i]))
        return self._sample(int(i))

    def samples(self, ids) -> np.ndarray:
        """Items ``ids`` stacked: int64 ``[len(ids), seq_length + 1]``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._check_ids(ids)
        out = np.empty((ids.size, self.seq_length + 1), dtype=np.int64)
        if self.kind == "preshuffled":
            rows = self._perm[ids] if self._perm is not None else ids
            w = self.seq_length + 1
            for n, r in enumerate(rows):
                out[n] = self.dataset.stream_tokens(int(r) * w, w)
        else:
            for n, i in enumerate(ids):
                out[n] = self._sample(int(i))
        return out

    def _sample(self, i: int) -> np.ndarray:
        w = self.seq_length + 1
        if self.kind == "preshuffled":
            r = int(self._perm[i]) if self._perm is not None else i
            return self.dataset.stream_tokens(r * w, w).astype(np.int64)
        # GPT2Dataset.__getitem__ (v1.0)
        idx = int(self.shuffle_idx[i])
        doc_f, off_f = (int(x) for x in self.sample_idx[idx])
        doc_l, off_l = (int(x) for x in self.sample_idx[idx + 1])
        ds, doc_idx = self.dataset, self.doc_idx
        if doc_f == doc_l:
            tokens = ds.get(int(doc_idx[doc_f]), offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [ds.get(int(doc_idx[doc_f]), offset=off_f)]
            parts.extend(ds.get(int(doc_idx[d])) for d in range(doc_f + 1, doc_l))
            parts.append(ds.get(int(doc_idx[doc_l]), length=off_l + 1))
            tokens = np.concatenate(parts)
        if tokens.size != w:
            raise RetraceError(f"{self.prefix}: item {i} has {tokens.size} tokens, expected {w} "
                               "(index maps do not match this data)")
        return tokens.astype(np.int64)

    # -- batches -------------------------------------------------------------------------------
    def batch_items(self, step: int, *, micro: int = 0, rank: int = 0, pdbs: int | None = None,
                    gpus: int = 1, global_batch: int = GLOBAL_BATCH) -> np.ndarray:
        """Item ids read at ``step`` by ``rank`` at micro-step ``micro`` (see ``order.batch_items``)."""
        ids = order.batch_items(step, micro=micro, rank=rank, pdbs=pdbs, gpus=gpus, global_batch=global_batch)
        self._check_ids(ids)
        return ids

    def batch(self, step: int, *, micro: int = 0, rank: int = 0, pdbs: int | None = None, gpus: int = 1,
              global_batch: int = GLOBAL_BATCH) -> np.ndarray:
        """Tokens of :meth:`batch_items`: int64 ``[n, seq_length + 1]``."""
        return self.samples(self.batch_items(step, micro=micro, rank=rank, pdbs=pdbs, gpus=gpus,
                                             global_batch=global_batch))

    def describe(self) -> dict:
        d = {"prefix": str(self.prefix), "kind": self.kind, "seq_length": self.seq_length, "seed": self.seed,
             "num_samples": self.num_samples, "items": self._len, "documents": len(self.dataset),
             "tokens": self.dataset.num_tokens, "shuffle_samples": self.shuffle_samples}
        if self.map_paths is not None:
            d["index_maps"] = [str(p) for p in self.map_paths.all()]
        return d

    def __repr__(self) -> str:
        return f"TrainingData({str(self.prefix)!r}, kind={self.kind!r}, items={self._len})"


def open_training_data(prefix: str | os.PathLike, kind: str = "raw", seq_length: int = SEQ_LENGTH,
                       seed: int = SEED, num_samples: int | None = None,
                       shuffle_samples: bool = False, cache_dir: str | os.PathLike | None = None, *,
                       write_cache: bool = True, name: str = order.NEOX_TRAIN_NAME,
                       max_map_bytes: int | None = order.DEFAULT_MAX_MAP_BYTES, log=None) -> TrainingData:
    """Open ``prefix.{bin,idx}`` as training items.

    raw: ``num_samples`` is GPT-NeoX's train sample count (default: Pythia's 147,164,160; a run of
    ``steps`` at global batch B uses ``order.neox_num_samples(steps, B)``). The order depends on it, so
    a reproduction must use the same value as the run it reproduces. Index maps are cached under
    GPT-NeoX's names in ``cache_dir`` (never beside the data); without it they are built in memory.

    preshuffled: ``num_samples`` (optional) caps the number of items; ``shuffle_samples=True`` permutes them
    with ``RandomState(seed)`` (cached in ``cache_dir`` as ``…_preshuffled_shuffle_{n}n_{seed}s_idx.npy``).
    For raw data ``shuffle_samples`` changes nothing: raw items always go through GPT-NeoX's ``shuffle_idx``.
    """
    if kind not in KINDS:
        raise RetraceError(f"data kind must be one of {KINDS}, got {kind!r}")
    if seq_length <= 1:
        raise RetraceError(f"seq_length must be > 1, got {seq_length}")
    prefix = split_prefix(prefix)
    ds = IndexedDataset(prefix)
    if kind == "raw":
        # raw data is always read through GPT-NeoX's shuffle_idx; shuffle_samples only adds a shuffle on
        # top of a preshuffled stream, so it changes nothing here
        if num_samples is None:
            num_samples = order.pythia_num_samples()
        if len(ds) == 0 or ds.num_tokens < 2:
            raise RetraceError(f"{prefix}: dataset has no documents/tokens")
        absent = ds.bin.missing(0, ds.bin.size)
        if absent:
            raise RetraceError(f"{prefix}: raw data is read through index maps over the whole corpus, but "
                               f"{len(absent)} shard(s) are not fetched ({', '.join(absent[:3])}…)")
        maps, paths = order.load_or_build_index_mappings(
            prefix, np.asarray(ds.sizes), seq_length, seed, num_samples, name=name, cache_dir=cache_dir,
            write=write_cache, max_bytes=max_map_bytes, log=log)
        doc_idx, sample_idx, shuffle_idx = maps
        length = min(shuffle_idx.shape[0] - 1, sample_idx.shape[0] - 1)
        return TrainingData(ds, kind, seq_length, seed, num_samples, shuffle_samples=True, maps=maps,
                            map_paths=paths, length=max(length, 0))

    # preshuffled
    w = seq_length + 1
    sizes = ds.sizes
    if len(sizes) and int(sizes.min()) == int(sizes.max()) and int(sizes[0]) != w:
        raise RetraceError(f"{ds.idx_path}: every item has {int(sizes[0])} tokens but seq_length={seq_length} "
                           f"needs {w}; pass seq_length={int(sizes[0]) - 1}")
    if not ds.contiguous:
        ds.stream_tokens(0, 0)  # raises: not one stream
    available = ds.data_bytes // ds.dtype.itemsize // w
    if num_samples is None:
        length = available
    elif num_samples > available:
        raise RetraceError(f"{prefix}: preshuffled stream has {available} items of {w} tokens, fewer than "
                           f"num_samples={num_samples}")
    else:
        length = int(num_samples)
    perm = None
    if shuffle_samples:
        perm = _sample_permutation(prefix, length, seed, cache_dir, write_cache)
    return TrainingData(ds, kind, seq_length, seed, num_samples, shuffle_samples=shuffle_samples, perm=perm,
                        length=length)


def _first_gap(ranges: list[tuple[int, int]], lo: int, hi: int) -> int | None:
    """The first row of ``[lo, hi)`` outside the sorted, disjoint ``ranges``; None if all are inside."""
    pos = lo
    for a, b in ranges:
        if a <= pos < b:
            pos = b
        if pos >= hi:
            return None
    return pos if pos < hi else None


def _readable_rows(ds: IndexedDataset, width: int) -> list[tuple[int, int]]:
    """Stream rows ``[a, b)`` of ``width`` tokens whose bytes all lie in fetched shards."""
    w = width * ds.dtype.itemsize
    rows = []
    for a, b in ds.bin.present_ranges():
        lo, hi = -(-a // w), min(b, ds.data_bytes) // w
        if hi > lo:
            rows.append((lo, hi))
    return rows


def preshuffled_perm_path(prefix: str | os.PathLike, n: int, seed: int, cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/<name>_preshuffled_shuffle_{n}n_{seed}s_idx.npy``."""
    return Path(cache_dir) / f"{Path(str(prefix)).name}_preshuffled_shuffle_{int(n)}n_{int(seed)}s_idx.npy"


def _sample_permutation(prefix: Path, n: int, seed: int, cache_dir, write: bool) -> np.ndarray:
    if cache_dir is None:
        return order.build_shuffle_idx(n, np.random.RandomState(seed=seed))
    path = preshuffled_perm_path(prefix, n, seed, cache_dir)
    if path.is_file():
        perm = order._load_npy(path)
        if perm.shape != (n,) or perm.dtype != order.shuffle_dtype(n):
            raise RetraceError(f"{path}: permutation has shape {perm.shape} {perm.dtype}, expected ({n},) "
                               f"{order.shuffle_dtype(n)}; delete it to rebuild")
        return perm
    perm = order.build_shuffle_idx(n, np.random.RandomState(seed=seed))
    if write:
        try:
            order.save_npy(path, perm)
        except OSError as exc:
            raise RetraceError(f"cannot write {path} ({exc}); pass cache_dir to a writable directory") from exc
    return perm
