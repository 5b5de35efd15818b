"""Security of the data layer: each test here fails on the code before the fix (they import only names that
both versions have, so they can be run against either).

* ``path:`` copies were checked only structurally: now hashed on first use and checked on every use;
* the merge wrote to predictable temporary names (``.document.bin.<pid>.partial``) following symlinks;
* the preshuffled repos were fetched from an unpinned branch: a revision is now required and validated
  (``re.fullmatch``: a trailing newline is not a commit).

The .idx int64 overflow and the builder's temporaries are in test_data_indexed.py, the order maps' location
in test_data_order.py / test_data_training.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os

import numpy as np
import pytest

from retrace.checkpoints.hubcache import publish_to_hub_cache
from retrace.data import write_indexed
from retrace.data.variants import VariantSource, prepare_variant, shard_file
from retrace.errors import RetraceError

REPO = "retrace-test/tiny-preshuffled"
COMMIT = "c0ffee" + "0" * 34


def _variant(**kw) -> VariantSource:
    known = {f.name for f in dataclasses.fields(VariantSource)}
    return VariantSource(**{k: v for k, v in kw.items() if k in known})


def _prepare(source, **kw):
    known = inspect.signature(prepare_variant).parameters
    return prepare_variant(source, **{k: v for k, v in kw.items() if k in known})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A 4-shard preshuffled repo (30 items of 17 tokens) in a real huggingface_hub cache; offline."""
    import huggingface_hub.constants

    items = np.random.RandomState(0).randint(0, 50000, (30, 17)).astype(np.uint16)
    write_indexed(tmp_path / "src" / "document", list(items))
    shards = shard_file(tmp_path / "src" / "document.bin", tmp_path / "shards", shard_bytes=300)
    cache = tmp_path / "hf"
    publish_to_hub_cache(cache, REPO, "main", {**{p.name: p for p in shards},
                                                "document.idx": tmp_path / "src" / "document.idx"},
                         commit_hash=COMMIT, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = _variant(data="deduped", kind="preshuffled", name="document", repo_id=REPO, revision=COMMIT,
                      num_shards=4, idx_file="document.idx", shard_bytes=300, bin_bytes=1020,
                      idx_bytes=(tmp_path / "src" / "document.idx").stat().st_size)
    return source, cache


@pytest.mark.parametrize("revision", [None, "a" * 40 + "\n", "../../etc", "-rf", "main\n", "a//b"])
def test_revision_is_required_and_validated(revision):
    with pytest.raises(RetraceError, match="revision"):
        VariantSource(data="deduped", kind="preshuffled", name="document", repo_id="org/repo",
                      revision=revision, num_shards=1)


def test_no_predictable_temporary_is_followed(hub, tmp_path):
    """Symlinks planted at the merge's old predictable names must not redirect a write onto another file."""
    source, cache = hub
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = tmp_path / "res"
    dest.mkdir()
    for suffix in ("bin", "idx"):
        os.symlink(victim, dest / f".document.{suffix}.{os.getpid()}.partial")
    _prepare(source, dest=dest, cache_dir=cache, seq_length=16)
    assert victim.read_text() == "precious"


# An edit of a ``path:`` copy after its first use is refused: tests/test_data_variants.py::
# test_local_copy_recorded_and_not_reread.


def test_local_copy_published_hash_checked_without_asking(hub, tmp_path):
    source, _ = hub
    with pytest.raises(RetraceError, match="does not match the published"):
        _prepare(dataclasses.replace(source, bin_sha256=hashlib.sha256(b"other").hexdigest()),
                 dest=tmp_path / "res", path=tmp_path / "src" / "document")
