"""The Pile variant registry, the fetch plan, and prepare → read in place, offline through a real Hugging Face
cache (huggingface_hub's layout, with its tree listing) holding a sharded fixture."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from retrace.checkpoints.hubcache import publish_to_hub_cache
from retrace.data import open_training_data, write_indexed
from retrace.data.shards import load_manifest, manifest_path
from retrace.data.variants import (
    VARIANTS,
    VariantSource,
    plan_variant_fetch,
    prepare_variant,
    registry_table,
    shard_file,
    variant_source,
)
from retrace.errors import RetraceError

REPO = "retrace-test/tiny-preshuffled"
COMMIT = "c0ffee" + "0" * 34


def _variant(**kw) -> VariantSource:
    return VariantSource(**kw)


# -- the registry ---------------------------------------------------------------------------------------

def test_registry_facts():
    dr = variant_source("deduped", "raw")
    assert dr.repo_id == "EleutherAI/pythia_deduped_pile_idxmaps" and dr.num_shards == 83
    files = dr.shard_files()
    assert files[0] == "pile_0.87_deduped_text_document-00000-of-00082.bin"
    assert files[-1] == "pile_0.87_deduped_text_document-00082-of-00082.bin"
    assert dr.idx_repo_file() == "pile_0.87_deduped_text_document.idx"
    assert dr.bin_sha256 == "0cd548efd15974d5cca78f9baddbd59220ca675535dcfc0c350087c79f504693"
    assert len(dr.shard_sha256) == 83 and len(set(dr.shard_sha256)) == 83
    assert dr.revision == "main"  # head commit not established: resolved once and recorded
    commits = {"standard": "bac79b6820adb34e451f9a02cc1dc7cd920febf0",
               "deduped": "4647773ea142ab1ff5694602fa104bbf49088408"}
    for data in ("standard", "deduped"):
        s = variant_source(data, "preshuffled")
        assert s.repo_id == f"EleutherAI/pile-{data}-pythia-preshuffled" and s.num_shards == 21
        assert s.revision == commits[data]
        assert s.shard_files()[0] == "document-00000-of-00020.bin"
        assert s.shard_files()[-1] == "document-00020-of-00020.bin"
        assert s.idx_repo_file() == "document.idx"
        # 143000 steps x 1024 items x 2049 uint16 tokens, in shards of 30e9 bytes
        assert sum(s.layout()) == 143000 * 1024 * 2049 * 2 == 600_078_336_000
        assert s.layout()[:-1] == [30_000_000_000] * 20 and s.layout()[-1] == 78_336_000
        assert s.idx_bytes == 1_757_184_042
    assert variant_source("standard", "raw").repo_id is None
    assert len(registry_table()) == len(VARIANTS) == 4
    with pytest.raises(RetraceError, match="unknown data variant"):
        variant_source("dedup", "raw")


def test_standard_raw_needs_a_path(tmp_path):
    with pytest.raises(RetraceError, match="pass path="):
        prepare_variant("standard", "raw", tmp_path)


# -- the plan ---------------------------------------------------------------------------------------------

ITEM = 2049 * 2  # bytes of one preshuffled item
SHARD = 30_000_000_000


def test_plan_of_the_70m_control():
    """studies/pythia-70m-control.yaml: every cell trains steps [0, 1000) at global batch 1024 on both
    preshuffled Piles: items [0, 1,024,000) = bytes [0, 4,196,352,000), inside shard 0."""
    for data in ("deduped", "standard"):
        plan = plan_variant_fetch(data, "preshuffled", max_items=1000 * 1024)
        assert plan.items == (0, 1_024_000) and plan.byte_range == (0, 1_024_000 * ITEM) == (0, 4_196_352_000)
        assert plan.shards == (0,) and plan.exact
        assert [f.name for f in plan.files] == ["document.idx", "document-00000-of-00020.bin"]
        assert plan.fetch_bytes == plan.disk_bytes == SHARD + 1_757_184_042 == 31_757_184_042
        # before: all 21 shards downloaded, then a merged copy of the whole .bin and the .idx
        assert plan.legacy_fetch_bytes == 600_078_336_000 + 1_757_184_042
        assert plan.legacy_disk_bytes == 2 * plan.legacy_fetch_bytes
        line = plan.describe()
        assert "shard 00000 of 21" in line and "fetch 31.8 GB, disk 31.8 GB" in line
        assert "download 601.8 GB, disk 1,203.7 GB" in line


def test_plan_shard_boundaries_growth_and_offsets():
    last_in_0 = SHARD // ITEM  # 7,320,644 items end at byte 29,999,999,112; item 7,320,644 straddles
    assert last_in_0 * ITEM <= SHARD < (last_in_0 + 1) * ITEM
    assert plan_variant_fetch("deduped", "preshuffled", max_items=last_in_0).shards == (0,)
    assert plan_variant_fetch("deduped", "preshuffled", max_items=last_in_0 + 1).shards == (0, 1)
    full = plan_variant_fetch("deduped", "preshuffled", max_items=143000 * 1024)
    assert full.shards == tuple(range(21)) and full.disk_bytes == full.legacy_fetch_bytes
    # growing from step 1000 to 20000: shards 0..2 are needed, shard 0 is already there
    grow = plan_variant_fetch("deduped", "preshuffled", max_items=20000 * 1024, have={0}, have_idx=True)
    assert grow.shards == (0, 1, 2) and grow.fetch_bytes == 2 * SHARD
    # a segment restarted at step 100000 reads items from 102,400,000 on
    seg = plan_variant_fetch("deduped", "preshuffled", first_item=100000 * 1024, max_items=101000 * 1024)
    assert seg.shards == (13, 14)  # 102,400,000·4098 = 419.6e9: shard 13; 103,424,000·4098 = 423.8e9: 14
    # permuted items come from anywhere in the stream: everything
    assert plan_variant_fetch("deduped", "preshuffled", max_items=1024, shuffle_samples=True).shards == \
        tuple(range(21))
    raw = plan_variant_fetch("deduped", "raw", max_items=1024)
    assert raw.shards == tuple(range(83)) and not raw.exact  # the last shard's size comes from the Hub
    assert raw.fetch_bytes == 82 * 5_000_000_000  # a lower bound
    assert plan_variant_fetch("standard", "raw").repo_id is None
    with pytest.raises(RetraceError, match="holds 146,432,000 items"):
        plan_variant_fetch("deduped", "preshuffled", max_items=143001 * 1024)
    with pytest.raises(RetraceError, match="empty"):
        plan_variant_fetch("deduped", "preshuffled", first_item=10, max_items=10)


# -- prepare, offline, from a real cache -----------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A 4-shard preshuffled repo (30 items of 17 tokens = 1020 bytes; shards 300, 300, 300, 120 bytes)
    published into a real huggingface_hub cache at a pinned commit; the Hub is offline."""
    import huggingface_hub.constants

    items = np.random.RandomState(0).randint(0, 50000, (30, 17)).astype(np.uint16)
    write_indexed(tmp_path / "src" / "document", list(items))
    shards = shard_file(tmp_path / "src" / "document.bin", tmp_path / "shards", shard_bytes=300)
    assert [p.stat().st_size for p in shards] == [300, 300, 300, 120]
    cache = tmp_path / "hf"
    publish_to_hub_cache(cache, REPO, "main", {**{p.name: p for p in shards}, "document.idx":
                                                tmp_path / "src" / "document.idx"},
                         commit_hash=COMMIT, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    idx = (tmp_path / "src" / "document.idx").read_bytes()
    source = _variant(data="deduped", kind="preshuffled", name="document", repo_id=REPO, revision=COMMIT,
                      num_shards=4, idx_file="document.idx", shard_bytes=300, bin_bytes=1020,
                      idx_bytes=len(idx))
    return source, cache, items, shards


def _prepare(source, tmp_path, cache, **kw):
    lines = []
    prefix = prepare_variant(source, dest=tmp_path / "res", cache_dir=cache, seq_length=16,
                             log=lines.append, **kw)
    return prefix, lines


def _blob(cache, data: bytes):
    return cache / f"datasets--{REPO.replace('/', '--')}" / "blobs" / _sha(data)


def test_fetches_only_the_needed_shards_and_reads_them_in_place(hub, tmp_path):
    source, cache, items, shards = hub
    prefix, lines = _prepare(source, tmp_path, cache, max_items=8)  # bytes [0, 272): shard 0
    assert prefix == tmp_path / "res" / "document"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["document.shards.json"]  # no merged copy
    m = load_manifest(manifest_path(prefix)).data
    assert m["commit"] == COMMIT and m["bin_bytes"] == 1020
    assert [s["path"] is not None for s in m["shards"]] == [True, False, False, False]
    assert m["shards"][0]["sha256"] == _sha(shards[0].read_bytes()) and m["shards"][0]["sha256_source"] == "hub"
    assert m["idx"]["sha256_source"] == "recorded"  # the cache's listing has no LFS hash for it
    assert m["shards"][0]["path"].startswith(str(cache))  # read where huggingface_hub put it
    assert [line for line in lines if "fetching" in line] == [
        "deduped/preshuffled: fetching document.idx (0.0 GB)",
        "deduped/preshuffled: fetching document-00000-of-00003.bin (0.0 GB)"]
    data = open_training_data(prefix, kind="preshuffled", seq_length=16)
    np.testing.assert_array_equal(data.samples(range(8)), items[:8].astype(np.int64))
    data.check_enough(2, 4)
    with pytest.raises(RetraceError, match="document-00001-of-00003.bin not fetched"):
        data.check_enough(3, 4)


def test_growing_fetches_the_missing_shards_and_nothing_else(hub, tmp_path):
    source, cache, items, _ = hub
    _prepare(source, tmp_path, cache, max_items=8)
    prefix, lines = _prepare(source, tmp_path, cache, max_items=20)  # bytes [0, 680): shards 0, 1, 2
    fetched = [line.split("fetching ")[1].split(" ")[0] for line in lines if "fetching" in line]
    assert fetched == ["document-00001-of-00003.bin", "document-00002-of-00003.bin"]  # shard 0, idx: kept
    m = load_manifest(manifest_path(prefix)).data
    assert [s["path"] is not None for s in m["shards"]] == [True, True, True, False]
    np.testing.assert_array_equal(open_training_data(prefix, kind="preshuffled", seq_length=16).samples(range(20)),
                                  items[:20].astype(np.int64))
    # a smaller plan later keeps what is there
    _, lines = _prepare(source, tmp_path, cache, max_items=4)
    assert not [line for line in lines if "fetching" in line]
    assert [s["path"] is not None for s in load_manifest(manifest_path(prefix)).data["shards"]][:3] == [True] * 3


def test_corrupt_cached_shard_is_refused_and_removed(hub, tmp_path):
    source, cache, _, shards = hub
    blob = _blob(cache, shards[1].read_bytes())
    blob.write_bytes(b"\0" * 300)
    with pytest.raises(RetraceError, match=r"document-00001-of-00003\.bin .* does not match the hub"):
        _prepare(source, tmp_path, cache, max_items=20)
    assert not blob.exists()  # the next run downloads it again instead of finding it
    assert not manifest_path(tmp_path / "res" / "document").exists()  # nothing half-recorded


def test_published_hash_mismatch(hub, tmp_path):
    source, cache, _, shards = hub
    listed = [_sha(p.read_bytes()) for p in shards]
    wrong = dataclasses.replace(source, shard_sha256=("f" * 64, *listed[1:]))
    with pytest.raises(RetraceError, match="the Hub's LFS sha256 of document-00000-of-00003.bin is .* but the "
                                           "published one is f{64}"):
        _prepare(wrong, tmp_path, cache, max_items=8)
    pub = dataclasses.replace(source, shard_sha256=tuple(listed))
    prefix, _ = _prepare(pub, tmp_path, cache, max_items=8)
    assert load_manifest(manifest_path(prefix)).data["shards"][0]["sha256_source"] == "published"
    idx_blob = Path(os.path.realpath(load_manifest(manifest_path(prefix)).data["idx"]["path"]))
    assert idx_blob.exists() and idx_blob.parent.name == "blobs"
    with pytest.raises(RetraceError, match=r"document\.idx .* does not match the published 1{64}"):
        _prepare(dataclasses.replace(pub, idx_sha256="1" * 64), tmp_path, cache, max_items=8, rehash=True)
    assert not idx_blob.exists()  # content that fails its hash is not left in the cache


def test_missing_shard_and_missing_from_cache(hub, tmp_path):
    source, cache, _, _ = hub
    more = dataclasses.replace(source, num_shards=5, shard_bytes=300, bin_bytes=1320)
    with pytest.raises(RetraceError, match=r"missing on the Hub: document-00000-of-00004\.bin, .* and 2 more"):
        _prepare(more, tmp_path, cache, max_items=8)
    tree = cache / f"datasets--{REPO.replace('/', '--')}" / "trees" / f"{COMMIT}.json"
    tree.unlink()  # no listing: the file list is unknown offline, the download itself says what is missing
    with pytest.raises(RetraceError, match=r"document-00000-of-00004\.bin: offline and not in the Hugging Face"):
        _prepare(more, tmp_path, cache, max_items=8)


def test_hash_recorded_at_first_download_is_checked_later(hub, tmp_path):
    """No published hash (the .idx has none here): the first download's sha256 is recorded; an edit of the
    cached file later is caught by the next prepare and by every open, even with its mtime set back."""
    source, cache, _, _ = hub
    prefix, _ = _prepare(source, tmp_path, cache, max_items=8)
    idx = load_manifest(manifest_path(prefix)).data["idx"]["path"]
    st = os.stat(idx)
    raw = bytearray(open(idx, "rb").read())
    raw[-1] ^= 1  # the last doc_idx entry: still a valid index
    with open(os.path.realpath(idx), "wb") as fh:
        fh.write(bytes(raw))
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RetraceError, match="changed since its sha256 was checked"):
        open_training_data(prefix, kind="preshuffled", seq_length=16)
    with pytest.raises(RetraceError, match="differs from .*, recorded when it was first used"):
        _prepare(source, tmp_path, cache, max_items=8)


