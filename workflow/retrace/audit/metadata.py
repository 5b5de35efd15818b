"""Per-revision file lists with their content hashes, from the Hub or from a local hub cache.

Two sources give the same records (``RevisionMeta``: repo, branch, commit, and one ``FileMeta`` per
file with its size, LFS sha256 and git blob id):

* ``HubMetadata`` (online): ``HfApi.list_repo_refs(repo)`` for the branches, then
  ``HfApi.model_info(repo, revision=<commit>, files_metadata=True).siblings`` once per distinct commit
  (``rfilename``, ``size``, ``blob_id``, ``lfs.sha256``). No weight is downloaded.
* ``CacheMetadata`` (offline): a huggingface_hub cache (``models--org--name/``): branches from
  ``refs/<branch>``, files from the tree listing huggingface_hub (≥ 2) caches per commit
  (``trees/<commit>.json``: size, blob id, LFS sha256, for *every* file of the commit, downloaded or
  not) and else from ``snapshots/<commit>/``, whose entries are symlinks to ``blobs/<etag>``. The Hub's
  ETag of an LFS file is its sha256 and of a regular file its git blob sha1, and huggingface_hub names
  blobs by ETag, so the blob name *is* the LFS sha256 — nothing is hashed. A snapshot file that is a
  copy rather than a symlink (no symlinks on the file system) is hashed.

``weight_kind`` names the weight format of a file; ``family`` groups kinds that hold one copy of the
parameters (``model.safetensors`` or its shards; ``pytorch_model.bin`` or its shards; GPT-NeoX files).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from retrace.checkpoints.hubcache import is_lfs_file, read_tree_listing, repo_folder
from retrace.checkpoints.names import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX
from retrace.errors import RetraceError
from retrace.hubenv import hub_cache_dir
from retrace.io import sha256_file

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_ST_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_BIN_SHARD_RE = re.compile(r"^pytorch_model-\d+-of-\d+\.bin$")
_NEOX_MODEL_RE = re.compile(r"^(layer_\d+-model_\d+-model_states|mp_rank_\d+_model_states)\.pt$")
_NEOX_OPTIM_RE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

#: kind → family (one copy of the parameters).
FAMILIES = {
    "safetensors": "safetensors",
    "safetensors-sharded": "safetensors",
    "bin": "bin",
    "bin-sharded": "bin",
    "neox": "neox",
    "neox-optim": "neox-optim",
    "other": "other",
}
#: Families holding the model's parameters, in the order retrace prefers to read them.
PARAM_FAMILIES = ("safetensors", "bin", "neox")


def weight_kind(filename: str) -> str | None:
    """The weight format of a repo file (``safetensors``, ``safetensors-sharded``, ``bin``,
    ``bin-sharded``, ``neox``, ``neox-optim``, ``other``), or None for a non-weight file."""
    name = filename.rsplit("/", 1)[-1]
    if filename == SAFETENSORS:
        return "safetensors"
    if "/" not in filename and _ST_SHARD_RE.fullmatch(name):
        return "safetensors-sharded"
    if filename == TORCH_BIN:
        return "bin"
    if "/" not in filename and _BIN_SHARD_RE.fullmatch(name):
        return "bin-sharded"
    if _NEOX_MODEL_RE.fullmatch(name):
        return "neox"
    if _NEOX_OPTIM_RE.fullmatch(name):
        return "neox-optim"
    if name.endswith(_WEIGHT_SUFFIXES) and name != "training_args.bin":
        return "other"
    return None


@dataclasses.dataclass(frozen=True)
class FileMeta:
    """One file of a revision as the Hub records it."""

    name: str
    size: int | None
    sha256: str | None  # LFS sha256 (None for a regular git file)
    blob_id: str | None  # git blob id (of the LFS pointer for an LFS file)
    local: bool = False  # the content is in the local cache (CacheMetadata only)

    @property
    def kind(self) -> str | None:
        return weight_kind(self.name)

    @property
    def content_id(self) -> str | None:
        """What identifies the bytes: the sha256, else ``git:<blob id>``."""
        if self.sha256:
            return self.sha256
        return f"git:{self.blob_id}" if self.blob_id else None


@dataclasses.dataclass(frozen=True)
class RevisionMeta:
    repo: str
    revision: str
    commit: str
    files: tuple[FileMeta, ...]

    @property
    def weight_files(self) -> list[FileMeta]:
        return [f for f in self.files if f.kind is not None]

    def family_files(self, family: str) -> list[FileMeta]:
        return sorted((f for f in self.weight_files if FAMILIES[f.kind] == family), key=lambda f: f.name)

    @property
    def families(self) -> list[str]:
        present = {FAMILIES[f.kind] for f in self.weight_files}
        return [f for f in (*PARAM_FAMILIES, "neox-optim", "other") if f in present]

    def fingerprint(self, family: str) -> tuple | None:
        """The identity of one family's bytes: sorted (file, content id); None if any id is unknown."""
        files = self.family_files(family)
        if not files or any(f.content_id is None for f in files):
            return None
        return tuple((f.name, f.content_id) for f in files)

    def names(self) -> set[str]:
        return {f.name for f in self.files}


