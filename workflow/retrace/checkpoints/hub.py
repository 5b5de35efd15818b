"""Resolve ``org/repo@revision`` to local weight files through huggingface_hub, sha256-verified.

Only ``config.json`` and one weight format are fetched: ``model.safetensors`` (or its sharded form)
when the revision lists it, else ``pytorch_model.bin`` (or its shards). Every fetched file is checked
(``verify``, see ``retrace.checkpoints.trust``; the default fails closed):

* online, against the sha256 the Hub records for that revision (``HfApi.model_info(files_metadata=True)``
  → ``siblings[].lfs.sha256``; the git blob id for small non-LFS files such as config.json);
* offline (``HF_HUB_OFFLINE=1`` at call time), or when the Hub cannot be reached, against the metadata
  the cache holds: the tree listing huggingface_hub >= 2 caches (``trees/<commit>.json``, which retrace's
  own publisher writes too), else the name of the content-addressed blob the snapshot links to (the
  Hub's ETag: the sha256 for LFS files, the git blob id for others). A file with neither record cannot be
  verified offline: refused under ``"require"``, used with a warning under ``"warn"``.

A hash that differs from its record is always refused. The result (``HubSnapshot``) says whether every
file was verified, against what, and the hashes checked, so fetched references can record them.

The cache directory is ``cache_dir`` if given, else ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` read *at call
time* (huggingface_hub reads them once at import), and it is always passed explicitly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from retrace.checkpoints.hubcache import read_tree_listing
from retrace.checkpoints.names import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX
from retrace.checkpoints.neox import LAYER_FILE_RE, MP_FILE_RE
from retrace.checkpoints.trust import ALLOW_UNVERIFIED_ENV, OFF, REQUIRE, verify_mode
from retrace.errors import RetraceError
from retrace.hubenv import hub_cache_dir, hub_offline
from retrace.io import sha256_file

CONFIG = "config.json"

#: (file that marks the format, the patterns that fetch it), in order of preference.
WEIGHT_FORMATS = (
    (SAFETENSORS, [SAFETENSORS]),
    (SAFETENSORS_INDEX, [SAFETENSORS_INDEX, "model-*-of-*.safetensors"]),
    (TORCH_BIN, [TORCH_BIN]),
    (TORCH_BIN_INDEX, [TORCH_BIN_INDEX, "pytorch_model-*-of-*.bin"]),
)
#: A GPT-NeoX native repo (e.g. EleutherAI/neox-ckpt-pythia-*): model files, ``latest`` and the ymls,
#: at the top level or under ``global_stepN/``; optimizer states only on request (they are large).
NEOX_PATTERNS = [
    "*layer_*-model_*-model_states.pt",
    "*mp_rank_*_model_states.pt",
    "latest",
    "*/latest",
    "*configs/*.yml",
    "*configs/*.yaml",
]
NEOX_OPTIMIZER_PATTERNS = ["*zero_pp_rank_*_mp_rank_*_optim_states.pt"]


@dataclasses.dataclass(frozen=True)
class HubSnapshot:
    """A resolved revision: its local snapshot folder and the weight entry point inside it."""

    repo_id: str
    revision: str
    commit: str
    folder: Path
    weights: Path  # model.safetensors, pytorch_model.bin, a *.index.json, or the folder (GPT-NeoX)
    files: tuple[str, ...]  # the weight files (repo names) fetched
    verified: bool  # every fetched file matched its recorded hash
    verified_against: str = ""  # "hub" (model_info), "cache" (the cache's tree listing / blob names), ""
    hashes: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)  # name → "sha256:…"

    @property
    def spec(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def choose_format(filenames) -> tuple[str, list[str]] | None:
    """(entry point, patterns to fetch) for a revision's file list; entry "" means the folder (NeoX)."""
    names = set(filenames)
    for marker, patterns in WEIGHT_FORMATS:
        if marker in names:
            return marker, patterns
    if any(
        LAYER_FILE_RE.fullmatch(n.rsplit("/", 1)[-1]) or MP_FILE_RE.fullmatch(n.rsplit("/", 1)[-1]) for n in names
    ):
        return "", list(NEOX_PATTERNS)
    return None


def _matching(filenames, patterns) -> list[str]:
    return sorted(f for f in filenames if any(fnmatch.fnmatchcase(f, p) for p in patterns))


def git_blob_id(path: str | os.PathLike) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha1(b"blob %d\0" % size)  # noqa: S324 - git's object id
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")