def test_branch_is_resolved_once_and_pinned(hub, tmp_path):
    source, cache, _, shards = hub
    on_main = dataclasses.replace(source, revision="main")
    prefix, lines = _prepare(on_main, tmp_path, cache, max_items=8)
    assert any(f"main is commit {COMMIT}; recorded" in line for line in lines)
    m = load_manifest(manifest_path(prefix)).data
    assert (m["revision"], m["commit"]) == ("main", COMMIT)
    # main moves on the Hub (here: the cached ref); the variant keeps its recorded commit
    ref = cache / f"datasets--{REPO.replace('/', '--')}" / "refs" / "main"
    ref.write_text("d" * 40)
    _prepare(on_main, tmp_path, cache, max_items=20)
    assert load_manifest(manifest_path(prefix)).data["commit"] == COMMIT
    ref.write_text("d" * 40 + "\nx")
    manifest_path(prefix).unlink()
    with pytest.raises(RetraceError, match="not a 40-hex commit"):
        _prepare(on_main, tmp_path, cache, max_items=8)


def test_merged_copy_from_before_is_ignored(hub, tmp_path):
    source, cache, items, _ = hub
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "document.bin").write_bytes(b"\1" * 1020)
    (tmp_path / "res" / "document.idx").write_bytes((tmp_path / "src" / "document.idx").read_bytes())
    prefix, lines = _prepare(source, tmp_path, cache, max_items=8)
    assert any("no longer read" in line and "delete it" in line for line in lines)
    np.testing.assert_array_equal(open_training_data(prefix, kind="preshuffled", seq_length=16).sample(0),
                                  items[0].astype(np.int64))


