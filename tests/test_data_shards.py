"""One .bin read in place from its shards: reads across boundaries, absent shards, the manifest's checks."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from retrace.data import open_training_data, write_indexed
from retrace.data.indexed import IndexedDataset
from retrace.data.integrity import file_stamp
from retrace.data.shards import MANIFEST_FORMAT, Piece, ShardedBin, load_manifest, manifest_path
from retrace.data.variants import shard_file
from retrace.errors import RetraceError


@pytest.fixture
def sharded(tmp_path):
    """A 9-token-item stream (seq 8) of 40 items, cut into 8 shards of 100 bytes (items straddle them)."""
    items = np.random.RandomState(5).randint(0, 60000, (40, 9)).astype(np.uint16)
    write_indexed(tmp_path / "src" / "document", list(items))
    shards = shard_file(tmp_path / "src" / "document.bin", tmp_path / "shards", shard_bytes=100)
    return tmp_path, items, shards


def _entry(path, name=None, **extra):
    data = path.read_bytes()
    return {"name": name or path.name, "path": str(path), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "sha256_source": "recorded", "stamp": file_stamp(path),
            **extra}


def _write_manifest(prefix, idx, shards, fetched=None):
    fetched = set(range(len(shards))) if fetched is None else fetched
    rows, pos = [], 0
    for i, p in enumerate(shards):
        size = p.stat().st_size
        row = _entry(p, offset=pos) if i in fetched else {"name": p.name, "path": None, "offset": pos,
                                                          "size": size}
        rows.append(row)
        pos += size
    data = {"format": MANIFEST_FORMAT, "variant": "test/preshuffled", "repo_id": None, "revision": None,
            "commit": None, "idx": _entry(idx), "shards": rows, "bin_bytes": pos}
    manifest_path(prefix).write_text(json.dumps(data))
    return data


def test_reads_across_shard_boundaries(sharded):
    tmp_path, items, shards = sharded
    whole = (tmp_path / "src" / "document.bin").read_bytes()
    assert len(shards) == 8 and [p.stat().st_size for p in shards][-1] == len(whole) - 700
    pieces, pos = [], 0
    for p in shards:
        pieces.append(Piece(p.name, pos, p.stat().st_size, p))
        pos += p.stat().st_size
    b = ShardedBin(pieces, label="t")
    assert b.size == len(whole)
    rng = np.random.RandomState(0)
    for _ in range(200):
        a = int(rng.randint(0, len(whole)))
        n = int(rng.randint(0, len(whole) - a + 1))
        assert b.read(a, n).tobytes() == whole[a:a + n]
    with pytest.raises(RetraceError, match="out of range"):
        b.read(len(whole) - 1, 2)


def test_indexed_dataset_through_a_manifest(sharded):
    tmp_path, items, shards = sharded
    prefix = tmp_path / "view" / "document"
    prefix.parent.mkdir()
    _write_manifest(prefix, tmp_path / "src" / "document.idx", shards)
    with IndexedDataset(prefix) as ds:
        assert ds.manifest is not None and len(ds) == 40 and ds.contiguous
        for i in range(40):
            np.testing.assert_array_equal(ds[i], items[i])
    data = open_training_data(prefix, kind="preshuffled", seq_length=8)
    np.testing.assert_array_equal(data.samples(range(40)), items.astype(np.int64))


def test_absent_shards_are_refused_by_name(sharded):
    tmp_path, items, shards = sharded
    prefix = tmp_path / "view" / "document"
    prefix.parent.mkdir()
    _write_manifest(prefix, tmp_path / "src" / "document.idx", shards, fetched={0, 1})  # bytes [0, 200)
    data = open_training_data(prefix, kind="preshuffled", seq_length=8)
    assert len(data) == 40  # the stream's length; only some of it is readable
    np.testing.assert_array_equal(data.samples(range(11)), items[:11].astype(np.int64))  # 11*18 = 198 <= 200
    with pytest.raises(RetraceError, match=r"stream item 11, which lies in shard\(s\) document-00002-of-00007\.bin"):
        data.sample(11)
    data.check_enough(2, 5)  # items [0, 10)
    with pytest.raises(RetraceError, match="document-00002-of-00007.bin not fetched"):
        data.check_enough(3, 5)
    with pytest.raises(RetraceError, match="raw data is read through index maps over the whole corpus"):
        open_training_data(prefix, kind="raw", seq_length=8, num_samples=10)


def test_manifest_wins_over_a_bin_beside_it(sharded):
    tmp_path, items, shards = sharded
    prefix = tmp_path / "view" / "document"
    prefix.parent.mkdir()
    _write_manifest(prefix, tmp_path / "src" / "document.idx", shards)
    (tmp_path / "view" / "document.bin").write_bytes(b"\0" * 720)  # e.g. an old merged copy, wrong
    with IndexedDataset(prefix) as ds:
        np.testing.assert_array_equal(ds[3], items[3])


def test_a_changed_file_is_refused_at_open(sharded):
    """Every open compares each listed file's stamp with the one recorded when its hash was checked; an
    edit is caught even when the modification time is set back (the status-change time moves)."""
    tmp_path, items, shards = sharded
    prefix = tmp_path / "view" / "document"
    prefix.parent.mkdir()
    _write_manifest(prefix, tmp_path / "src" / "document.idx", shards)
    st = os.stat(shards[3])
    raw = bytearray(shards[3].read_bytes())
    raw[0] ^= 1
    shards[3].write_bytes(bytes(raw))
    os.utime(shards[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RetraceError, match=r"document-00003-of-00007\.bin .* changed since its sha256 was checked"):
        IndexedDataset(prefix)
    shards[3].unlink()
    with pytest.raises(RetraceError, match="is missing since"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(commit="a" * 40 + "\n"), "commit must be 40 lowercase hex digits"),
        (lambda m: m["shards"][0].update(sha256=m["shards"][0]["sha256"] + "\n"), r"shards\[0\]\.sha256"),
        (lambda m: m["shards"][1].update(path="relative/shard.bin"), r"shards\[1\]\.path must be an absolute"),
        (lambda m: m["shards"][1].update(offset=101), r"shards\[1\] starts at 101"),
        (lambda m: m.update(bin_bytes=1), "bin_bytes 1 is not the sum"),
        (lambda m: m["idx"].update(sha256_source="trust me"), r"idx\.sha256_source"),
        (lambda m: m.update(format="other"), "format is not"),
    ],
)
def test_manifest_validation(sharded, edit, message):
    tmp_path, _, shards = sharded
    prefix = tmp_path / "document"
    data = _write_manifest(prefix, tmp_path / "src" / "document.idx", shards)
    edit(data)
    manifest_path(prefix).write_text(json.dumps(data))
    with pytest.raises(RetraceError, match=message):
        load_manifest(manifest_path(prefix))
