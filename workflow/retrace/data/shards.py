"""One ``.bin`` read in place from several files laid end to end (the shards of a Pile variant).

Pythia's data repos split each ``.bin`` into shards that cut through documents and items at fixed byte
counts (``unshard_memmap.py`` concatenates them). :class:`ShardedBin` memory-maps each shard where it
lies (the Hugging Face cache) and answers reads at offsets of the whole; a read across a shard boundary
is assembled from both sides. Shards may be absent (a study that only reads the first items of a
preshuffled stream fetches only the shards that hold them); reading bytes of an absent shard raises a
RetraceError naming the shard.

A *shard manifest* ``<prefix>.shards.json`` says which files make up ``<prefix>``: the ``.idx``, every
shard with its size and offset (fetched or not), each fetched file's sha256 and stamp (see
:mod:`retrace.data.integrity`). :class:`~retrace.data.indexed.IndexedDataset` opens a prefix through its
manifest when there is no ``<prefix>.bin``; every open checks that each listed file still has the stamp it
had when its hash was checked.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrace.data.integrity import SOURCES, is_sha256, stamp_matches, valid_stamp
from retrace.errors import RetraceError

MANIFEST_FORMAT = "retrace/sharded-bin/1"
MANIFEST_SUFFIX = ".shards.json"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def manifest_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.shards.json``."""
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


@dataclass(frozen=True)
class Piece:
    """One file of a sharded ``.bin``: bytes ``[offset, offset + size)`` of the whole."""

    name: str  # repo file name (or the copy's path), for messages
    offset: int
    size: int
    path: Path | None = None  # None: not fetched


