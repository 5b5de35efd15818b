"""Downloads through the real huggingface_hub client from a local Hub endpoint (tests/hubserver.py):
only the needed shards travel, the commit is pinned once, and each failure (a shard missing on the Hub, a
download whose sha256 does not match the Hub's LFS sha256, the disk filling up mid-download on a real
tmpfs) gives one clear error and leaves nothing a later run would trust."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess

import numpy as np
import pytest

from hubserver import LocalHub
from retrace.data import open_training_data, write_indexed
from retrace.data.hubfetch import fetch
from retrace.data.shards import load_manifest, manifest_path
from retrace.data.variants import VariantSource, prepare_variant, shard_file
from retrace.errors import RetraceError

REPO = "retrace-test/preshuffled"
COMMIT = "ab" * 20
SEQ = 2048  # real Pythia items: 2049 uint16 tokens = 4098 bytes
SHARD = 600_000


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def hub(tmp_path, online):
    """440 items of 2049 tokens (1,803,120 bytes) in shards of 600,000 bytes, served at COMMIT (= main)."""
    items = np.random.RandomState(1).randint(0, 50277, (440, SEQ + 1)).astype(np.uint16)
    write_indexed(tmp_path / "src" / "document", list(items))
    shards = shard_file(tmp_path / "src" / "document.bin", tmp_path / "shards", shard_bytes=SHARD)
    files = {p.name: p.read_bytes() for p in shards}
    files["document.idx"] = (tmp_path / "src" / "document.idx").read_bytes()
    server = LocalHub().start()
    server.add(REPO, COMMIT, files)
    source = VariantSource(data="deduped", kind="preshuffled", name="document", repo_id=REPO, revision=COMMIT,
                           num_shards=len(shards), idx_file="document.idx")
    try:
        yield server, source, items, files
    finally:
        server.stop()


def _prepare(server, source, dest, cache, **kw):
    return prepare_variant(source, dest=dest, cache_dir=cache, seq_length=SEQ, endpoint=server.endpoint, **kw)


def test_only_the_needed_shards_are_downloaded(hub, tmp_path):
    server, source, items, files = hub
    names = sorted(n for n in files if n.endswith(".bin"))
    assert len(names) == 4
    prefix = _prepare(server, source, tmp_path / "res", tmp_path / "hf", max_items=100)  # 409,800 bytes: shard 0
    assert server.served == {"document.idx": len(files["document.idx"]), names[0]: SHARD}
    m = load_manifest(manifest_path(prefix)).data
    assert m["commit"] == COMMIT and m["idx"]["sha256_source"] == "hub"
    assert m["shards"][0]["sha256"] == hashlib.sha256(files[names[0]]).hexdigest()
    data = open_training_data(prefix, kind="preshuffled", seq_length=SEQ)
    np.testing.assert_array_equal(data.samples(range(100)), items[:100].astype(np.int64))
    # growing to item 300 (bytes up to 1,229,400) downloads shards 1 and 2, nothing else
    _prepare(server, source, tmp_path / "res", tmp_path / "hf", max_items=300)
    assert server.served == {"document.idx": len(files["document.idx"]), names[0]: SHARD, names[1]: SHARD,
                             names[2]: SHARD}
    data = open_training_data(prefix, kind="preshuffled", seq_length=SEQ)
    np.testing.assert_array_equal(data.samples(range(146, 147)), items[146:147].astype(np.int64))  # straddles


def test_main_is_resolved_once_then_pinned(hub, tmp_path):
    server, source, _, files = hub
    on_main = VariantSource(**{**source.__dict__, "revision": "main"})
    prefix = _prepare(server, on_main, tmp_path / "res", tmp_path / "hf", max_items=10)
    assert load_manifest(manifest_path(prefix)).data["commit"] == COMMIT
    other = {**files, "document-00000-of-00003.bin": b"\7" * SHARD}
    server.add(REPO, "cd" * 20, other)  # main moves to a commit with other content
    before = dict(server.served)
    _prepare(server, on_main, tmp_path / "res", tmp_path / "hf", max_items=10)
    assert load_manifest(manifest_path(prefix)).data["commit"] == COMMIT and server.served == before


def test_shard_missing_on_the_hub(hub, tmp_path):
    server, source, _, files = hub
    gap = "ef" * 20
    server.add(REPO, gap, {k: v for k, v in files.items() if k != "document-00002-of-00003.bin"}, branch=None)
    holed = VariantSource(**{**source.__dict__, "revision": gap})
    with pytest.raises(RetraceError, match=r"missing on the Hub: document-00002-of-00003\.bin \(the commit's file "
                                           r"list, from the hub, has 4 files\); nothing was downloaded"):
        _prepare(server, holed, tmp_path / "res", tmp_path / "hf", max_items=10)  # even if shard 2 is not read
    assert server.served == {}
    with pytest.raises(RetraceError, match=r"nope\.bin: missing on the Hub \(the commit has no such file\)"):
        fetch(REPO, "nope.bin", COMMIT, cache_dir=tmp_path / "hf", endpoint=server.endpoint)
    assert not manifest_path(tmp_path / "res" / "document").exists()


def test_download_that_fails_its_hash(hub, tmp_path):
    server, source, _, files = hub
    dest, cache = tmp_path / "res", tmp_path / "hf"
    prefix = _prepare(server, source, dest, cache, max_items=100)
    before = manifest_path(prefix).read_bytes()
    name = "document-00001-of-00003.bin"
    server.tamper[name] = b"\0" * SHARD  # the wire carries other bytes than the Hub's LFS sha256 says
    with pytest.raises(RetraceError, match=rf"{name} .* does not match the hub"):
        _prepare(server, source, dest, cache, max_items=200)
    blobs = cache / f"datasets--{REPO.replace('/', '--')}" / "blobs"
    assert not (blobs / hashlib.sha256(files[name]).hexdigest()).exists()  # not left to be found later
    assert manifest_path(prefix).read_bytes() == before  # the record still says what it said
    del server.tamper[name]
    _prepare(server, source, dest, cache, max_items=200)
    assert [s["path"] is not None for s in load_manifest(manifest_path(prefix)).data["shards"]] == \
        [True, True, False, False]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs for the Hugging Face cache (needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


@pytest.mark.filterwarnings("ignore:Not enough free disk space:UserWarning")  # huggingface_hub says so too
def test_disk_fills_up_during_a_download(hub, tmp_path, small_disk):
    """Another writer fills the tmpfs while shard 1 downloads: ENOSPC mid-download gives one clear error,
    no partial blob and no manifest; once space is freed, the next run fetches only what is missing."""
    server, source, items, _ = hub
    cache, dest = small_disk / "hf", tmp_path / "res"
    filler = small_disk / "filler"

    def fill_when_shard_1_starts(line: str) -> None:
        if "fetching document-00001" in line:
            filler.write_bytes(b"\0" * 1_200_000)

    with pytest.raises(RetraceError, match=r"document-00001-of-00003\.bin: the disk .* ran out while downloading"):
        prepare_variant(source, dest=dest, cache_dir=cache, seq_length=SEQ, endpoint=server.endpoint,
                        max_items=200, log=fill_when_shard_1_starts)
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and "incomplete" in p.name]
    assert leftovers == []
    assert not manifest_path(dest / "document").exists()
    filler.unlink()
    served = dict(server.served)
    prefix = _prepare(server, source, dest, cache, max_items=200)
    assert {k: v - served.get(k, 0) for k, v in server.served.items() if v != served.get(k, 0)} == \
        {"document-00001-of-00003.bin": SHARD}  # shard 0 and the .idx were already in the cache
    np.testing.assert_array_equal(open_training_data(prefix, kind="preshuffled", seq_length=SEQ).sample(199),
                                  items[199].astype(np.int64))


def test_not_enough_room_is_refused_before_downloading(hub, tmp_path, small_disk):
    server, source, _, _ = hub
    (small_disk / "filler").write_bytes(b"\0" * 1_500_000)
    with pytest.raises(RetraceError, match=r"bytes to download into .* but only [\d,]+ are free"):
        _prepare(server, source, tmp_path / "res", small_disk / "hf", max_items=200)
    assert server.served == {}