# -- path: copies ----------------------------------------------------------------------------------------

def test_local_copy_recorded_and_not_reread(hub, tmp_path):
    """``path:`` copies: the .idx/.bin sha256 are recorded under the record directory on first use, and a
    later edit (same size, structure intact, modification time set back) is refused."""
    source, *_ = hub
    src = tmp_path / "src" / "document"
    dest = tmp_path / "res"
    prepare_variant(source, dest=dest, path=str(src) + ".bin")
    lines = []
    prepare_variant(source, dest=dest, path=src, log=lines.append)
    assert sum("unchanged since its sha256 was checked" in line for line in lines) == 2  # not re-read
    bin_path = tmp_path / "src" / "document.bin"
    st = os.stat(bin_path)
    raw = bytearray(bin_path.read_bytes())
    raw[100] ^= 0xFF
    bin_path.write_bytes(bytes(raw))
    os.utime(bin_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RetraceError, match="recorded when it was first used"):
        prepare_variant(source, dest=dest, path=src)


def test_local_copy_against_published_hashes(hub, tmp_path):
    source, *_ = hub
    src = tmp_path / "src" / "document"
    bin_sha = _sha((tmp_path / "src" / "document.bin").read_bytes())
    good = dataclasses.replace(source, bin_sha256=bin_sha)
    prefix = prepare_variant(good, dest=tmp_path / "ok", path=src)
    m = json.loads(manifest_path(prefix).read_text())
    assert m["shards"][0]["sha256_source"] == "published" and m["idx"]["sha256_source"] == "recorded"
    assert open_training_data(prefix, kind="preshuffled", seq_length=16).sample(3).shape == (17,)
    with pytest.raises(RetraceError, match="does not match the published 2{64}"):
        prepare_variant(dataclasses.replace(source, bin_sha256="2" * 64), dest=tmp_path / "bad", path=src)
    (tmp_path / "src" / "document.bin").write_bytes(b"\0" * 10)
    with pytest.raises(RetraceError, match="truncated or wrong"):
        prepare_variant(source, dest=tmp_path / "t", path=src)