#: A file's record: (LFS sha256, git blob id), either may be None.
Record = tuple[str | None, str | None]


def blob_name_record(path: Path) -> Record:
    """The record a snapshot file's content-addressed blob name gives (huggingface_hub names blobs by
    the Hub's ETag: the sha256 for LFS files, the git blob id for others); (None, None) for a copy."""
    if not path.is_symlink():
        return None, None
    target = Path(os.path.realpath(path))
    if target.parent.name != "blobs":
        return None, None
    if _SHA256_RE.fullmatch(target.name):
        return target.name, None
    if _SHA1_RE.fullmatch(target.name):
        return None, target.name
    return None, None


@dataclasses.dataclass(frozen=True)
class _Checked:
    verified: bool
    hashes: dict[str, str]


def _verify(
    spec: str,
    folder: Path,
    files: list[str],
    record: Callable[[str], Record],
    *,
    mode: str,
    where: str,
) -> _Checked:
    """Check each file against its record (sha256 when there is one, else the git blob id).

    A mismatch is always a ``RetraceError``; a file with no record is one under ``"require"`` and a
    warning under ``"warn"``.
    """
    hashes: dict[str, str] = {}
    verified = True
    for name in files:
        path = folder / name
        if not path.is_file():
            raise RetraceError(f"{spec}: {name} is missing from the snapshot {folder}")
        sha256, blob_id = record(name)
        if sha256:
            got, want, what = sha256_file(path), sha256, "sha256"
        elif blob_id:
            got, want, what = git_blob_id(path), blob_id, "git blob id"
        else:
            msg = (
                f"{spec}: {where} records no sha256 or git blob id for {name}, so {path} cannot be verified"
            )
            if mode == REQUIRE:
                raise RetraceError(
                    f"{msg}; fetch it online once (or with a huggingface_hub that caches tree listings), "
                    f"or accept unverified files with {ALLOW_UNVERIFIED_ENV}=1 / verify='warn'"
                )
            warnings.warn(f"{msg}; using it unverified ({ALLOW_UNVERIFIED_ENV} / verify='warn')", stacklevel=3)
            verified = False
            continue
        if got != want:
            raise RetraceError(
                f"{spec}: {path} has {what} {got}, but {where} records {want} for {name} "
                "(corrupt or replaced download; delete it from the cache and fetch again)"
            )
        hashes[name] = f"{'sha256' if what == 'sha256' else 'git-blob'}:{got}"
    return _Checked(verified, hashes)


def resolve_hub(
    repo_id: str,
    revision: str = "main",
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: str | bool | None = None,
    include_optimizer: bool = False,
    config_only: bool = False,
) -> HubSnapshot:
    """Fetch (or find in the cache) config.json and the weights of ``repo_id@revision``, verified.

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag or commit (``step1000``).
        cache_dir: the huggingface_hub cache (default: ``$HF_HUB_CACHE`` at call time).
        verify: ``"require"`` | ``"warn"`` | ``"off"`` (True/False: require/off); None → ``"require"``,
            or ``"warn"`` under ``RETRACE_ALLOW_UNVERIFIED=1`` (see ``retrace.checkpoints.trust``).
        include_optimizer: also fetch a GPT-NeoX repo's ZeRO optimizer states.
        config_only: fetch (and verify) only config.json when the revision has one; ``weights`` then
            names a file that need not be on disk.

    Returns:
        The ``HubSnapshot``: its folder, the weight entry point, and what was verified against what.

    Raises:
        RetraceError: unknown repo or revision, nothing usable in it, not cached (offline), a hash that
        differs from its record, or (under ``"require"``) a file with no record to check.
    """
    mode = verify_mode(verify)
    extra = NEOX_OPTIMIZER_PATTERNS if include_optimizer else []
    cache = hub_cache_dir(cache_dir)
    spec = f"{repo_id}@{revision}"
    if not hub_offline():
        try:
            return _resolve_online(repo_id, revision, cache, mode, extra, config_only)
        except _Unreachable as exc:
            how = "without verifying it" if mode == OFF else "verified against the metadata the cache holds"
            warnings.warn(f"{spec}: the Hub cannot be reached ({exc}); using the local cache, {how}", stacklevel=2)
    return _resolve_offline(repo_id, revision, cache, mode, extra, config_only)


class _Unreachable(Exception):
    pass


