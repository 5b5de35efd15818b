"""The Pile variant registry and download → unshard → verify, offline through a real Hugging Face cache."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from retrace.checkpoints.hubcache import publish_to_hub_cache
from retrace.data import open_training_data, write_indexed
from retrace.data.variants import (
    VARIANTS,
    VariantSource,
    prepare_variant,
    registry_table,
    shard_file,
    variant_source,
)
from retrace.errors import RetraceError


def test_registry_facts():
    dr = variant_source("deduped", "raw")
    assert dr.repo_id == "EleutherAI/pythia_deduped_pile_idxmaps" and dr.num_shards == 83
    files = dr.shard_files()
    assert files[0] == "pile_0.87_deduped_text_document-00000-of-00082.bin"
    assert files[-1] == "pile_0.87_deduped_text_document-00082-of-00082.bin"
    assert dr.idx_repo_file() == "pile_0.87_deduped_text_document.idx"
    assert dr.bin_sha256 == "0cd548efd15974d5cca78f9baddbd59220ca675535dcfc0c350087c79f504693"
    assert len(dr.shard_sha256) == 83 and len(set(dr.shard_sha256)) == 83
    for data in ("standard", "deduped"):
        s = variant_source(data, "preshuffled")
        assert s.repo_id == f"EleutherAI/pile-{data}-pythia-preshuffled" and s.num_shards == 21
        assert s.shard_files()[0] == "document-00000-of-00020.bin"
        assert s.shard_files()[-1] == "document-00020-of-00020.bin"
        assert s.idx_repo_file() == "document.idx"
    assert variant_source("standard", "raw").repo_id is None
    assert len(registry_table()) == len(VARIANTS) == 4
    with pytest.raises(RetraceError, match="unknown data variant"):
        variant_source("dedup", "raw")


def test_standard_raw_needs_a_path(tmp_path):
    with pytest.raises(RetraceError, match="pass path="):
        prepare_variant("standard", "raw", tmp_path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A 4-shard dataset repo published into a real huggingface_hub cache; the Hub is offline."""
    import huggingface_hub.constants

    items = np.random.RandomState(0).randint(0, 50000, (30, 17)).astype(np.uint16)
    src = write_indexed(tmp_path / "src" / "document", list(items))
    bin_bytes = (tmp_path / "src" / "document.bin").read_bytes()
    idx_bytes = (tmp_path / "src" / "document.idx").read_bytes()
    shards = shard_file(tmp_path / "src" / "document.bin", tmp_path / "shards", shard_bytes=300)
    assert len(shards) == 4 and [p.name for p in shards][-1] == "document-00003-of-00003.bin"
    cache = tmp_path / "hf"
    publish_to_hub_cache(cache, "retrace-test/tiny-preshuffled", "main",
                         {**{p.name: p for p in shards}, "document.idx": src.parent / "document.idx"},
                         repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = VariantSource(
        data="deduped", kind="preshuffled", name="document", repo_id="retrace-test/tiny-preshuffled",
        num_shards=4, idx_file="document.idx", bin_sha256=_sha(bin_bytes), idx_sha256=_sha(idx_bytes),
        shard_sha256=tuple(_sha(p.read_bytes()) for p in shards))
    return source, cache, bin_bytes, idx_bytes, items


def test_download_unshard_verify_offline(fake_repo, tmp_path):
    source, cache, bin_bytes, idx_bytes, items = fake_repo
    dest = tmp_path / "merged"
    prefix = prepare_variant(source, dest=dest, cache_dir=cache)
    assert prefix == dest / "document"
    assert (dest / "document.bin").read_bytes() == bin_bytes
    assert (dest / "document.idx").read_bytes() == idx_bytes
    assert sorted(p.name for p in dest.iterdir()) == ["document.bin", "document.idx", "document.retrace.json"]
    data = open_training_data(prefix, kind="preshuffled", seq_length=16)
    np.testing.assert_array_equal(data.samples(range(30)), items.astype(np.int64))
    # done once: a second call trusts the completed merge (even with the cache gone)
    for p in cache.rglob("*"):
        if p.is_file() or p.is_symlink():
            p.unlink()
    assert prepare_variant(source, dest=dest, cache_dir=cache) == prefix


@pytest.mark.parametrize("what", ["bin", "shard", "idx"])
def test_hash_mismatch_leaves_no_merged_file(fake_repo, tmp_path, what):
    source, cache, *_ = fake_repo
    if what == "bin":
        bad = dataclasses.replace(source, bin_sha256="0" * 64)
        message = r"merged .*document\.bin would have sha256"
    elif what == "shard":
        hashes = list(source.shard_sha256)
        hashes[2] = "f" * 64
        bad = dataclasses.replace(source, shard_sha256=tuple(hashes))
        message = r"shard document-00002-of-00003\.bin .* has sha256"
    else:
        bad = dataclasses.replace(source, idx_sha256="1" * 64)
        message = r"document\.idx .* has sha256"
    dest = tmp_path / "merged"
    with pytest.raises(RetraceError, match=message):
        prepare_variant(bad, dest=dest, cache_dir=cache)
    assert list(dest.iterdir()) == []  # no .bin, no .idx, no temporaries


def test_corrupt_cached_shard_is_caught(fake_repo, tmp_path):
    source, cache, *_ = fake_repo
    blob = next(p for p in (cache / "datasets--retrace-test--tiny-preshuffled" / "blobs").iterdir()
                if p.stat().st_size == 300)
    blob.write_bytes(b"\0" * 300)
    with pytest.raises(RetraceError, match="has sha256"):
        prepare_variant(source, dest=tmp_path / "m", cache_dir=cache)
    assert not (tmp_path / "m" / "document.bin").exists()


def test_missing_from_offline_cache(fake_repo, tmp_path):
    source, cache, *_ = fake_repo
    more = dataclasses.replace(source, num_shards=5, shard_sha256=None, bin_sha256=None)
    with pytest.raises(RetraceError, match=r"cannot fetch document-00000-of-00004\.bin \(offline"):
        prepare_variant(more, dest=tmp_path / "m", cache_dir=cache)


def test_local_path(fake_repo, tmp_path):
    source, *_ = fake_repo
    src = tmp_path / "src" / "document"
    assert prepare_variant(source, path=str(src) + ".bin") == src
    assert prepare_variant(source, path=src, verify=True) == src
    with pytest.raises(RetraceError, match="does not match the published"):
        prepare_variant(dataclasses.replace(source, bin_sha256="2" * 64), path=src, verify=True)
    (tmp_path / "src" / "document.bin").write_bytes(b"\0" * 10)
    with pytest.raises(RetraceError, match="truncated or wrong"):
        prepare_variant(source, path=src)
