"""MMapIndexedDataset .bin/.idx: round trips of every dtype and one clear error per kind of damage."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from retrace.data.indexed import (
    DTYPES,
    MAGIC,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    dtype_code,
    write_index,
    write_indexed,
)
from retrace.errors import RetraceError


def _docs(dtype, n=7, seed=0):
    rng = np.random.RandomState(seed)
    dt = np.dtype(dtype)
    out = []
    for i in range(n):
        size = int(rng.randint(0, 40)) if i != 2 else 0  # one empty document
        if dt.kind == "f":
            out.append(rng.standard_normal(size).astype(dt))
        else:
            info = np.iinfo(dt)
            out.append(rng.randint(max(info.min, -1000), min(info.max, 1000) + 1, size).astype(dt))
    return out


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = DTYPES[code]
    docs = _docs(dtype)
    prefix = write_indexed(tmp_path / "d", docs, dtype=dtype)
    with IndexedDataset(prefix) as ds:
        assert ds.dtype == dtype and ds.dtype_code == code
        assert len(ds) == len(docs)
        assert ds.sizes.tolist() == [len(d) for d in docs]
        assert ds.doc_idx.tolist() == list(range(len(docs) + 1))
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(ds[i], d)
        i = max(range(len(docs)), key=lambda j: len(docs[j]))
        np.testing.assert_array_equal(ds.get(i, offset=3, length=5), docs[i][3:8])
        np.testing.assert_array_equal(ds.get(i, offset=4), docs[i][4:])
        assert ds.contiguous
        np.testing.assert_array_equal(ds.stream(), np.concatenate(docs))
        assert ds.num_tokens == sum(len(d) for d in docs)
    # the on-disk layout is GPT-NeoX's
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == MAGIC and struct.unpack("<Q", raw[9:17]) == (1,) and raw[17] == code
    n, d = struct.unpack("<QQ", raw[18:34])
    assert (n, d) == (len(docs), len(docs) + 1)
    sizes = np.frombuffer(raw, "<i4", n, 34)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n)
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(sizes)[:-1]]) * dtype.itemsize).tolist()
    assert (tmp_path / "d.bin").read_bytes() == b"".join(x.tobytes() for x in docs)


def test_items_and_documents_like_neox_builder(tmp_path):
    """add_item without end_document: several sequences in one document; doc_idx counts sequences."""
    with IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_item([1, 2, 3])
        b.add_item([4])
        b.end_document()
        b.add_document([5, 6])
    with IndexedDataset(tmp_path / "x.bin") as ds:  # a .bin/.idx path is accepted as the prefix
        assert ds.doc_idx.tolist() == [0, 2, 3]
        assert [ds[i].tolist() for i in range(3)] == [[1, 2, 3], [4], [5, 6]]


def test_best_fitting_dtype():
    assert best_fitting_dtype(50277) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32
    assert dtype_code(np.uint16) == 8 and dtype_code(np.int32) == 4
    with pytest.raises(RetraceError, match="no MMapIndexedDataset code"):
        dtype_code(np.uint32)


def test_builder_refuses_values_out_of_range(tmp_path):
    with pytest.raises(RetraceError, match="do not fit"), IndexedDatasetBuilder(tmp_path / "x", np.uint8) as b:
        b.add_document(np.array([1, 300]))
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even temporaries


def test_builder_is_atomic(tmp_path):
    write_indexed(tmp_path / "x", [np.array([1, 2], np.uint16)])
    before = (tmp_path / "x.bin").read_bytes(), (tmp_path / "x.idx").read_bytes()
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_document(np.array([7, 8, 9], np.uint16))
        raise RuntimeError("crash mid-write")
    assert ((tmp_path / "x.bin").read_bytes(), (tmp_path / "x.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def test_empty_dataset(tmp_path):
    write_indexed(tmp_path / "e", [])
    with IndexedDataset(tmp_path / "e") as ds:
        assert len(ds) == 0 and ds.num_tokens == 0 and ds.stream().size == 0


# -- validation -------------------------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    docs = [np.arange(10, dtype=np.uint16), np.arange(5, dtype=np.uint16), np.arange(7, dtype=np.uint16)]
    prefix = write_indexed(tmp_path / "p", docs)
    return prefix, tmp_path / "p.idx", tmp_path / "p.bin"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_missing_files(pair):
    prefix, idx, bin_ = pair
    bin_.unlink()
    with pytest.raises(RetraceError, match=r"p\.bin: no such file"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda idx, bin_: _patch(idx, 0, b"XXIDIDX"), r"p\.idx: not an MMapIndexedDataset index \(bad magic"),
        (lambda idx, bin_: _patch(idx, 0, b"TNTIDX\x00\x00"), r"p\.idx: a legacy"),
        (lambda idx, bin_: _patch(idx, 9, struct.pack("<Q", 2)), r"p\.idx: unsupported index version 2"),
        (lambda idx, bin_: _patch(idx, 17, b"\x09"), r"p\.idx: unknown dtype code 9"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), r"p\.idx: truncated header"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), r"p\.idx: truncated or corrupt index"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:0]), r"p\.idx: not an MMapIndexedDataset"),
        (lambda idx, bin_: _patch(idx, 18, struct.pack("<Q", 1 << 60)), r"p\.idx: truncated or corrupt index"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes() + b"\0" * 3), r"p\.idx: corrupt index: 3 bytes after"),
        (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), r"p\.bin: truncated or wrong \.bin: sequence 2"),
        (lambda idx, bin_: bin_.write_bytes(b""), r"p\.bin: truncated or wrong \.bin: sequence 0"),
        (lambda idx, bin_: _patch(idx, 34, struct.pack("<i", -1)), r"p\.idx: corrupt index: sequence 0 has negative size"),
        (lambda idx, bin_: _patch(idx, 34 + 12 + 8, struct.pack("<q", 21)), r"sequence 1 has pointer 21"),
        (lambda idx, bin_: _patch(idx, 34 + 12 + 8, struct.pack("<q", 1 << 40)), r"p\.bin: truncated or wrong"),
        (lambda idx, bin_: _patch(idx, 34 + 36 + 8, struct.pack("<q", 9)), r"doc_idx values span \[0, 9\]"),
    ],
)
def test_corrupt_pairs_raise_one_clear_error(pair, damage, message):
    prefix, idx, bin_ = pair
    damage(idx, bin_)
    with pytest.raises(RetraceError, match=message):
        IndexedDataset(prefix)


def test_non_contiguous_index_cannot_be_a_stream(tmp_path):
    """Valid (pointers fit) but out of order: readable per sequence, refused as a single stream."""
    data = np.arange(8, dtype=np.uint16)
    (tmp_path / "s.bin").write_bytes(data.tobytes())
    write_index(tmp_path / "s.idx", np.uint16, [4, 4], [0, 1, 2])
    raw = bytearray((tmp_path / "s.idx").read_bytes())
    raw[42:58] = struct.pack("<qq", 8, 0)  # swap the two pointers
    (tmp_path / "s.idx").write_bytes(bytes(raw))
    with IndexedDataset(tmp_path / "s") as ds:
        assert ds[0].tolist() == [4, 5, 6, 7] and ds[1].tolist() == [0, 1, 2, 3]
        assert not ds.contiguous
        with pytest.raises(RetraceError, match="not stored contiguously"):
            ds.stream()


def test_get_out_of_range(pair):
    prefix, _, _ = pair
    with IndexedDataset(prefix) as ds:
        with pytest.raises(IndexError):
            ds.get(3)
        with pytest.raises(IndexError):
            ds.get(0, offset=8, length=3)


# -- security -----------------------------------------------------------------------------------------

def test_pointer_overflow_is_caught(pair):
    """A crafted .idx whose pointer is near 2**63: pointer + size*itemsize wraps to a negative int64 that
    a plain ``ends > file size`` bound lets through; it must be refused at open."""
    prefix, idx, _ = pair
    n = 3
    pointer = (1 << 63) - 4  # even (uint16 items), positive, and 5 tokens past it overflow int64
    _patch(idx, 34 + 4 * n + 8, struct.pack("<q", pointer))
    assert (pointer + 5 * 2) > np.iinfo(np.int64).max  # it really wraps in int64
    with pytest.raises(RetraceError, match=r"p\.bin: truncated or wrong \.bin: sequence 1"):
        IndexedDataset(prefix)


def test_builder_temporaries_do_not_follow_planted_symlinks(tmp_path):
    """The builder's temporary files get unpredictable names created with O_EXCL: a symlink planted at the
    old predictable name (``<prefix>.bin.<pid>.tmp``) cannot redirect the write onto another file."""
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    for suffix in ("bin", "idx"):
        os.symlink(victim, tmp_path / "out" / f"x.{suffix}.{os.getpid()}.tmp")
    write_indexed(tmp_path / "out" / "x", [np.arange(50, dtype=np.uint16)])
    assert victim.read_text() == "precious"
    with IndexedDataset(tmp_path / "out" / "x") as ds:
        assert ds[0].tolist() == list(range(50))
    assert oct((tmp_path / "out" / "x.bin").stat().st_mode & 0o777) != oct(0o600)  # usual mode, not mkstemp's
