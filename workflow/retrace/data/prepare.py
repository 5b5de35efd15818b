"""Fetch and verify one Pile variant, and write the shard manifest that makes it readable in place.

:func:`prepare_hub` (a variant on the Hub):

1. pin the commit: the registry's commit, or the branch it names resolved once (the manifest records the
   commit; later runs keep it until the manifest is deleted or another revision is asked for);
2. list the commit's files with sizes and Git LFS sha256 (the Hub online, the cached tree listing
   offline) and plan the shards the study needs (:func:`~retrace.data.variants.plan_variant_fetch`);
   a planned file the commit does not have is refused before anything is downloaded;
3. check there is room in the Hugging Face cache for what is not there yet;
4. fetch each planned file not already fetched and verified, and check its sha256: the published
   one (Pythia's lists), else the Hub's LFS sha256, else the one recorded at first download. A file that
   fails is removed from the cache, so no later run finds it;
5. open the result as an indexed dataset (structure, sizes) and write ``<dest>/<name>.shards.json``,
   atomically and last. Shards fetched for an earlier, smaller plan stay listed: growing a study fetches
   only the missing shards.

:func:`prepare_copy` (``path:`` a copy on disk): the copy's ``.idx`` and ``.bin`` are hashed on first use
(progress logged) and checked against the published sha256 where one exists (the deduped idxmaps'
merged ``.bin`` and ``.idx``); the hashes and stamps go into the manifest under ``dest``, and every later
use checks the stamps and re-hashes a file whose stamp changed.

A failure raises one RetraceError and leaves the previous manifest (if any) as it was: a shard missing on
the Hub, a hash mismatch, the disk filling up during a download (huggingface_hub removes its partial file).
"""

from __future__ import annotations

import os
from pathlib import Path

from retrace.data import hubfetch
from retrace.data.indexed import IndexedDataset, split_prefix
from retrace.data.integrity import stamp_matches, verified_record
from retrace.data.shards import (
    MANIFEST_FORMAT,
    Piece,
    ShardedBin,
    manifest_path,
    read_manifest_if_valid,
    validate_manifest,
)
from retrace.data.variants import FetchPlan, VariantSource, plan_variant_fetch
from retrace.errors import RetraceError
from retrace.hubenv import hub_cache_dir
from retrace.io import write_json


def _noop(_msg: str) -> None:
    pass


def prepare_hub(source: VariantSource, dest: str | os.PathLike, *, cache_dir=None, revision: str | None = None,
                max_items: int | None = None, first_item: int = 0, seq_length: int, shuffle_samples: bool = False,
                num_samples: int | None = None, rehash: bool = False, token: str | None = None,
                endpoint: str | None = None, log=None) -> Path:
    """Fetch what ``source`` needs for items ``[first_item, max_items)`` and return ``<dest>/<name>``."""
    say = log or _noop
    dest = Path(dest)
    prefix = dest / source.name
    mpath = manifest_path(prefix)
    requested = hubfetch.check_revision(revision or source.revision, where=source.label)
    previous = _previous(mpath, source, say)

    pinned = requested if hubfetch.is_commit(requested) else None
    if pinned is None and previous is not None and previous.get("revision") == requested:
        pinned = previous["commit"]  # the branch was resolved once; keep that commit
    if previous is not None and pinned is not None and previous.get("commit") != pinned:
        say(f"{source.label}: {mpath} is for commit {previous.get('commit')}, not {pinned}; starting a new record")
        previous = None
    snapshot = hubfetch.resolve_snapshot(source.repo_id, pinned or requested, cache_dir=cache_dir,
                                         endpoint=endpoint, token=token)
    commit = snapshot.commit
    if previous is not None and previous.get("commit") != commit:
        previous = None
    if pinned is None:
        say(f"{source.label}: {source.repo_id} {requested} is commit {commit}; recorded, later runs keep it")

    if snapshot.source != "none":  # every file of the variant must be in the commit, whatever the plan
        absent = [n for n in [source.idx_repo_file(), *source.shard_files()] if n not in snapshot.files]
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise RetraceError(f"{source.repo_id}@{commit[:12]}: missing on the Hub: {', '.join(absent[:3])}{more} "
                               f"(the commit's file list, from the {snapshot.source}, has {len(snapshot.files)} "
                               "files); nothing was downloaded")
    prev_entries = _entries(previous)
    sizes, idx_size = _sizes(source, snapshot, previous)
    have = {i for i, name in enumerate(source.shard_files())
            if name in prev_entries and stamp_matches(prev_entries[name]["path"], prev_entries[name]["stamp"])}
    idx_name = source.idx_repo_file()
    have_idx = idx_name in prev_entries and stamp_matches(prev_entries[idx_name]["path"],
                                                          prev_entries[idx_name]["stamp"])
    plan = plan_variant_fetch(source, max_items=max_items, first_item=first_item, seq_length=seq_length,
                              shuffle_samples=shuffle_samples, num_samples=num_samples, shard_sizes=sizes,
                              idx_bytes=idx_size, have=have, have_idx=have_idx, revision=commit)
    say(plan.describe())
    _check_room(source, plan, commit, cache_dir, rehash)

    entries: dict[str, dict] = {}
    for f in plan.files:
        expected, where = _expected(source, f.index, f.name, snapshot, commit)
        prev = prev_entries.get(f.name)
        if f.have and not rehash and (expected is None or prev.get("sha256") == expected):
            entries[f.name] = prev
            continue
        say(f"{source.label}: fetching {f.name}" + (f" ({f.bytes / 1e9:.1f} GB)" if f.bytes else ""))
        local = hubfetch.fetch(source.repo_id, f.name, commit, cache_dir=cache_dir, endpoint=endpoint, token=token)
        size = local.stat().st_size
        label = f"{source.repo_id}@{commit[:12]}: {f.name}"
        listed = snapshot.files.get(f.name)
        try:
            if listed is not None and listed.size is not None and size != listed.size:
                raise RetraceError(f"{label} ({local}) has {size} bytes, the Hub lists {listed.size}")
            record = verified_record(local, label=label, expected=expected, expected_source=where,
                                     previous=prev, rehash=rehash, log=say)
        except RetraceError:
            hubfetch.discard(local, repo_id=source.repo_id, cache_dir=cache_dir)
            raise
        entries[f.name] = {"name": f.name, "path": os.path.abspath(local), "size": size, **record}
    for name, prev in prev_entries.items():  # shards of an earlier, larger plan: keep while unchanged
        if name not in entries and stamp_matches(prev["path"], prev["stamp"]):
            entries[name] = prev

    manifest = _manifest(source, requested, commit, entries, sizes, plan)
    _check_structure(source, mpath, manifest, seq_length)
    _note_legacy_copy(prefix, say)
    _write(mpath, manifest)
    say(f"{source.label}: {len(plan.shards)} of {source.num_shards} shards ready, read in place; {mpath}")
    return prefix


