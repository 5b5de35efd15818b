"""GPT-NeoX / Megatron ``MMapIndexedDataset`` files: a ``.bin`` of raw tokens and its ``.idx``.

Layout of the ``.idx`` (all integers little-endian)::

    offset 0        9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9        uint64    version = 1
    offset 17       uint8     dtype code (DTYPES below)
    offset 18       uint64    N, number of sequences
    offset 26       uint64    D, length of doc_idx
    offset 34       int32[N]  sizes (tokens per sequence)
    34 + 4N         int64[N]  pointers (byte offsets into .bin)
    34 + 12N        int64[D]  doc_idx

The ``.bin`` is the tokens of every sequence concatenated, no header. Both files are memory-mapped;
nothing is read into memory until a sequence is asked for. The ``.bin`` may also be read in place from
its shards: a prefix with a shard manifest ``<prefix>.shards.json`` (:mod:`retrace.data.shards`) opens
through it, whatever ``.bin`` lies beside it.

Opening validates the header and that every (pointer, size) fits the ``.bin``; a truncated or corrupt
pair raises one :class:`~retrace.errors.RetraceError` naming the file, never returns garbage.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retrace.data.shards import ShardedBin, load_manifest, manifest_path
from retrace.errors import RetraceError
from retrace.io import _fsync_dir, _fsync_file, default_file_mode

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
#: The legacy (non-mmap) Megatron index starts with this; we name it in the error.
_LEGACY_MAGIC = b"TNTIDX\x00\x00"

#: dtype code -> token dtype (little-endian), as in GPT-NeoX ``indexed_dataset.dtypes``.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f4"),
    7: np.dtype("<f8"),
    8: np.dtype("<u2"),
}

_CHECK_CHUNK = 1 << 23  # elements per chunk when validating big indexes (bounded memory)


def dtype_code(dtype) -> int:
    """The ``.idx`` code of a token dtype (``np.uint16`` -> 8)."""
    dt = np.dtype(dtype).newbyteorder("<")
    for code, known in DTYPES.items():
        if known == dt:
            return code
    raise RetraceError(f"dtype {np.dtype(dtype)} has no MMapIndexedDataset code (allowed: "
                       f"{', '.join(str(d) for d in DTYPES.values())})")


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """GPT-NeoX's choice: uint16 when vocab_size < 65500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype("<u2")
    return np.dtype("<i4")


def split_prefix(path: str | os.PathLike) -> Path:
    """``a/b.bin``, ``a/b.idx`` or ``a/b`` -> ``a/b`` (the prefix both suffixes are appended to)."""
    p = str(path)
    if p.endswith((".bin", ".idx")):
        p = p[:-4]
    return Path(p)


