"""Hub sources: a real huggingface_hub cache, populated by publish_to_hub_cache, read offline.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once at import; retrace reads them at call time
and passes cache_dir / local_files_only explicitly, so monkeypatching the environment is enough.
The online path (sha256 check against HfApi.model_info) is exercised with a stand-in HfApi.
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch

from retrace.checkpoints import (
    NeoXReader,
    SafetensorsReader,
    TorchBinReader,
    load_zero_optimizer_state,
    open_config,
    open_params,
    publish_dir_to_hub_cache,
    publish_to_hub_cache,
    save_params,
)
from retrace.checkpoints.hubcache import file_hashes, repo_folder
from retrace.errors import RetraceError
from test_checkpoints import (  # noqa: F401
    CFG,
    assert_same,
    with_buffers,
    write_config,
    write_neox_pipeline,
    write_neox_sequential,
    write_sharded,
)
from test_checkpoints import expected as _expected_fixture
from test_checkpoints import shards as _shards_fixture

REPO = "EleutherAI/pythia-tiny"

expected = _expected_fixture
shards = _shards_fixture


@pytest.fixture
def offline(monkeypatch, tmp_path):
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def repo_dirs(tmp_path_factory, expected, shards) -> dict[str, Path]:
    """One local HF-format directory per weight format, each with a config.json."""
    root = tmp_path_factory.mktemp("repo")
    out = {}
    d = root / "safetensors"
    save_params(expected, d / "model.safetensors")
    out["safetensors"] = d
    d = root / "bin"
    d.mkdir()
    legacy = with_buffers(expected, CFG.n_layers)
    legacy["lm_head.weight"] = legacy.pop("embed_out.weight")
    torch.save(legacy, d / "pytorch_model.bin")
    out["bin"] = d
    out["bin-sharded"] = write_sharded(root / "bin-sharded", with_buffers(expected, CFG.n_layers), 3, "bin")
    out["safetensors-sharded"] = write_sharded(root / "st-sharded", dict(expected), 2, "safetensors")
    for d in out.values():
        write_config(d)
    # GPT-NeoX native repos: the save directory (latest + global_step7/), pipeline with 2 tensor-parallel
    # ranks and a ZeRO optimizer file, and the pp=0 mp_rank form.
    step = write_neox_pipeline(root / "neox-pipeline", shards)
    torch.save(
        {"optimizer_state_dict": {"base_optimizer_state": [], "local_sub_partitions_of_fp32_groups": []}},
        step / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    out["neox-pipeline"] = root / "neox-pipeline"
    out["neox-sequential"] = write_neox_sequential(root / "neox-sequential", shards).parent
    return out


BRANCHES = {
    "step0": "safetensors",
    "step1": "bin",
    "step2": "bin-sharded",
    "step3": "safetensors-sharded",
    "step4": "neox-pipeline",
    "step5": "neox-sequential",
}
READERS = {"safetensors": SafetensorsReader, "bin": TorchBinReader, "neox": NeoXReader}


@pytest.fixture
def published(offline, repo_dirs) -> Path:
    for branch, fmt in BRANCHES.items():
        publish_dir_to_hub_cache(offline, REPO, branch, repo_dirs[fmt])
    publish_dir_to_hub_cache(offline, REPO, "main", repo_dirs["safetensors"])
    return offline


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_hub_spec_reads_every_format_offline(published, expected, branch):
    with open_params(f"{REPO}@{branch}") as r:  # cache from $HF_HUB_CACHE, offline from $HF_HUB_OFFLINE
        assert r.source == f"{REPO}@{branch}"
        assert isinstance(r, READERS[BRANCHES[branch].split("-")[0]])
        # offline, verified by default against the tree listing the publisher caches
        assert r.hub.commit == r.hub.folder.name and r.hub.verified and r.hub.verified_against == "cache"
        assert_same(r, expected)
        assert str(published) in r.location("embed_out.weight")
        assert not any("optim_states" in f for f in r.hub.files)
    assert open_config(f"{REPO}@{branch}")["hidden_size"] == CFG.hidden


def test_neox_repo_with_optimizer_states(published):
    from retrace.checkpoints import resolve_hub

    snap = resolve_hub(REPO, "step4", include_optimizer=True)
    assert "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt" in snap.files
    assert load_zero_optimizer_state(snap.folder)["optimizer_state_dict"]["base_optimizer_state"] == []


def test_main_and_explicit_cache_dir(published, expected, monkeypatch):
    with open_params(REPO) as r:
        assert r.hub.revision == "main"
        assert_same(r, expected)
    monkeypatch.setenv("HF_HUB_CACHE", str(published.parent / "elsewhere"))
    with pytest.raises(RetraceError, match="not in the local Hub cache"):
        open_params(f"{REPO}@step1")
    with open_params(f"hf://{REPO}", revision="step1", cache_dir=published) as r:
        assert_same(r, expected)


def test_missing_revision_offline(published):
    with pytest.raises(RetraceError, match=r"EleutherAI/pythia-tiny@step999: not in the local Hub cache"):
        open_params(f"{REPO}@step999")
    with pytest.raises(RetraceError, match=r"a local checkpoint is written \./EleutherAI/pythia-nothing"):
        open_params("EleutherAI/pythia-nothing")


def test_huggingface_hub_itself_resolves_the_published_cache(published, repo_dirs):
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

    path = hf_hub_download(REPO, "config.json", revision="step2", cache_dir=published, local_files_only=True)
    assert Path(path).read_bytes() == (repo_dirs["bin-sharded"] / "config.json").read_bytes()
    folder = Path(snapshot_download(REPO, revision="step3", cache_dir=published, local_files_only=True))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in repo_dirs["safetensors-sharded"].iterdir()
    )
    weights = folder / "model-00001-of-00002.safetensors"
    assert weights.is_symlink() and not Path(weights.readlink()).is_absolute()
    blob = weights.resolve()
    assert blob.parent.name == "blobs" and blob.name == file_hashes(blob)[0]  # LFS: sha256
    cfg_blob = (folder / "config.json").resolve()
    assert cfg_blob.name == file_hashes(cfg_blob)[1]  # plain git file: git blob sha1

    info = scan_cache_dir(published)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    refs = {ref for rev in repo.revisions for ref in rev.refs}
    assert refs == {*BRANCHES, "main"}
    by_ref = {next(iter(rev.refs)): rev for rev in repo.revisions if len(rev.refs) == 1}
    assert {f.file_name for f in by_ref["step1"].files} == {"config.json", "pytorch_model.bin"}
    # main and step0 hold the same files but are different commits; their blobs are shared.
    assert {f.blob_path for f in by_ref["main"].files} == {f.blob_path for f in by_ref["step0"].files}
    assert by_ref["main"].commit_hash != by_ref["step0"].commit_hash


def test_tree_listing_is_what_huggingface_hub_caches(published):
    from huggingface_hub import get_cached_repo_tree

    files = {f.path: f for f in get_cached_repo_tree(REPO, revision="step1", cache_dir=published)}
    assert set(files) == {"config.json", "pytorch_model.bin"}
    listing = json.loads(next((repo_folder(published, REPO) / "trees").glob("*.json")).read_text())
    assert listing["format_version"] == 1


def test_publish_is_idempotent_and_commits_are_immutable(offline):
    a = publish_to_hub_cache(offline, REPO, "step5", {"config.json": b"{}", "w.bin": b"abc"})
    b = publish_to_hub_cache(offline, REPO, "step5", {"config.json": b"{}", "w.bin": b"abc"})
    assert a == b
    publish_to_hub_cache(offline, REPO, "step6", {"config.json": b"{}"}, commit_hash="a" * 40)
    with pytest.raises(RetraceError, match="already has a different config.json"):
        publish_to_hub_cache(offline, REPO, "step6", {"config.json": b"{ }"}, commit_hash="a" * 40)
    with pytest.raises(RetraceError, match="not a relative repo file name"):
        publish_to_hub_cache(offline, REPO, "step7", {"../x": b""})
    # a branch can move to a new commit, as on the Hub
    c = publish_to_hub_cache(offline, REPO, "step5", {"config.json": b"{}", "w.bin": b"abcd"})
    assert c != a and (repo_folder(offline, REPO) / "refs" / "step5").read_text() == c.name


def test_offline_verify_against_cached_listing(published, expected):
    with open_params(f"{REPO}@step1", verify=True) as r:
        assert r.hub.verified
    blob = (repo_folder(published, REPO) / "snapshots").glob("*/pytorch_model.bin").__next__().resolve()
    data = bytearray(blob.read_bytes())
    data[-1000] ^= 0xFF  # a flipped byte in the cached blob
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(
        RetraceError, match=r"pytorch_model.bin has sha256 [0-9a-f]{64}, but the local Hub cache records"
    ):
        open_params(f"{REPO}@step1", verify=True)


# --- online, with a stand-in for the Hub API -------------------------------------------------------


def _fake_api(published: Path, repo_dirs, tamper: str | None = None, fail: Exception | None = None):
    real_snapshot_download = huggingface_hub.snapshot_download
    calls = []

    class FakeApi:
        def model_info(self, repo_id, revision=None, files_metadata=False):
            if fail is not None:
                raise fail
            assert files_metadata
            commit = (repo_folder(published, repo_id) / "refs" / revision).read_text()
            listing = json.loads((repo_folder(published, repo_id) / "trees" / f"{commit}.json").read_text())
            siblings = []
            for name, e in listing["files"].items():
                sha = e.get("lfs_sha256")
                if sha and name == tamper:
                    sha = "0" * 64
                lfs = types.SimpleNamespace(sha256=sha, size=e["size"]) if sha else None
                siblings.append(
                    types.SimpleNamespace(rfilename=name, blob_id=e["blob_id"], size=e["size"], lfs=lfs)
                )
            siblings.append(types.SimpleNamespace(rfilename="tokenizer.json", blob_id="x", size=1, lfs=None))
            return types.SimpleNamespace(sha=commit, siblings=siblings)

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw)
        assert "local_files_only" not in kw  # the online path downloads (here: served by the cache)
        return real_snapshot_download(repo_id, local_files_only=True, **kw)

    return FakeApi, fake_snapshot_download, calls


@pytest.mark.parametrize("branch", ["step0", "step2", "step4"])
def test_online_verifies_sha256_against_model_info(published, repo_dirs, expected, monkeypatch, branch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api, dl, calls = _fake_api(published, repo_dirs)
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", dl)
    with open_params(f"{REPO}@{branch}") as r:
        assert r.hub.verified
        assert_same(r, expected)
    (call,) = calls
    assert "config.json" in call["allow_patterns"] and "tokenizer.json" not in call["allow_patterns"]
    assert call["cache_dir"] == str(published)


def test_online_prefers_safetensors(published, repo_dirs, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    files = {p.name: p for d in (repo_dirs["bin"], repo_dirs["safetensors"]) for p in d.iterdir()}
    publish_to_hub_cache(published, REPO, "both", files)
    api, dl, calls = _fake_api(published, repo_dirs)
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", dl)
    with open_params(f"{REPO}@both") as r:
        assert isinstance(r, SafetensorsReader)
    assert "pytorch_model.bin" not in calls[0]["allow_patterns"]


def test_online_sha256_mismatch_is_refused(published, repo_dirs, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api, dl, _ = _fake_api(published, repo_dirs, tamper="pytorch_model-00002-of-00003.bin")
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", dl)
    with pytest.raises(
        RetraceError, match=r"@step2: .*pytorch_model-00002-of-00003.bin has sha256 .* the Hub records 0{64}"
    ):
        open_params(f"{REPO}@step2")


def test_unreachable_hub_falls_back_to_the_verified_cache(published, repo_dirs, expected, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    api, dl, _ = _fake_api(published, repo_dirs, fail=ConnectionError("no route to host"))
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_params(f"{REPO}@step1") as r:
            assert r.hub.verified and r.hub.verified_against == "cache"
            assert_same(r, expected)
    assert any("cannot be reached" in str(w.message) and "verified against" in str(w.message) for w in caught)