def prepare_copy(source: VariantSource, dest: str | os.PathLike, path: str | os.PathLike, *,
                 rehash: bool = False, log=None) -> Path:
    """Check a copy on disk (structure, then sha256 once), record it under ``dest``; returns ``<dest>/<name>``."""
    say = log or _noop
    copy = split_prefix(path)
    bin_path, idx_path = Path(f"{copy}.bin").absolute(), Path(f"{copy}.idx").absolute()
    with IndexedDataset(copy, bin_path=bin_path, idx_path=idx_path):
        pass  # structure first: a truncated copy fails in seconds, not after hashing it
    prefix = Path(dest) / source.name
    mpath = manifest_path(prefix)
    previous = read_manifest_if_valid(mpath)
    prev = _entries(previous) if previous is not None and previous.data.get("copy_of") == str(copy.absolute()) else {}
    recs = {}
    for p, want in ((idx_path, source.idx_sha256), (bin_path, source.bin_sha256)):
        rec = verified_record(p, label=f"{source.label} copy {p}", expected=want,
                              expected_source="published" if want else None, previous=prev.get(str(p)),
                              rehash=rehash, log=say)
        if rec is prev.get(str(p)):
            say(f"{p}: unchanged since its sha256 was checked")
        recs[str(p)] = {"name": str(p), "path": str(p), "size": p.stat().st_size, **rec}
    size = recs[str(bin_path)]["size"]
    manifest = {"format": MANIFEST_FORMAT, "variant": source.label, "copy_of": str(copy.absolute()),
                "repo_id": None, "revision": None, "commit": None, "idx": recs[str(idx_path)],
                "shards": [{**recs[str(bin_path)], "offset": 0}], "bin_bytes": size}
    validate_manifest(mpath, manifest)
    _write(mpath, manifest)
    say(f"{source.label}: copy {copy} verified ({', '.join(r['sha256_source'] for r in recs.values())}); {mpath}")
    return prefix


# -- steps ------------------------------------------------------------------------------------------

def _previous(mpath: Path, source: VariantSource, say) -> dict | None:
    if not mpath.is_file():
        return None
    m = read_manifest_if_valid(mpath)
    if m is None:
        say(f"{mpath}: not a valid shard manifest; it will be rewritten and every file checked again")
        return None
    if m.data.get("repo_id") != source.repo_id:
        return None
    return m.data


def _entries(previous) -> dict[str, dict]:
    data = previous.data if hasattr(previous, "data") else previous
    if not data:
        return {}
    return {e["name"]: e for e in [data["idx"], *data["shards"]] if e.get("path")}