def _resolve_online(
    repo_id: str, revision: str, cache: Path, mode: str, extra: list[str], config_only: bool
) -> HubSnapshot:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = f"{repo_id}@{revision}"
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError as exc:
        raise RetraceError(f"{spec}: the Hub has no revision {revision!r} of {repo_id}") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise RetraceError(f"{spec}: repository not found or not accessible on the Hub: {exc}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status < 500:
            raise RetraceError(f"{spec}: the Hub refused the request: {exc}") from exc
        raise _Unreachable(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - connection errors (httpx/requests), offline mode
        raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc

    siblings = {s.rfilename: s for s in (info.siblings or [])}
    chosen = choose_format(siblings)
    config_alone = config_only and CONFIG in siblings
    if chosen is None and not config_alone:
        raise RetraceError(
            f"{spec}: no model.safetensors or pytorch_model.bin (or sharded index) or GPT-NeoX model files "
            f"in this revision (files: {', '.join(sorted(siblings)[:10])})"
        )
    marker, patterns = chosen if chosen is not None else ("", [])
    if not marker:
        patterns = [*patterns, *extra]
    allow = [CONFIG] if config_alone else [*patterns, CONFIG]
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=allow)
        )
    except Exception as exc:  # noqa: BLE001
        raise RetraceError(f"{spec}: download failed: {type(exc).__name__}: {exc}") from exc
    if info.sha and folder.name != info.sha:
        raise RetraceError(
            f"{spec}: the branch moved during the download (listed {info.sha}, fetched {folder.name}); retry"
        )
    weight_files = [] if config_alone else _matching(siblings, patterns)
    checked = _Checked(False, {})
    if mode != OFF:

        def record(name: str) -> Record:
            s = siblings.get(name)
            if s is None:
                return None, None
            lfs = getattr(s, "lfs", None)
            return (getattr(lfs, "sha256", None) if lfs is not None else None), getattr(s, "blob_id", None)

        checked = _verify(spec, folder, _matching(siblings, allow), record, mode=mode, where="the Hub")
    return HubSnapshot(
        repo_id, revision, folder.name, folder, folder / marker, tuple(weight_files), checked.verified,
        "hub" if checked.verified else "", checked.hashes,
    )


def _resolve_offline(
    repo_id: str, revision: str, cache: Path, mode: str, extra: list[str], config_only: bool
) -> HubSnapshot:
    from huggingface_hub import snapshot_download

    spec = f"{repo_id}@{revision}"

    def local(patterns: list[str]) -> Path:
        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=str(cache),
                    allow_patterns=patterns,
                    local_files_only=True,
                )
            )
        except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, IncompleteSnapshotError
            raise RetraceError(
                f"{spec}: not in the local Hub cache {cache} (offline): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc

    def files_in(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())

    def checked(folder: Path, files: list[str]) -> _Checked:
        if mode == OFF:
            return _Checked(False, {})
        listing = read_tree_listing(cache, repo_id, folder.name) or {}

        def record(name: str) -> Record:
            entry = listing.get(name)
            if isinstance(entry, Mapping) and (entry.get("lfs_sha256") or entry.get("blob_id")):
                return entry.get("lfs_sha256"), entry.get("blob_id")
            return blob_name_record(folder / name)

        return _verify(spec, folder, files, record, mode=mode, where="the local Hub cache")

    folder = local([CONFIG])
    present = files_in(folder)
    chosen = choose_format(present)
    if config_only and CONFIG in present:
        marker = chosen[0] if chosen is not None else ""
        c = checked(folder, [CONFIG])
        return HubSnapshot(
            repo_id, revision, folder.name, folder, folder / marker, (), c.verified, "cache" if c.verified else "",
            c.hashes,
        )
    if chosen is None:
        raise RetraceError(
            f"{spec}: the cached snapshot {folder} holds no model.safetensors or "
            "pytorch_model.bin (or sharded index) or GPT-NeoX model files"
        )
    marker, patterns = chosen
    if not marker:
        patterns = [*patterns, *extra]
    folder = local([*patterns, CONFIG])  # huggingface_hub checks completeness against its tree listing
    present = files_in(folder)
    weight_files = _matching(present, patterns)
    c = checked(folder, _matching(present, [*patterns, CONFIG]))
    return HubSnapshot(
        repo_id, revision, folder.name, folder, folder / marker, tuple(weight_files), c.verified,
        "cache" if c.verified else "", c.hashes,
    )