class ShardedBin:
    """Read-only bytes of a ``.bin`` made of ``pieces`` in order, each memory-mapped on first use."""

    def __init__(self, pieces: list[Piece], *, label: str):
        self.label = label
        self.pieces = list(pieces)
        pos = 0
        for p in self.pieces:
            if p.offset != pos or p.size < 0:
                raise RetraceError(f"{label}: shard {p.name} starts at byte {p.offset}, expected {pos} "
                                   "(shards must be listed in order, end to end)")
            pos += p.size
        self.size = pos
        self._starts = [p.offset for p in self.pieces]
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def single(cls, path: str | os.PathLike) -> ShardedBin:
        path = Path(path)
        return cls([Piece(str(path), 0, path.stat().st_size, path)], label=str(path))

    @property
    def single_file(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0].path is not None

    def present(self, start: int, stop: int) -> bool:
        """Whether bytes ``[start, stop)`` all lie in fetched shards."""
        return not self.missing(start, stop)

    def missing(self, start: int, stop: int) -> list[str]:
        """Names of the absent shards that bytes ``[start, stop)`` touch."""
        return [self.pieces[i].name for i in self._span(start, stop) if self.pieces[i].path is None]

    def present_ranges(self) -> list[tuple[int, int]]:
        """Maximal byte ranges ``[a, b)`` covered by fetched shards."""
        out: list[tuple[int, int]] = []
        for p in self.pieces:
            if p.path is None or p.size == 0:
                continue
            if out and out[-1][1] == p.offset:
                out[-1] = (out[-1][0], p.offset + p.size)
            else:
                out.append((p.offset, p.offset + p.size))
        return out

    def _span(self, start: int, stop: int) -> range:
        if stop <= start:
            return range(0)
        first = bisect.bisect_right(self._starts, start) - 1
        last = bisect.bisect_right(self._starts, stop - 1) - 1
        return range(max(first, 0), last + 1)

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            p = self.pieces[i]
            if p.path is None:
                raise RetraceError(f"{self.label}: shard {p.name} is not fetched; prepare the data for the items "
                                   "this run reads (the study's steps × global batch)")
            m = np.memmap(p.path, dtype=np.uint8, mode="r") if p.size else np.zeros(0, np.uint8)
            if m.size != p.size:
                raise RetraceError(f"{self.label}: shard {p.name} ({p.path}) has {m.size} bytes, expected {p.size}")
            self._maps[i] = m
        return m

    def read(self, start: int, nbytes: int) -> np.ndarray:
        """Bytes ``[start, start + nbytes)`` as uint8: a view inside one shard, a copy across shards."""
        stop = start + nbytes
        if start < 0 or nbytes < 0 or stop > self.size:
            raise RetraceError(f"{self.label}: bytes [{start}, {stop}) out of range [0, {self.size})")
        span = self._span(start, stop)
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        if len(span) == 1:
            i = span[0]
            a = start - self.pieces[i].offset
            return self._map(i)[a:a + nbytes]
        out = np.empty(nbytes, np.uint8)
        for i in span:
            p = self.pieces[i]
            a, b = max(start, p.offset), min(stop, p.offset + p.size)
            out[a - start:b - start] = self._map(i)[a - p.offset:b - p.offset]
        return out

    def tokens(self, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        """``count`` values of ``dtype`` starting at byte ``start``."""
        return self.read(start, count * dtype.itemsize).view(dtype)

    def whole(self) -> np.ndarray:
        """The single file's bytes as one array (only for an unsharded ``.bin``)."""
        if not self.single_file:
            raise RetraceError(f"{self.label}: made of {len(self.pieces)} shards; read it by offset instead")
        return self._map(0)

    def close(self) -> None:
        self._maps.clear()


# -- the manifest -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict

    @property
    def idx_path(self) -> Path:
        return Path(self.data["idx"]["path"])

    def pieces(self) -> list[Piece]:
        return [Piece(s["name"], s["offset"], s["size"], Path(s["path"]) if s["path"] else None)
                for s in self.data["shards"]]

    def check_stamps(self) -> None:
        """Every listed file still has the stamp it had when its hash was checked."""
        for entry in [self.data["idx"], *self.data["shards"]]:
            if entry["path"] is None:
                continue
            if not stamp_matches(entry["path"], entry["stamp"]):
                what = "is missing" if not os.path.exists(entry["path"]) else "changed"
                raise RetraceError(f"{self.path}: {entry['name']} ({entry['path']}) {what} since its sha256 was "
                                   "checked; prepare the data again (the workflow's pile_data rule) to re-verify it")

    def bin(self) -> ShardedBin:
        return ShardedBin(self.pieces(), label=str(self.path))


def _bad(path: Path, why: str) -> RetraceError:
    return RetraceError(f"{path}: not a valid shard manifest ({why}); delete it and prepare the data again")


def _check_file_entry(path: Path, where: str, e: object, *, fetched_required: bool) -> None:
    if not isinstance(e, dict):
        raise _bad(path, f"{where} is not an object")
    if not isinstance(e.get("name"), str) or not e["name"]:
        raise _bad(path, f"{where}.name")
    p = e.get("path")
    if p is None:
        if fetched_required:
            raise _bad(path, f"{where}.path is missing")
        return
    if not isinstance(p, str) or not os.path.isabs(p):
        raise _bad(path, f"{where}.path must be an absolute path")
    if not is_sha256(e.get("sha256")):
        raise _bad(path, f"{where}.sha256 must be 64 lowercase hex digits")
    if e.get("sha256_source") not in SOURCES:
        raise _bad(path, f"{where}.sha256_source must be one of {SOURCES}")
    if not valid_stamp(e.get("stamp")):
        raise _bad(path, f"{where}.stamp")


def validate_manifest(path: Path, data: object) -> dict:
    """Check the structure of a manifest; returns it. Raises RetraceError naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise _bad(path, f"format is not {MANIFEST_FORMAT!r}")
    commit = data.get("commit")
    if commit is not None and not (isinstance(commit, str) and COMMIT_RE.fullmatch(commit)):
        raise _bad(path, "commit must be 40 lowercase hex digits")
    _check_file_entry(path, "idx", data.get("idx"), fetched_required=True)
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _bad(path, "shards must be a non-empty list")
    pos = 0
    for i, s in enumerate(shards):
        _check_file_entry(path, f"shards[{i}]", s, fetched_required=False)
        for key in ("offset", "size"):
            if type(s.get(key)) is not int or s[key] < 0:
                raise _bad(path, f"shards[{i}].{key} must be a non-negative integer")
        if s["offset"] != pos:
            raise _bad(path, f"shards[{i}] starts at {s['offset']}, expected {pos}")
        pos += s["size"]
    if data.get("bin_bytes") != pos:
        raise _bad(path, f"bin_bytes {data.get('bin_bytes')!r} is not the sum of the shard sizes ({pos})")
    return data


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a shard manifest (structure only; :meth:`Manifest.check_stamps` checks the files)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetraceError(f"{path}: cannot read the shard manifest ({exc})") from exc
    return Manifest(path, validate_manifest(path, data))


def read_manifest_if_valid(path: str | os.PathLike) -> Manifest | None:
    """The manifest at ``path``, or None when there is none or it does not validate (it will be rewritten)."""
    try:
        return load_manifest(path) if Path(path).is_file() else None
    except RetraceError:
        return None
