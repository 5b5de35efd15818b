"""Resolve ``org/repo@revision`` to local weight files through huggingface_hub, sha256-verified.

Only ``config.json`` and one weight format are fetched: ``model.safetensors`` (or its sharded form)
when the revision lists it, else ``pytorch_model.bin`` (or its shards). Online, every weight file is
checked against the sha256 the Hub records for that revision (``HfApi.model_info(files_metadata=True)``
→ ``siblings[].lfs.sha256``); a mismatch is a ``RetraceError``. Offline (``HF_HUB_OFFLINE=1`` at call
time, or when the Hub cannot be reached) the cache is used as is; ``verify=True`` then checks the
files against the tree listing huggingface_hub cached when it downloaded them.

The cache directory is ``cache_dir`` if given, else ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` read *at call
time* (huggingface_hub reads them once at import), and it is always passed explicitly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import warnings
from pathlib import Path

from retrace.checkpoints.hf import SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX
from retrace.checkpoints.hubcache import read_tree_listing
from retrace.checkpoints.neox import LAYER_FILE_RE, MP_FILE_RE
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
    verified: bool

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
        LAYER_FILE_RE.match(n.rsplit("/", 1)[-1]) or MP_FILE_RE.match(n.rsplit("/", 1)[-1]) for n in names
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


def _verify(
    spec: str, folder: Path, expected: dict[str, tuple[str | None, str | None]], files: list[str]
) -> None:
    """Check each file against (LFS sha256, git blob id) as the Hub records them; sha256 when there is one."""
    for name in files:
        sha256, blob_id = expected.get(name, (None, None))
        path = folder / name
        if not path.is_file():
            raise RetraceError(f"{spec}: {name} is missing from the snapshot {folder}")
        if sha256:
            got, want, what = sha256_file(path), sha256, "sha256"
        elif blob_id:
            got, want, what = git_blob_id(path), blob_id, "git blob id"
        else:
            raise RetraceError(f"{spec}: the Hub records no sha256 for {name}; cannot verify it")
        if got != want:
            raise RetraceError(
                f"{spec}: {path} has {what} {got}, but the Hub records {want} for {name} "
                "(corrupt or replaced download; delete it from the cache and fetch again)"
            )


def resolve_hub(
    repo_id: str,
    revision: str = "main",
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: bool | None = None,
    include_optimizer: bool = False,
) -> HubSnapshot:
    """Fetch (or find in the cache) config.json and the weights of ``repo_id@revision``.

    ``verify``: None → verify online, trust the cache offline; True → also verify offline (against
    the cached tree listing); False → never hash. ``include_optimizer`` also fetches a GPT-NeoX repo's
    ZeRO optimizer states (``zero_pp_rank_*_optim_states.pt``).
    """
    extra = NEOX_OPTIMIZER_PATTERNS if include_optimizer else []
    cache = hub_cache_dir(cache_dir)
    spec = f"{repo_id}@{revision}"
    if not hub_offline():
        try:
            return _resolve_online(repo_id, revision, cache, verify is not False, extra)
        except _Unreachable as exc:
            warnings.warn(
                f"{spec}: the Hub cannot be reached ({exc}); using the local cache without "
                "checking it against the Hub",
                stacklevel=2,
            )
    return _resolve_offline(repo_id, revision, cache, verify is True, extra)


class _Unreachable(Exception):
    pass


def _resolve_online(repo_id: str, revision: str, cache: Path, verify: bool, extra: list[str]) -> HubSnapshot:
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
    if chosen is None:
        raise RetraceError(
            f"{spec}: no model.safetensors or pytorch_model.bin (or sharded index) or GPT-NeoX model files "
            f"in this revision (files: {', '.join(sorted(siblings)[:10])})"
        )
    marker, patterns = chosen
    if not marker:
        patterns = [*patterns, *extra]
    allow = [*patterns, CONFIG]
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
    weight_files = _matching(siblings, patterns)
    if verify:
        expected = {
            name: (s.lfs.sha256 if getattr(s, "lfs", None) is not None else None, getattr(s, "blob_id", None))
            for name, s in siblings.items()
        }
        _verify(spec, folder, expected, _matching(siblings, allow))
    return HubSnapshot(repo_id, revision, folder.name, folder, folder / marker, tuple(weight_files), verify)


def _resolve_offline(repo_id: str, revision: str, cache: Path, verify: bool, extra: list[str]) -> HubSnapshot:
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

    folder = local([CONFIG])
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    chosen = choose_format(present)
    if chosen is None:
        raise RetraceError(
            f"{spec}: the cached snapshot {folder} holds no model.safetensors or "
            "pytorch_model.bin (or sharded index) or GPT-NeoX model files"
        )
    marker, patterns = chosen
    if not marker:
        patterns = [*patterns, *extra]
    folder = local([*patterns, CONFIG])  # huggingface_hub checks completeness against its tree listing
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    weight_files = _matching(present, patterns)
    if verify:
        listing = read_tree_listing(cache, repo_id, folder.name)
        if listing is None:
            raise RetraceError(
                f"{spec}: no cached tree listing for commit {folder.name}; cannot verify offline"
            )
        expected = {k: (v.get("lfs_sha256"), v.get("blob_id")) for k, v in listing.items()}
        _verify(spec, folder, expected, _matching(present, [*patterns, CONFIG]))
    return HubSnapshot(repo_id, revision, folder.name, folder, folder / marker, tuple(weight_files), verify)
