"""Does a tokenized raw corpus, read through GPT-NeoX's index maps, give a published preshuffled stream?

EleutherAI's ``pile-{standard,deduped}-pythia-preshuffled`` repos hold Pythia's training items in
training order, one ``seq_length + 1``-token item per sample (reference/pythia-neox.md §4). If they were
made from a raw corpus the way GPT-NeoX v1.0 reads it, then item ``j`` of the stream is
``GPT2Dataset[j]`` over that corpus (v1.0 ``megatron/data/gpt2_dataset.py`` ``__getitem__``, l.73-105):

* ``s = shuffle_idx[j]``; ``(d0, o0) = sample_idx[s]``, ``(d1, o1) = sample_idx[s + 1]``;
* the tokens of documents ``doc_idx[d0] .. doc_idx[d1]`` from offset ``o0`` of the first through offset
  ``o1`` of the last, inclusive: always ``seq_length + 1`` tokens;

with the maps built for ``(num_samples, seq_length, seed)`` (Pythia: 147,164,160, 2048, 1234).
:func:`check_order` builds the maps with :mod:`retrace.data.order`, reads items ``[start, start + items)``
that way (its own reader, not :mod:`retrace.data.training`'s), and compares each with the same item of the
preshuffled stream (tokens ``[(L+1)j, (L+1)(j+1))``), reporting the first item that differs with both
token windows summarised. A match is what lets a run train on a rebuilt order (raw corpus + maps) and
still see Pythia's batches; the check costs reading ``2·items·(L+1)`` tokens plus building the maps.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from retrace.data import order
from retrace.data.indexed import IndexedDataset, split_prefix
from retrace.errors import RetraceError
from retrace.pythia.constants import SEED, SEQ_LENGTH

#: Items compared by default: ten Pythia steps of 1024.
DEFAULT_ITEMS = 10_240
_BLOCK = 1024  # items read and compared at a time
_WINDOW = 8  # tokens shown on each side of the first difference


@dataclass(frozen=True)
class Mismatch:
    """The first item of the preshuffled stream that is not the raw corpus's item."""

    item: int  # dataset item j (= training position)
    sample: int  # shuffle_idx[j]: the sample of the raw maps item j should be
    first_position: int  # first token (of seq_length+1) that differs
    differing_tokens: int
    window_start: int  # the windows below are tokens [window_start, window_start + len) of the item
    raw_window: list[int]
    preshuffled_window: list[int]
    raw_head: list[int]
    preshuffled_head: list[int]
    raw_sha256: str  # of the whole item as little-endian uint32
    preshuffled_sha256: str
    raw_source: str  # where the raw item starts: document id and offset

    def describe(self) -> str:
        return (f"item {self.item} (raw sample {self.sample}, starting in {self.raw_source}) differs from the "
                f"preshuffled stream first at token {self.first_position} ({self.differing_tokens} tokens differ); "
                f"tokens from {self.window_start}: raw {self.raw_window} vs preshuffled {self.preshuffled_window}; "
                f"first tokens: raw {self.raw_head} vs preshuffled {self.preshuffled_head}")


@dataclass
class OrderCheck:
    """The outcome: ``status`` is ``"match"`` or ``"mismatch"`` (then ``first_mismatch`` says where)."""

    status: str
    raw: str
    preshuffled: str
    seq_length: int
    seed: int
    num_samples: int
    epochs: int
    start: int
    items: int  # items compared (up to and including the first mismatch)
    maps: str  # "built" or the directory of the cached maps used
    raw_documents: int
    raw_tokens: int
    preshuffled_items: int
    items_sha256: str | None  # of the matched items [start, start+items) as little-endian uint32
    first_mismatch: Mismatch | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "match"

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        head = (f"{self.raw} through the index maps (num_samples {self.num_samples}, seq_length {self.seq_length}, "
                f"seed {self.seed}, {self.epochs} epochs) vs {self.preshuffled}, items [{self.start}, "
                f"{self.start + self.items})")
        if self.ok:
            return f"match: {head}: all {self.items} items equal"
        return f"mismatch: {head}: {self.first_mismatch.describe()}"


def raw_item(ds: IndexedDataset, doc_idx: np.ndarray, sample_idx: np.ndarray, shuffle_idx: np.ndarray,
             j: int, seq_length: int) -> np.ndarray:
    """Dataset item ``j`` of the raw corpus as v1.0 ``GPT2Dataset.__getitem__`` reads it (int64)."""
    s = int(shuffle_idx[j])
    d0, o0 = (int(x) for x in sample_idx[s])
    d1, o1 = (int(x) for x in sample_idx[s + 1])
    if d0 == d1:
        tokens = np.asarray(ds.get(int(doc_idx[d0]), offset=o0, length=o1 - o0 + 1), dtype=np.int64)
    else:
        parts = [ds.get(int(doc_idx[d0]), offset=o0)]
        parts += [ds.get(int(doc_idx[d])) for d in range(d0 + 1, d1)]
        parts.append(ds.get(int(doc_idx[d1]), length=o1 + 1))
        tokens = np.concatenate(parts).astype(np.int64)
    if tokens.size != seq_length + 1:
        raise RetraceError(f"{ds.prefix}: item {j} (sample {s}) has {tokens.size} tokens, expected "
                           f"{seq_length + 1}: the index maps do not belong to this corpus")
    return tokens


def _sha(item: np.ndarray) -> str:
    return hashlib.sha256(item.astype("<u4").tobytes()).hexdigest()


