"""The online metadata path: huggingface_hub's own dataclasses, built from the JSON the Hub API returns.

``HfApi.model_info(files_metadata=True)`` builds ``ModelInfo(**json)`` (siblings with ``blobId`` and
``lfs.sha256``) and ``list_repo_refs`` builds ``GitRefs`` of ``GitRefInfo``. The records here are made the
same way from the fixture repos' cached tree listings, served by a recorded API (data, no behaviour),
and the online audit must agree with the offline one.
"""

from __future__ import annotations

import pytest
from huggingface_hub.hf_api import GitRefInfo, GitRefs, ModelInfo

from retrace.audit import CacheMetadata, HubMetadata, audit, branches_from_refs, files_from_model_info
from retrace.checkpoints.hubcache import read_tree_listing
from retrace.errors import RetraceError
from test_audit import MAX, run
from test_audit import cache as _cache_fixture

cache = _cache_fixture
LFS_SHA = "a" * 64


def model_info_json(repo: str, commit: str, listing: dict) -> dict:
    """What GET /api/models/{repo}/revision/{rev}?blobs=true returns (the fields retrace reads)."""
    siblings = []
    for name, e in sorted(listing.items()):
        s = {"rfilename": name, "size": e["size"], "blobId": e["blob_id"]}
        if e.get("lfs_sha256"):
            s["lfs"] = {"size": e["lfs_size"], "sha256": e["lfs_sha256"], "pointerSize": 134}
        siblings.append(s)
    return {"id": repo, "sha": commit, "private": False, "siblings": siblings}


class RecordedApi:
    """Serves recorded Hub responses as huggingface_hub's dataclasses; counts the calls."""

    def __init__(self, refs: dict[str, GitRefs], infos: dict[tuple[str, str], dict]):
        self.refs, self.infos, self.calls = refs, infos, []

    def list_repo_refs(self, repo_id):
        self.calls.append(("refs", repo_id))
        return self.refs[repo_id]

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata
        self.calls.append(("info", repo_id, revision))
        return ModelInfo(**self.infos[(repo_id, revision)])


def record(cache, repos) -> RecordedApi:
    refs, infos = {}, {}
    for repo in repos:
        branches = CacheMetadata(cache).branches(repo)
        refs[repo] = GitRefs(
            branches=[
                GitRefInfo(name=b, ref=f"refs/heads/{b}", target_commit=c) for b, c in branches.items()
            ],
            converts=[],
            tags=[GitRefInfo(name="v1", ref="refs/tags/v1", target_commit=next(iter(branches.values())))],
        )
        for c in set(branches.values()):
            infos[(repo, c)] = model_info_json(repo, c, read_tree_listing(cache, repo, c))
    return RecordedApi(refs, infos)


def test_parse_model_info_as_the_api_returns_it():
    info = ModelInfo(
        id="EleutherAI/pythia-14m",
        sha="f" * 40,
        siblings=[
            {"rfilename": "config.json", "size": 570, "blobId": "b" * 40},
            {
                "rfilename": "model.safetensors",
                "size": 56_000_000,
                "blobId": "c" * 40,
                "lfs": {"size": 56_000_000, "sha256": LFS_SHA, "pointerSize": 135},
            },
        ],
    )
    files = {f.name: f for f in files_from_model_info(info)}
    st = files["model.safetensors"]
    assert (st.sha256, st.size, st.blob_id, st.kind) == (LFS_SHA, 56_000_000, "c" * 40, "safetensors")
    assert st.content_id == LFS_SHA
    cfg = files["config.json"]
    assert cfg.sha256 is None and cfg.kind is None and cfg.content_id == "git:" + "b" * 40
    # without files_metadata the Hub gives names only: no content id, so no clone claims from it
    bare = files_from_model_info(ModelInfo(id="x/y", siblings=[{"rfilename": "pytorch_model.bin"}]))
    assert bare[0].content_id is None


def test_parse_refs_branches_only():
    refs = GitRefs(
        branches=[
            GitRefInfo(name="main", ref="refs/heads/main", target_commit="1" * 40),
            GitRefInfo(name="step0", ref="refs/heads/step0", target_commit="2" * 40),
        ],
        converts=[],
        tags=[GitRefInfo(name="v0", ref="refs/tags/v0", target_commit="3" * 40)],
    )
    assert branches_from_refs(refs) == {"main": "1" * 40, "step0": "2" * 40}


def test_online_audit_agrees_with_offline(cache):
    repos = [
        "fix/healthy",
        "fix/gen3",
        "fix/gen4-standard",
        "fix/missing",
        "fix/like-12b",
        "fix/format-change",
    ]
    api = record(cache, repos)
    online = audit(repos, HubMetadata(api=api), max_step=MAX, workers=4)
    offline = run(cache, *repos)
    assert [i.to_dict() for i in online.incidents] == [i.to_dict() for i in offline.incidents]
    cols = ["repo", "revision", "file", "kind", "size", "sha256", "clone_of", "status"]
    assert online.frame()[cols].equals(offline.frame()[cols])
    # one model_info per distinct commit, one list_repo_refs per repo
    infos = [c for c in api.calls if c[0] == "info"]
    assert len(infos) == len(set(infos)) == len(api.infos)
    assert online.source == "Hugging Face Hub (online)"


def test_unreachable_hub_says_use_offline():
    class Down:
        def list_repo_refs(self, repo_id):
            raise ConnectionError("no route to host")

    with pytest.raises(RetraceError, match="fix/x: the Hub cannot be reached.*--offline"):
        audit(["fix/x"], HubMetadata(api=Down()))