def _sizes(source: VariantSource, snapshot: hubfetch.Snapshot,
           previous: dict | None) -> tuple[list[int] | None, int | None]:
    """Each shard's bytes and the .idx's: the Hub's list, else the registry's layout, else the record."""
    layout = source.layout()
    names = source.shard_files()
    listed = [snapshot.files[n].size if n in snapshot.files else None for n in names]
    recorded = ([s["size"] for s in previous["shards"]] if previous is not None
                and len(previous["shards"]) == len(names) else [None] * len(names))
    sizes = []
    for i, name in enumerate(names):
        hub, reg, rec = listed[i], layout[i] if layout else None, recorded[i]
        if hub is not None and reg is not None and hub != reg:
            raise RetraceError(f"{source.repo_id}@{snapshot.commit[:12]}: {name} has {hub} bytes on the Hub but "
                               f"the registry's layout says {reg}; the repository changed, check the registry")
        sizes.append(hub if hub is not None else reg if reg is not None else rec)
    idx = snapshot.files.get(source.idx_repo_file())
    idx_size = idx.size if idx is not None and idx.size is not None else source.idx_bytes
    if idx_size is None and previous is not None:
        idx_size = previous["idx"]["size"]
    return (sizes if all(s is not None for s in sizes) else None), idx_size


def _expected(source: VariantSource, index: int | None, name: str, snapshot: hubfetch.Snapshot,
              commit: str) -> tuple[str | None, str | None]:
    """The sha256 a file must have and where that value comes from (published > hub), or (None, None)."""
    published = source.idx_sha256 if index is None else (source.shard_sha256[index] if source.shard_sha256 else None)
    listed = snapshot.files.get(name)
    hub = listed.sha256 if listed is not None else None
    if published and hub and published != hub:
        raise RetraceError(f"{source.repo_id}@{commit[:12]}: the Hub's LFS sha256 of {name} is {hub}, but the "
                           f"published one is {published}; refusing both")
    if published:
        return published, "published"
    if hub:
        return hub, "hub"
    return None, None


def _check_room(source: VariantSource, plan: FetchPlan, commit: str, cache_dir, rehash: bool) -> None:
    todo = [f for f in plan.files if not f.have or rehash]
    need = sum(f.bytes or 0 for f in todo
               if hubfetch.cached_file(source.repo_id, f.name, commit, cache_dir=cache_dir) is None)
    free = hubfetch.free_bytes(cache_dir)
    if need > free:
        raise RetraceError(f"{source.label}: {need:,} bytes to download into {hub_cache_dir(cache_dir)} but only "
                           f"{free:,} are free; free space (or point HF_HUB_CACHE elsewhere) and run again")


def _manifest(source: VariantSource, requested: str, commit: str, entries: dict[str, dict],
              sizes: list[int] | None, plan: FetchPlan) -> dict:
    shards, pos = [], 0
    for i, name in enumerate(source.shard_files()):
        e = entries.get(name)
        size = e["size"] if e is not None else (sizes[i] if sizes is not None else None)
        if size is None:
            raise RetraceError(f"{source.label}: the size of {name} is not known (offline without the Hub's file "
                               "list); prepare once with the Hub reachable")
        shards.append({**(e or {"name": name, "path": None}), "offset": pos, "size": size})
        pos += size
    return {"format": MANIFEST_FORMAT, "variant": source.label, "repo_id": source.repo_id,
            "revision": requested, "commit": commit, "idx": entries[source.idx_repo_file()], "shards": shards,
            "bin_bytes": pos, "plan": plan.as_dict()}


def _check_structure(source: VariantSource, mpath: Path, manifest: dict, seq_length: int) -> None:
    validate_manifest(mpath, manifest)
    pieces = [Piece(s["name"], s["offset"], s["size"], Path(s["path"]) if s["path"] else None)
              for s in manifest["shards"]]
    with IndexedDataset(mpath.with_name(source.name), idx_path=manifest["idx"]["path"],
                        sharded=ShardedBin(pieces, label=str(mpath))) as ds:
        if source.kind == "preshuffled":
            w = seq_length + 1
            if len(ds) and not (int(ds.sizes.min()) == int(ds.sizes.max()) == w):
                raise RetraceError(f"{source.label}: {manifest['idx']['name']} holds items of "
                                   f"{int(ds.sizes.min())}..{int(ds.sizes.max())} tokens, expected {w} "
                                   f"(seq_length {seq_length})")
            if not ds.contiguous:
                raise RetraceError(f"{source.label}: {manifest['idx']['name']} does not lay its items end to end")


def _note_legacy_copy(prefix: Path, say) -> None:
    merged = Path(f"{prefix}.bin")
    if merged.is_file():
        say(f"{merged}: a merged copy made by an earlier retrace ({merged.stat().st_size / 1e9:.1f} GB) is no "
            "longer read (the shards are read in place); delete it to free the disk")


def _write(mpath: Path, manifest: dict) -> None:
    try:
        write_json(mpath, manifest)
    except OSError as exc:
        raise RetraceError(f"{mpath}: cannot write the shard manifest ({exc}); the previous one, if any, "
                           "is unchanged") from exc
