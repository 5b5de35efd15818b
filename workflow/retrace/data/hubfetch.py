"""Dataset files from the Hugging Face Hub at one pinned commit: resolve, list with sha256, fetch one file.

Everything goes through huggingface_hub and its cache (``hub_cache_dir``): files are fetched one at a
time with ``hf_hub_download`` and read in place from the cache's snapshot. Online, the commit's file list
with each file's Git LFS sha256 comes from the Hub (``dataset_info(files_metadata=True)``); offline, from
the tree listing huggingface_hub caches beside the snapshots (``trees/<commit>.json``), if any.

Each failure is one :class:`~retrace.errors.RetraceError` saying what happened: the repository,
revision or file is not on the Hub; offline and not in the cache; the disk (or a quota) filled up while
downloading. huggingface_hub writes a download to a uniquely named temporary file and removes it on any
error, so a failed download leaves nothing in the cache that a later run could take for the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from retrace.data.integrity import is_sha256
from retrace.data.shards import COMMIT_RE
from retrace.errors import RetraceError
from retrace.hubenv import hub_cache_dir, hub_offline

REPO_TYPE = "dataset"
#: A branch or tag name: no leading dash, no "..", no empty path parts (``re.fullmatch``, so no newline).
_REF_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_commit(value: object) -> bool:
    return isinstance(value, str) and COMMIT_RE.fullmatch(value) is not None


def check_revision(value: object, *, where: str) -> str:
    """A 40-hex commit or a branch/tag name; anything else (a path, a trailing newline) is refused."""
    if not isinstance(value, str) or not (is_commit(value) or (_REF_RE.fullmatch(value) and ".." not in value)):
        raise RetraceError(f"{where}: revision {value!r} is neither a 40-hex commit nor a branch or tag name")
    return value


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # the Git LFS sha256 (None: not an LFS file, or not known)


@dataclass(frozen=True)
class Snapshot:
    """One commit of a dataset repo and what is known of its files."""

    repo_id: str
    commit: str
    files: dict[str, RemoteFile]
    source: str  # "hub", "cache tree listing" or "none"


def resolve_snapshot(repo_id: str, revision: str, *, cache_dir: str | os.PathLike | None = None,
                     endpoint: str | None = None, token: str | None = None) -> Snapshot:
    """The commit ``revision`` names and its files' sizes and LFS sha256.

    Raises:
        RetraceError: the repository or revision does not exist, the Hub cannot be reached, or (offline)
            a branch name is not in the cache's refs.
    """
    check_revision(revision, where=repo_id)
    cache = hub_cache_dir(cache_dir)
    if hub_offline():
        from retrace.checkpoints.hubcache import read_tree_listing

        commit = revision if is_commit(revision) else _cached_ref(cache, repo_id, revision)
        listing = read_tree_listing(cache, repo_id, commit, repo_type=REPO_TYPE)
        if listing is None:
            return Snapshot(repo_id, commit, {}, "none")
        files = {}
        for name, e in listing.items():
            if isinstance(e, dict):
                sha = e.get("lfs_sha256")
                size = e.get("lfs_size", e.get("size"))
                files[name] = RemoteFile(name, size if type(size) is int else None, sha if is_sha256(sha) else None)
        return Snapshot(repo_id, commit, files, "cache tree listing")

    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint, token=token).dataset_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError as exc:
        raise RetraceError(f"{repo_id}: revision {revision} is not on the Hub") from exc
    except RepositoryNotFoundError as exc:
        raise RetraceError(f"{repo_id}: no such dataset repository on the Hub (or it is private)") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise RetraceError(f"{repo_id}@{revision}: cannot read the file list from the Hub: "
                           f"{type(exc).__name__}: {_first_line(exc)}") from exc
    commit = getattr(info, "sha", None)
    if not is_commit(commit):
        raise RetraceError(f"{repo_id}@{revision}: the Hub answered commit {commit!r}, not a 40-hex sha")
    files = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else s.size
        files[s.rfilename] = RemoteFile(s.rfilename, size if type(size) is int else None,
                                        sha if is_sha256(sha) else None)
    return Snapshot(repo_id, commit, files, "hub")


def repo_folder(cache: str | os.PathLike, repo_id: str) -> Path:
    """``<cache>/datasets--org--name`` (huggingface_hub's layout)."""
    return Path(cache) / f"{REPO_TYPE}s--{repo_id.replace('/', '--')}"


def _cached_ref(cache: Path, repo_id: str, revision: str) -> str:
    ref = repo_folder(cache, repo_id) / "refs" / Path(*revision.split("/"))
    try:
        commit = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RetraceError(f"{repo_id}: offline and revision {revision!r} is not in the Hugging Face cache "
                           f"{cache} (no {ref}); pin a commit, or prepare once with the Hub reachable") from exc
    if not is_commit(commit):
        raise RetraceError(f"{ref}: holds {commit!r}, not a 40-hex commit")
    return commit


def free_bytes(cache_dir: str | os.PathLike | None = None) -> int:
    """Free bytes on the file system of the Hugging Face cache (its nearest existing parent)."""
    p = hub_cache_dir(cache_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def fetch(repo_id: str, filename: str, commit: str, *, cache_dir: str | os.PathLike | None = None,
          endpoint: str | None = None, token: str | None = None) -> Path:
    """The cache path of ``filename`` at ``commit`` (downloaded unless already in the cache).

    Raises:
        RetraceError: the file is not in the commit, the disk filled up, offline and not cached, or the
            download failed.
    """
    if not is_commit(commit):
        raise RetraceError(f"{repo_id}: fetch needs a pinned commit, got {commit!r}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir(cache_dir)
    offline = hub_offline()
    kwargs: dict = {"repo_type": REPO_TYPE, "revision": commit, "cache_dir": str(cache)}
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    if token is not None:
        kwargs["token"] = token
    if offline:
        kwargs["local_files_only"] = True
    where = f"{repo_id}@{commit[:12]}: {filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, **kwargs))
    except LocalEntryNotFoundError as exc:
        raise RetraceError(f"{where}: offline and not in the Hugging Face cache {cache}") from exc
    except EntryNotFoundError as exc:
        raise RetraceError(f"{where}: missing on the Hub (the commit has no such file); nothing was "
                           "downloaded") from exc
    except OSError as exc:
        if not isinstance(exc, HfHubHTTPError) and exc.errno in _DISK_FULL:
            raise RetraceError(f"{where}: the disk (or a quota/file-size limit) ran out while downloading into "
                               f"{cache}: {exc.strerror}; the partial download was removed; free space and "
                               "run again") from exc
        raise RetraceError(f"{where}: cannot fetch: {type(exc).__name__}: {_first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - network and protocol errors of any kind
        raise RetraceError(f"{where}: cannot fetch: {type(exc).__name__}: {_first_line(exc)}") from exc


def discard(path: str | os.PathLike, *, repo_id: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Remove a file that failed its hash from the cache: the snapshot entry and the blob it points to,
    so the next run downloads it again instead of finding it. Only files inside the repo's cache folder."""
    folder = os.path.realpath(repo_folder(hub_cache_dir(cache_dir), repo_id))
    path = Path(path)
    for p in (Path(os.path.realpath(path)), path):
        if os.path.realpath(p.parent).startswith(folder + os.sep):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def cached_file(repo_id: str, filename: str, commit: str, *,
                cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The file's path if the cache already holds it at ``commit`` (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir(cache_dir)), revision=commit,
                                 repo_type=REPO_TYPE)
    return Path(got) if isinstance(got, str) and os.path.isfile(got) else None