def _mismatch(j: int, s: int, raw: np.ndarray, pre: np.ndarray, source: str) -> Mismatch:
    diff = np.flatnonzero(raw != pre)
    p = int(diff[0])
    a = max(0, p - _WINDOW)
    b = min(raw.size, p + _WINDOW + 1)
    return Mismatch(item=j, sample=s, first_position=p, differing_tokens=int(diff.size), window_start=a,
                    raw_window=raw[a:b].tolist(), preshuffled_window=pre[a:b].tolist(),
                    raw_head=raw[:_WINDOW].tolist(), preshuffled_head=pre[:_WINDOW].tolist(),
                    raw_sha256=_sha(raw), preshuffled_sha256=_sha(pre), raw_source=source)


def _maps(raw: IndexedDataset, seq_length: int, seed: int, num_samples: int, maps_dir, log):
    sizes = np.asarray(raw.sizes)
    if maps_dir is not None:
        paths = order.index_map_paths(raw.prefix, num_samples, seq_length, seed, cache_dir=maps_dir)
        if paths.exist():
            maps = order.load_index_mappings(paths, n_docs=len(sizes), tokens_per_epoch=order.num_tokens(sizes),
                                             seq_length=seq_length, num_samples=num_samples)
            return maps, str(maps_dir)
    return order.build_index_mappings(sizes, seq_length, seed, num_samples, log=log), "built"


def check_order(*, raw: str | os.PathLike, preshuffled: str | os.PathLike, seq_length: int = SEQ_LENGTH,
                seed: int = SEED, num_samples: int | None = None, items: int = DEFAULT_ITEMS, start: int = 0,
                maps_dir: str | os.PathLike | None = None, log=None) -> OrderCheck:
    """Compare items ``[start, start + items)`` of ``raw`` (through the index maps) with ``preshuffled``.

    Args:
        raw: prefix of the tokenized corpus (one document per sequence, as ``retrace tokenize`` writes).
        preshuffled: prefix of the preshuffled stream (``document`` of the ``*-pythia-preshuffled`` repos).
        seq_length, seed, num_samples: the maps' parameters (``num_samples`` default: Pythia's 147,164,160).
        items, start: the items compared.
        maps_dir: use GPT-NeoX-named maps cached there when all three exist (e.g. the ones training will
            read); otherwise the maps are built in memory. Nothing is written.
        log: receives a line per phase.

    Returns:
        The outcome; a mismatch is a result, not an exception.

    Raises:
        RetraceError: unreadable data, or fewer items than asked in either side.
    """
    t0 = time.perf_counter()
    if num_samples is None:
        num_samples = order.pythia_num_samples()
    if items < 1 or start < 0:
        raise RetraceError(f"order-check: need items >= 1 and start >= 0, got items={items}, start={start}")
    w = seq_length + 1
    raw_prefix, pre_prefix = split_prefix(raw), split_prefix(preshuffled)
    with IndexedDataset(raw_prefix) as rds, IndexedDataset(pre_prefix) as pds:
        psizes = pds.sizes
        if len(psizes) and int(psizes.min()) == int(psizes.max()) and int(psizes[0]) != w:
            raise RetraceError(f"{pds.idx_path}: every item has {int(psizes[0])} tokens, but seq_length "
                               f"{seq_length} needs {w}")
        stream = pds.stream()
        available = stream.size // w
        if start + items > available:
            raise RetraceError(f"{pre_prefix}: the preshuffled stream has {available} items of {w} tokens; "
                               f"items [{start}, {start + items}) asked")
        tokens = rds.num_tokens
        if len(rds) == 0 or tokens < 2:
            raise RetraceError(f"{raw_prefix}: no documents/tokens")
        (doc_idx, sample_idx, shuffle_idx), maps = _maps(rds, seq_length, seed, num_samples, maps_dir, log)
        n_raw = min(shuffle_idx.shape[0] - 1, sample_idx.shape[0] - 1)  # v1.0 gpt2_dataset.py l.62-63, 70-71
        if start + items > n_raw:
            raise RetraceError(f"{raw_prefix}: the index maps hold {n_raw} items for num_samples={num_samples}; "
                               f"items [{start}, {start + items}) asked")
        digest = hashlib.sha256()
        mismatch = None
        checked = 0
        for a in range(start, start + items, _BLOCK):
            b = min(start + items, a + _BLOCK)
            rblock = np.stack([raw_item(rds, doc_idx, sample_idx, shuffle_idx, j, seq_length) for j in range(a, b)])
            pblock = np.asarray(stream[a * w:b * w], dtype=np.int64).reshape(b - a, w)
            bad = np.flatnonzero((rblock != pblock).any(axis=1))
            if bad.size:
                k = int(bad[0])
                j = a + k
                s = int(shuffle_idx[j])
                d0, o0 = (int(x) for x in sample_idx[s])
                source = f"document {int(doc_idx[d0])} at token {o0}"
                mismatch = _mismatch(j, s, rblock[k], pblock[k], source)
                checked = j - start + 1
                break
            digest.update(rblock.astype("<u4").tobytes())
            checked = b - start
        epochs = order.num_epochs(tokens, seq_length, num_samples)
        result = OrderCheck(
            status="mismatch" if mismatch else "match", raw=str(raw_prefix), preshuffled=str(pre_prefix),
            seq_length=seq_length, seed=seed, num_samples=num_samples, epochs=epochs, start=start, items=checked,
            maps=maps, raw_documents=len(rds), raw_tokens=tokens, preshuffled_items=available,
            items_sha256=None if mismatch else digest.hexdigest(), first_mismatch=mismatch,
            seconds=round(time.perf_counter() - t0, 3))
    return result
