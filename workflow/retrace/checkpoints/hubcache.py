"""Publish local files into a real ``huggingface_hub`` cache, as if downloaded from a repo branch.

``publish_to_hub_cache(cache_dir, "org/repo", "step1000", {"config.json": b"...", "model.safetensors":
path})`` writes the layout huggingface_hub itself reads (``models--org--repo/``):

* ``blobs/<id>``: the content, named like the Hub's ETag: the sha256 of the content for files Git LFS
  tracks by default on the Hub (``*.safetensors``, ``*.bin``, ``*.pt`` …), else the git blob sha1;
* ``snapshots/<commit>/<file>``: relative symlinks to the blobs (copies where symlinks are not allowed);
* ``refs/<revision>``: the commit hash, so ``hf_hub_download(..., revision="step1000")`` and
  ``snapshot_download`` resolve the branch offline (``local_files_only=True`` / ``HF_HUB_OFFLINE=1``);
* ``trees/<commit>.json``: the tree listing huggingface_hub ≥ 2 caches (size, git blob id, LFS sha256),
  so offline ``snapshot_download`` can check completeness and retrace can verify sha256 offline.

The commit hash defaults to a deterministic sha1 of (repo, revision, files): publishing the same files
again is a no-op. The ref is written last, so a reader never resolves a branch to a partial snapshot.
Used by the offline tests and by the embedded study to publish its local "reference" models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

from retrace.errors import RetraceError
from retrace.io import atomic_path

#: Patterns of the Hub's default ``.gitattributes`` (files stored with Git LFS, ETag = sha256).
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth",
    ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_CHUNK = 8 << 20


def is_lfs_file(filename: str) -> bool:
    name = filename.rsplit("/", 1)[-1]
    return name.endswith(LFS_SUFFIXES) or ".tar." in name or "tfevents" in name or ".lfs." in name


def repo_folder(cache_dir: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    """``<cache>/models--org--name`` (huggingface_hub's ``repo_folder_name``)."""
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


def file_hashes(path: str | os.PathLike) -> tuple[str, str, int]:
    """(sha256, git blob sha1, size) of a file, streamed."""
    size = os.path.getsize(path)
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)  # noqa: S324
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest(), size


def _is_temp(name: str) -> bool:
    """A temporary link or file this module (or ``retrace.io``) makes, left by an interrupted publish."""
    return name.startswith(".") and name.endswith((".lnk", ".tmp"))