def family_entry(family: str, names: Iterable[str]) -> str | None:
    """The file (or ``""`` for the folder) retrace opens to read one family's parameters."""
    names = set(names)
    if family == "safetensors":
        for marker in (SAFETENSORS, SAFETENSORS_INDEX):
            if marker in names:
                return marker
    elif family == "bin":
        for marker in (TORCH_BIN, TORCH_BIN_INDEX):
            if marker in names:
                return marker
    elif family == "neox":
        return ""
    return None


def family_patterns(family: str, rev: RevisionMeta) -> list[str]:
    """Repo file names to fetch to read ``family``: its files, the shard index, config.json."""
    files = [f.name for f in rev.family_files(family)]
    index = {"safetensors": SAFETENSORS_INDEX, "bin": TORCH_BIN_INDEX}.get(family)
    extra = [n for n in (index, "config.json") if n and n in rev.names()]
    if family == "neox":
        extra += [
            n
            for n in rev.names()
            if n.endswith("latest") or "/configs/" in f"/{n}" or n.startswith("configs/")
        ]
    return sorted({*files, *extra})


# ------------------------------------------------------------------------------------------------
# Parsing huggingface_hub's objects (online)


def branches_from_refs(refs: Any) -> dict[str, str]:
    """``GitRefs`` (``HfApi.list_repo_refs``) → branch name → commit."""
    return {b.name: b.target_commit for b in (refs.branches or [])}


def files_from_model_info(info: Any) -> tuple[FileMeta, ...]:
    """``ModelInfo`` (``model_info(files_metadata=True)``) → one FileMeta per sibling."""
    out = []
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha256 = None
        if lfs is not None:
            sha256 = lfs.sha256 if hasattr(lfs, "sha256") else lfs.get("sha256")
        out.append(FileMeta(s.rfilename, getattr(s, "size", None), sha256, getattr(s, "blob_id", None)))
    return tuple(sorted(out, key=lambda f: f.name))


class MetadataSource:
    """Where revision metadata comes from; subclasses implement ``branches`` and ``files``."""

    description = "?"

    def branches(self, repo: str) -> dict[str, str]:
        raise NotImplementedError

    def files(self, repo: str, revision: str, commit: str) -> tuple[FileMeta, ...]:
        raise NotImplementedError

    def weights_folder(self, rev: RevisionMeta, family: str) -> Path:
        """A local folder holding ``family``'s files of ``rev`` (downloaded if the source can)."""
        raise NotImplementedError

    def revisions(self, repo: str, wanted=None, workers: int = 1) -> dict[str, RevisionMeta]:
        """Every branch (or those ``wanted(name)`` accepts) with its files; one lookup per commit."""
        branches = {b: c for b, c in self.branches(repo).items() if wanted is None or wanted(b)}
        commits = sorted(set(branches.values()))
        first = {c: next(b for b, cc in sorted(branches.items()) if cc == c) for c in commits}

        def one(commit: str):
            return commit, self.files(repo, first[commit], commit)

        if workers > 1 and len(commits) > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrace-audit") as pool:
                listed = dict(pool.map(one, commits))
        else:
            listed = dict(map(one, commits))
        return {b: RevisionMeta(repo, b, c, listed[c]) for b, c in branches.items()}


