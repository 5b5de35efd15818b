"""Where a fetched reference came from, kept inside the file itself (safetensors metadata).

``retrace fetch-reference`` writes ``resources/references/<repo>/step{N}.safetensors`` with these
metadata keys (all strings, written in the same atomic write as the tensors, so the record can never
describe another file):

    source                   the spec it was opened from (org/repo@stepN, or a path)
    retrace.repo             org/repo                   (Hub sources only)
    retrace.revision         stepN                      (Hub sources only)
    retrace.commit           the resolved commit sha    (Hub sources only)
    retrace.verified         "true" / "false": every source file matched the Hub's recorded hash
    retrace.verified_against "hub" (online), "cache" (the cache's metadata, offline) or ""
    retrace.files            JSON {repo file name: "sha256:<hex>" | "git-blob:<sha1>"} as checked
    retrace.config           JSON config.json of the source (so the file alone can start a run)

``read_reference_record`` reads them back for the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrace.checkpoints.sources import CONFIG_METADATA_KEY
from retrace.errors import RetraceError

REPO, REVISION, COMMIT = "retrace.repo", "retrace.revision", "retrace.commit"
VERIFIED, VERIFIED_AGAINST, FILES = "retrace.verified", "retrace.verified_against", "retrace.files"
_STEP_RE = re.compile(r"step(\d+)")


@dataclasses.dataclass(frozen=True)
class ReferenceRecord:
    """The provenance of one fetched reference file."""

    path: Path
    source: str
    repo: str | None
    revision: str | None
    commit: str | None
    verified: bool
    verified_against: str
    files: Mapping[str, str]

    @property
    def step(self) -> int | None:
        """N of a ``stepN`` revision (else of the file name ``stepN.safetensors``)."""
        for text in (self.revision or "", self.path.stem):
            m = _STEP_RE.fullmatch(text)
            if m:
                return int(m.group(1))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "source": self.source,
            "repo": self.repo,
            "revision": self.revision,
            "step": self.step,
            "commit": self.commit,
            "verified": self.verified,
            "verified_against": self.verified_against,
            "files": dict(self.files),
        }


def reference_metadata(reader: Any, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The metadata for a reference written from ``reader`` (an ``open_params`` reader).

    Args:
        reader: the opened source; a Hub source carries its ``HubSnapshot`` as ``reader.hub``.
        config: the source's config.json, stored so the file can be opened on its own.

    Returns:
        A string → string mapping for ``save_params(metadata=...)``.
    """
    meta = {"source": str(reader.source), VERIFIED: "false", VERIFIED_AGAINST: "", FILES: "{}"}
    snap = getattr(reader, "hub", None)
    if snap is not None:
        meta.update({
            REPO: snap.repo_id,
            REVISION: snap.revision,
            COMMIT: snap.commit,
            VERIFIED: "true" if snap.verified else "false",
            VERIFIED_AGAINST: snap.verified_against if snap.verified else "",
            FILES: json.dumps(dict(sorted(snap.hashes.items())), separators=(",", ":")),
        })
    if config is not None:
        meta[CONFIG_METADATA_KEY] = json.dumps(dict(config), sort_keys=True, separators=(",", ":"))
    return meta


def read_reference_record(path: str | os.PathLike) -> ReferenceRecord:
    """The provenance stored in a fetched reference's metadata (see the module docstring).

    A file written before the record existed reads as unverified with no commit.

    Raises:
        RetraceError: not a readable safetensors file, or a malformed ``retrace.files``.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise RetraceError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        files = json.loads(meta.get(FILES) or "{}")
        if not isinstance(files, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise RetraceError(f"{path}: metadata {FILES} is not a JSON object: {exc}") from exc
    return ReferenceRecord(
        path=path,
        source=meta.get("source", ""),
        repo=meta.get(REPO),
        revision=meta.get(REVISION),
        commit=meta.get(COMMIT),
        verified=meta.get(VERIFIED) == "true",
        verified_against=meta.get(VERIFIED_AGAINST, ""),
        files={str(k): str(v) for k, v in files.items()},
    )


def reference_files(paths: Any) -> list[Path]:
    """Every ``step*.safetensors`` under the given files or directories, sorted, each once."""
    out: set[Path] = set()
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        if p.is_dir():
            out.update(q for q in p.rglob("step*.safetensors") if q.is_file())
        elif p.is_file():
            out.add(p)
        else:
            raise RetraceError(f"{p}: no such reference file or directory")
    return sorted(out)