class IndexedDataset:
    """A read-only, memory-mapped MMapIndexedDataset.

    ``ds[i]`` / ``ds.get(i, offset, length)`` return sequence ``i`` in its stored dtype (a view, or a copy
    when it crosses a shard boundary). ``sizes``, ``pointers`` and ``doc_idx`` are memory-mapped arrays
    straight from the ``.idx``. ``bin`` is the :class:`~retrace.data.shards.ShardedBin` the tokens come from.
    """

    def __init__(self, prefix: str | os.PathLike, *, bin_path: str | os.PathLike | None = None,
                 idx_path: str | os.PathLike | None = None, sharded: ShardedBin | None = None):
        self.prefix = split_prefix(prefix)
        self.manifest = None
        if sharded is None and bin_path is None and idx_path is None:
            # a manifest wins over a .bin beside it (e.g. a merged copy an older retrace made): what it
            # lists was hash-checked, the .bin may be anything
            mpath = manifest_path(self.prefix)
            if mpath.is_file():
                self.manifest = load_manifest(mpath)
                self.manifest.check_stamps()
                sharded = self.manifest.bin()
                idx_path = idx_path or self.manifest.idx_path
        self.idx_path = Path(idx_path) if idx_path is not None else Path(f"{self.prefix}.idx")
        if sharded is not None:
            self.bin_path = Path(sharded.label)
        else:
            self.bin_path = Path(bin_path) if bin_path is not None else Path(f"{self.prefix}.bin")
        for p in (self.idx_path, None if sharded is not None else self.bin_path):
            if p is not None and not p.is_file():
                raise RetraceError(f"{p}: no such file (an indexed dataset needs both .bin and .idx, or a "
                                   f"shard manifest {manifest_path(self.prefix).name})")
        self._read_index()
        self.bin = sharded if sharded is not None else ShardedBin.single(self.bin_path)
        self.bin_bytes = self.bin.size
        self._validate()

    # -- opening -------------------------------------------------------------------------------
    def _read_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        if head[:8] == _LEGACY_MAGIC:
            raise RetraceError(f"{path}: a legacy (non-mmap) Megatron IndexedDataset index; only the "
                               "MMapIndexedDataset format (magic MMIDIDX) is supported")
        if len(head) < 9 or head[:9] != MAGIC:
            raise RetraceError(f"{path}: not an MMapIndexedDataset index (bad magic {head[:9]!r}, "
                               f"expected {MAGIC!r})")
        if len(head) < HEADER_BYTES:
            raise RetraceError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise RetraceError(f"{path}: unsupported index version {version} (expected {VERSION})")
        code = head[17]
        if code not in DTYPES:
            raise RetraceError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        n, d = struct.unpack("<QQ", head[18:34])
        expected = HEADER_BYTES + 12 * n + 8 * d
        if n > size or d > size or size < expected:
            raise RetraceError(f"{path}: truncated or corrupt index: header says {n} sequences and "
                               f"{d} doc_idx entries ({expected} bytes), file has {size} bytes")
        if size > expected:
            raise RetraceError(f"{path}: corrupt index: {size - expected} bytes after the {expected} "
                               f"that {n} sequences and {d} doc_idx entries need")
        self.dtype = DTYPES[code]
        self.dtype_code = code
        self._len = int(n)
        self._idx_mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None
        buf = self._idx_mmap
        off = HEADER_BYTES
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=off)
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=d, offset=off + 12 * n)

    def _validate(self) -> None:
        item = self.dtype.itemsize
        n = self._len
        end_max = 0
        contiguous = True
        expect = 0  # the next pointer if the file is the plain concatenation of its sequences
        for a in range(0, n, _CHECK_CHUNK):
            b = min(n, a + _CHECK_CHUNK)
            sz = np.asarray(self.sizes[a:b], dtype=np.int64)
            ptr = np.asarray(self.pointers[a:b], dtype=np.int64)
            if sz.min() < 0:
                i = a + int(np.argmax(sz < 0))
                raise RetraceError(f"{self.idx_path}: corrupt index: sequence {i} has negative size "
                                   f"{int(self.sizes[i])}")
            if ptr.min() < 0 or np.any(ptr % item):
                i = a + int(np.argmax((ptr < 0) | (ptr % item != 0)))
                raise RetraceError(f"{self.idx_path}: corrupt index: sequence {i} has pointer "
                                   f"{int(self.pointers[i])} (negative or not a multiple of {item})")
            # A pointer near 2**63 would make pointer + size*itemsize wrap around to a negative end that
            # passes the bound; the sum is taken on pointers clipped to the file size, which cannot wrap.
            ends = np.minimum(ptr, self.bin_bytes) + sz * item
            bad = (ptr > self.bin_bytes) | (ends > self.bin_bytes)
            if bad.any():
                i = a + int(np.argmax(bad))
                end = int(self.pointers[i]) + int(self.sizes[i]) * item
                raise RetraceError(
                    f"{self.bin_path}: truncated or wrong .bin: sequence {i} (pointer "
                    f"{int(self.pointers[i])}, {int(self.sizes[i])} tokens of {self.dtype}) ends at byte "
                    f"{end} but the file has {self.bin_bytes} bytes")
            end_max = max(end_max, int(ends.max()))
            if contiguous:
                starts = np.empty_like(ptr)
                starts[0] = expect
                starts[1:] = ends[:-1]
                contiguous = bool(np.array_equal(starts, ptr))
                expect = int(ends[-1])
        if len(self.doc_idx):
            lo, hi = int(self.doc_idx.min()), int(self.doc_idx.max())
            if lo < 0 or hi > n:
                raise RetraceError(f"{self.idx_path}: corrupt index: doc_idx values span [{lo}, {hi}], "
                                   f"outside [0, {n}]")
        #: True when the .bin is exactly the sequences in order (every Megatron writer makes this).
        self.contiguous = contiguous
        self.data_bytes = end_max

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences (int64 sum)."""
        return int(np.sum(self.sizes, dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (a view; GPT-NeoX's ``get``)."""
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {i} out of range [0, {self._len}) in {self.prefix}")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of sequence {i} of size {size}")
        ptr = int(self.pointers[i]) + offset * self.dtype.itemsize
        return self.bin.tokens(self.dtype, ptr, length)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __iter__(self):
        for i in range(self._len):
            yield self.get(i)

    def stream(self) -> np.ndarray:
        """All tokens as one memory-mapped array (an unsharded, contiguous file: the usual case)."""
        self._check_contiguous()
        count = self.data_bytes // self.dtype.itemsize
        return np.frombuffer(self.bin.whole(), dtype=self.dtype, count=count, offset=0)

    def stream_tokens(self, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start + count)`` of the stream of all sequences in order (sharded or not)."""
        self._check_contiguous()
        if start < 0 or count < 0 or (start + count) * self.dtype.itemsize > self.data_bytes:
            raise RetraceError(f"{self.prefix}: stream tokens [{start}, {start + count}) out of range "
                               f"[0, {self.data_bytes // self.dtype.itemsize})")
        return self.bin.tokens(self.dtype, start * self.dtype.itemsize, count)

    def _check_contiguous(self) -> None:
        if not self.contiguous:
            raise RetraceError(f"{self.idx_path}: sequences are not stored contiguously in order; "
                               "cannot read the .bin as one token stream")

    def close(self) -> None:
        for name in ("sizes", "pointers", "doc_idx"):
            setattr(self, name, None)
        self._idx_mmap = None
        self.bin.close()

    def __enter__(self) -> IndexedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, {self._len} sequences, {self.dtype})"


def open_indexed(prefix: str | os.PathLike) -> IndexedDataset:
    """Open and validate ``prefix.bin`` / ``prefix.idx``."""
    return IndexedDataset(prefix)


class IndexedDatasetBuilder:
    """Write an MMapIndexedDataset the way GPT-NeoX's builder does, atomically.

    Both files are written under temporary names beside the target and renamed into place by
    :meth:`finalize` (``.bin`` first, then ``.idx``); an exception inside a ``with`` block removes them.
    ``add_item`` appends one sequence; ``end_document`` appends the running sequence count to
    ``doc_idx`` (which starts at ``[0]``), exactly as ``preprocess_data.py`` does.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._code = dtype_code(self.dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the temporaries with O_EXCL under unpredictable names: a symlink planted at a
        # guessable name cannot redirect the write to another file.
        self._bin_tmp = _mkstemp_beside(self.prefix, ".bin")
        try:
            self._idx_tmp = _mkstemp_beside(self.prefix, ".idx")
        except BaseException:
            self._bin_tmp.unlink()
            raise
        self._fh = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._done = False

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise RetraceError(f"{self.prefix}: items must be 1-D token arrays, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and arr.dtype.kind in "iu" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise RetraceError(f"{self.prefix}: token values [{arr.min()}, {arr.max()}] do not "
                                       f"fit {self.dtype}")
            arr = arr.astype(self.dtype)
        self._fh.write(np.ascontiguousarray(arr).tobytes())
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """One item that is a whole document (``add_item`` then ``end_document``)."""
        self.add_item(tokens)
        self.end_document()

    def finalize(self) -> Path:
        """Write the index and move both files into place; returns the prefix."""
        if self._done:
            return self.prefix
        self._fh.close()
        write_index(self._idx_tmp, self.dtype, self._sizes, self._doc_idx)
        _fsync_file(self._bin_tmp)
        _fsync_file(self._idx_tmp)
        for tmp in (self._bin_tmp, self._idx_tmp):
            os.chmod(tmp, default_file_mode())  # mkstemp makes 0600
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(self._idx_tmp, f"{self.prefix}.idx")
        _fsync_dir(self.prefix.parent)
        self._done = True
        return self.prefix

    def abort(self) -> None:
        if self._done:
            return
        self._fh.close()
        for p in (self._bin_tmp, self._idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _mkstemp_beside(prefix: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{prefix.name}{suffix}.", suffix=".tmp", dir=prefix.parent)
    os.close(fd)
    return Path(name)


def write_index(path: str | os.PathLike, dtype, sizes, doc_idx) -> None:
    """Write an ``.idx`` (pointers are the exclusive cumulative sum of sizes × itemsize)."""
    dt = np.dtype(dtype)
    sizes64 = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if sizes64.size and (sizes64.min() < 0 or sizes64.max() > np.iinfo(np.int32).max):
        raise RetraceError(f"{path}: sequence sizes must fit int32")
    pointers = np.zeros(sizes64.size, dtype="<i8")
    if sizes64.size > 1:
        np.cumsum(sizes64[:-1], out=pointers[1:])
    pointers *= dt.itemsize
    doc = np.asarray(doc_idx, dtype="<i8").reshape(-1)
    with open(path, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<Q", VERSION))
        fh.write(struct.pack("<B", dtype_code(dt)))
        fh.write(struct.pack("<Q", sizes64.size))
        fh.write(struct.pack("<Q", doc.size))
        fh.write(sizes64.astype("<i4").tobytes())
        fh.write(pointers.tobytes())
        fh.write(doc.tobytes())


def write_indexed(prefix: str | os.PathLike, documents: Iterable, dtype=np.uint16) -> Path:
    """Write each array of ``documents`` as one sequence and one document; returns the prefix."""
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_document(doc)
    return builder.prefix