class HubMetadata(MetadataSource):
    """The Hub's metadata through ``huggingface_hub.HfApi`` (no weight download)."""

    description = "Hugging Face Hub (online)"

    def __init__(self, api: Any = None, cache_dir: str | os.PathLike | None = None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.api = api
        self.cache_dir = hub_cache_dir(cache_dir)

    def _call(self, what: str, fn, *args, **kwargs):
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return fn(*args, **kwargs)
        except RevisionNotFoundError as exc:
            raise RetraceError(f"{what}: revision not found on the Hub: {exc}") from exc
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise RetraceError(f"{what}: repository not found or not accessible on the Hub: {exc}") from exc
        except HfHubHTTPError as exc:
            raise RetraceError(f"{what}: the Hub refused the request: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - connection errors, offline mode
            raise RetraceError(
                f"{what}: the Hub cannot be reached ({type(exc).__name__}: {exc}); "
                "use --offline to audit the local cache"
            ) from exc

    def branches(self, repo: str) -> dict[str, str]:
        return branches_from_refs(self._call(repo, self.api.list_repo_refs, repo))

    def files(self, repo: str, revision: str, commit: str) -> tuple[FileMeta, ...]:
        info = self._call(
            f"{repo}@{revision}", self.api.model_info, repo, revision=commit, files_metadata=True
        )
        return files_from_model_info(info)

    def weights_folder(self, rev: RevisionMeta, family: str) -> Path:
        from huggingface_hub import snapshot_download

        patterns = family_patterns(family, rev)
        try:
            return Path(
                snapshot_download(
                    rev.repo, revision=rev.commit, cache_dir=str(self.cache_dir), allow_patterns=patterns
                )
            )
        except Exception as exc:  # noqa: BLE001
            raise RetraceError(
                f"{rev.repo}@{rev.revision}: download of {family} weights failed: {type(exc).__name__}: {exc}"
            ) from exc


class CacheMetadata(MetadataSource):
    """A local huggingface_hub cache, read without any network access."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = hub_cache_dir(cache_dir)
        self.description = f"local hub cache {self.cache_dir} (offline)"

    def _storage(self, repo: str) -> Path:
        return repo_folder(self.cache_dir, repo)

    def branches(self, repo: str) -> dict[str, str]:
        refs = self._storage(repo) / "refs"
        if not refs.is_dir():
            raise RetraceError(
                f"{repo}: not in the local hub cache {self.cache_dir} (no {refs}); "
                "audit it online or download it first"
            )
        out = {}
        for path in sorted(refs.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(refs).as_posix()
            if name.startswith("refs/"):  # pull requests (refs/pr/N) are not branches
                continue
            commit = path.read_text(encoding="utf-8").strip()
            if not _SHA1_RE.fullmatch(commit):
                raise RetraceError(f"{path}: not a commit hash ({commit[:60]!r})")
            out[name] = commit
        return out

    def files(self, repo: str, revision: str, commit: str) -> tuple[FileMeta, ...]:
        snapshot = self._storage(repo) / "snapshots" / commit
        local = {}
        if snapshot.is_dir():
            for p in snapshot.rglob("*"):
                if p.is_file():
                    local[p.relative_to(snapshot).as_posix()] = p
        listing = read_tree_listing(self.cache_dir, repo, commit)
        out: dict[str, FileMeta] = {}
        if listing is not None:
            for name, e in listing.items():
                out[name] = FileMeta(
                    name, e.get("size"), e.get("lfs_sha256"), e.get("blob_id"), name in local
                )
        for name, path in local.items():
            if name in out:
                continue
            out[name] = self._from_snapshot(name, path)
        if not out:
            raise RetraceError(
                f"{repo}@{revision}: the cache has neither a snapshot nor a tree listing for commit {commit}"
            )
        return tuple(out[n] for n in sorted(out))

    @staticmethod
    def _from_snapshot(name: str, path: Path) -> FileMeta:
        size = path.stat().st_size
        blob = os.path.basename(os.path.realpath(path)) if path.is_symlink() else None
        if is_lfs_file(name):
            if blob and _SHA256_RE.fullmatch(blob):
                return FileMeta(name, size, blob, None, True)
            if weight_kind(name) is not None:  # a copy: hash it (local, no download)
                return FileMeta(name, size, sha256_file(path), None, True)
            return FileMeta(name, size, None, None, True)
        if blob and _SHA1_RE.fullmatch(blob):
            return FileMeta(name, size, None, blob, True)
        return FileMeta(name, size, None, None, True)

    def weights_folder(self, rev: RevisionMeta, family: str) -> Path:
        folder = self._storage(rev.repo) / "snapshots" / rev.commit
        missing = [n for n in family_patterns(family, rev) if not (folder / n).is_file()]
        if missing:
            raise RetraceError(
                f"{rev.repo}@{rev.revision}: {', '.join(missing[:3])} not in the local cache ({folder}); "
                "download the weights or audit online"
            )
        return folder