def _check_filename(filename: str) -> str:
    parts = filename.split("/")
    if (
        not filename
        or filename.startswith("/")
        or "\\" in filename
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise RetraceError(f"hub cache: {filename!r} is not a relative repo file name")
    return filename


def _check_name(kind: str, value: str) -> None:
    bad = not value or value.startswith("/") or ".." in value.split("/") or "\\" in value
    if bad or any(p == "" for p in value.split("/")):
        raise RetraceError(f"hub cache: {kind} {value!r} is not valid")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _link(blob: Path, pointer: Path) -> None:
    """``pointer`` → ``blob`` as a relative symlink (as huggingface_hub makes it), else a copy.

    The link is made under an unpredictable name (``os.symlink`` refuses an existing path, never
    follows it) and renamed over ``pointer``: nothing at a guessable path is removed or written through.
    """
    pointer.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(blob, pointer.parent)
    for _ in range(64):
        tmp = pointer.parent / f".{pointer.name}.{secrets.token_hex(8)}.lnk"
        try:
            os.symlink(rel, tmp)
        except FileExistsError:
            continue
        except OSError:  # no symlinks here (some Windows and network filesystems)
            _atomic_copy(blob, pointer)
            return
        try:
            os.replace(tmp, pointer)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return
    raise RetraceError(f"hub cache: could not create a temporary link next to {pointer}")


def publish_to_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    revision: str,
    files: Mapping[str, bytes | str | os.PathLike],
    commit_hash: str | None = None,
    *,
    repo_type: str = "model",
) -> Path:
    """Write ``files`` (repo file name → bytes or a local path) as branch ``revision`` of ``repo_id``.

    Returns the snapshot directory (``…/snapshots/<commit>``). Blobs are content-addressed and shared
    between revisions; publishing to an existing commit with different content is refused.
    """
    _check_name("repo id", repo_id)
    if repo_id.count("/") != 1:
        raise RetraceError(f"hub cache: repo id {repo_id!r} must be 'org/name'")
    _check_name("revision", revision)
    if not files:
        raise RetraceError(f"hub cache: no files to publish for {repo_id}@{revision}")
    storage = repo_folder(cache_dir, repo_id, repo_type)

    # 1. hash every file (streamed for paths) and store its blob.
    entries: dict[str, dict] = {}
    for filename in sorted(files):
        _check_filename(filename)
        content = files[filename]
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            sha256, sha1, size = hashlib.sha256(data).hexdigest(), git_blob_sha1(data), len(data)
            src = None
        else:
            src = Path(content)
            if not src.is_file():
                raise RetraceError(f"hub cache: {src} (for {filename}) is not a file")
            sha256, sha1, size = file_hashes(src)
            data = None
        lfs = is_lfs_file(filename)
        blob_id = sha256 if lfs else sha1
        blob = storage / "blobs" / blob_id
        if not blob.is_file() or blob.stat().st_size != size:
            if data is not None:
                _atomic_write_bytes(blob, data)
            else:
                _atomic_copy(src, blob)
        entry = {"size": size, "blob_id": sha1, "_blob": blob_id}
        if lfs:
            entry.update(blob_id=git_blob_sha1(lfs_pointer(sha256, size)), lfs_sha256=sha256, lfs_size=size)
        entries[filename] = entry

    # 2. the commit.
    if commit_hash is None:
        manifest = "\n".join(f"{name} {e['_blob']}" for name, e in sorted(entries.items()))
        commit_hash = hashlib.sha1(  # noqa: S324 - an id, not security
            f"retrace-local-commit\n{repo_type}:{repo_id}\n{revision}\n{manifest}\n".encode()
        ).hexdigest()
    if not _COMMIT_RE.fullmatch(commit_hash):
        raise RetraceError(f"hub cache: commit hash {commit_hash!r} must be 40 lowercase hex digits")

    snapshot = storage / "snapshots" / commit_hash
    if snapshot.is_dir():
        existing = {
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir() and not _is_temp(p.name)
        }
        if existing - set(entries):
            raise RetraceError(
                f"hub cache: commit {commit_hash} of {repo_id} already holds other files "
                f"({', '.join(sorted(existing - set(entries))[:3])}); a commit cannot change"
            )
    for filename, e in entries.items():
        pointer = snapshot.joinpath(*filename.split("/"))
        blob = storage / "blobs" / e["_blob"]
        if pointer.is_symlink() or pointer.exists():
            target = Path(os.path.realpath(pointer))
            if target == Path(os.path.realpath(blob)):
                continue
            if (
                not pointer.is_symlink()
                and file_hashes(pointer)[0 if is_lfs_file(filename) else 1] == e["_blob"]
            ):
                continue
            raise RetraceError(
                f"hub cache: commit {commit_hash} of {repo_id} already has a different {filename}"
            )
        _link(blob, pointer)

    # 3. the tree listing (huggingface_hub >= 2 reads it; older versions ignore it).
    tree = {
        "format_version": 1,
        "files": {
            name: {k: v for k, v in e.items() if not k.startswith("_")} for name, e in sorted(entries.items())
        },
    }
    _atomic_write_bytes(storage / "trees" / f"{commit_hash}.json", json.dumps(tree, indent=1).encode())

    # 4. the branch, last. No trailing newline, as huggingface_hub writes it.
    if revision != commit_hash:
        _atomic_write_bytes(storage / "refs" / Path(*revision.split("/")), commit_hash.encode())
    return snapshot


def publish_dir_to_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    revision: str,
    src_dir: str | os.PathLike,
    commit_hash: str | None = None,
    *,
    repo_type: str = "model",
) -> Path:
    """``publish_to_hub_cache`` with every file under ``src_dir`` (hidden files skipped)."""
    src_dir = Path(src_dir)
    files = {
        p.relative_to(src_dir).as_posix(): p
        for p in sorted(src_dir.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src_dir).parts)
    }
    return publish_to_hub_cache(cache_dir, repo_id, revision, files, commit_hash, repo_type=repo_type)


def read_tree_listing(
    cache_dir: str | os.PathLike, repo_id: str, commit_hash: str, repo_type: str = "model"
) -> dict[str, dict] | None:
    """The cached tree listing of a commit (``trees/<commit>.json``), or None if there is none."""
    path = repo_folder(cache_dir, repo_id, repo_type) / "trees" / f"{commit_hash}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format_version") != 1
        or not isinstance(data.get("files"), dict)
    ):
        return None
    return data["files"]
