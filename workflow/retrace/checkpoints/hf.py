"""Hugging Face-format weights: ``model.safetensors``, ``pytorch_model.bin``, and their sharded forms.

Both readers map keys to canonical names (``lm_head.weight`` → ``embed_out.weight``), drop buffers by
suffix, and read one tensor at a time: safetensors through ``safe_open`` (header only until a tensor
is asked for), pickles through ``torch.load(weights_only=True, mmap=True)`` (the storages stay on disk
until touched).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.base import IndexedReader, ParamReader
from retrace.checkpoints.names import (  # noqa: F401 - the file names are re-exported here
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TORCH_BIN,
    TORCH_BIN_INDEX,
    canonical_hf_name,
    canonical_order,
)
from retrace.checkpoints.torchload import safe_torch_load_mapped
from retrace.errors import RetraceError


def read_index(path: Path) -> dict[str, Path]:
    """A ``*.index.json``'s ``weight_map`` as key → shard path (shards next to the index)."""
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RetraceError(f"{path}: not a readable shard index: {exc}") from exc
    out = {}
    for key, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise RetraceError(f"{path}: shard name {shard!r} for {key} leaves the checkpoint directory")
        out[key] = path.parent / shard
    return out


def _shards_of(index: Mapping[str, Path], index_path: Path) -> list[Path]:
    shards = sorted(set(index.values()))
    for shard in shards:
        if not shard.is_file():
            raise RetraceError(f"{index_path}: shard {shard.name} is missing (expected at {shard})")
    return shards


class _KeyMap:
    """canonical name → (file, original key), refusing two keys with one canonical name."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[Path, str]] = {}

    def add(self, path: Path, key: str) -> None:
        name = canonical_hf_name(key)
        if name is None:
            return
        if name in self.where:
            other_path, other_key = self.where[name]
            raise RetraceError(
                f"{path}: {key} and {other_key} (in {other_path.name}) are both parameter {name}"
            )
        self.where[name] = (path, key)


class SafetensorsReader(ParamReader):
    """One ``.safetensors`` file, or the shards listed by a ``model.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        path = Path(path)
        self.source = str(path)
        if path.name.endswith(".index.json"):
            index = read_index(path)
            files = _shards_of(index, path)
        else:
            index, files = None, [path]
        self._handles: dict[Path, Any] = {}
        keys = _KeyMap()
        try:
            for f in files:
                if not f.is_file():
                    raise RetraceError(f"{f}: no such checkpoint file")
                try:
                    handle = safe_open(str(f), framework="pt", device="cpu")
                    self._handles[f] = handle
                    file_keys = list(handle.keys())
                except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
                    raise RetraceError(
                        f"{f}: not a readable safetensors file (truncated or corrupt?): {exc}"
                    ) from exc
                for key in file_keys:
                    if index is not None and key in index and index[key] != f:
                        raise RetraceError(
                            f"{path}: {key} is in {f.name} but the index puts it in {index[key].name}"
                        )
                    keys.add(f, key)
            if index is not None:
                found = {k for f in files for k in self._handles[f].keys()}
                missing = sorted(set(index) - found)
                if missing:
                    raise RetraceError(
                        f"{path}: {missing[0]} is listed in {index[missing[0]].name} but is not in that file"
                        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                    )
        except BaseException:
            self.close()
            raise
        self._where = keys.where
        self._names = canonical_order(self._where)

    def names(self) -> list[str]:
        return list(self._names)

    def _lookup(self, name: str) -> tuple[Path, str]:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{self.source}: no parameter {name}") from None

    def location(self, name: str) -> str:
        return str(self._where[name][0]) if name in self._where else self.source

    def shape(self, name: str) -> tuple[int, ...]:
        path, key = self._lookup(name)
        try:
            return tuple(self._handles[path].get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001
            raise RetraceError(f"{path}: cannot read the shape of {key}: {exc}") from exc

    def dtype(self, name: str) -> torch.dtype:
        from retrace.checkpoints.save import SAFETENSORS_DTYPES

        path, key = self._lookup(name)
        code = self._handles[path].get_slice(key).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            return self.get(name).dtype
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        path, key = self._lookup(name)
        try:
            return self._handles[path].get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise RetraceError(f"{path}: cannot read tensor {key} (truncated or corrupt?): {exc}") from exc

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                try:
                    exit_(None, None, None)
                except Exception:  # noqa: BLE001 - already closed
                    pass
        self._handles = {}


def _as_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise RetraceError(f"{path}: expected a state dict (name → tensor), found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise RetraceError(
                f"{path}: not a flat state dict: {key!r} holds {type(value).__name__}, not a tensor"
            )
    return obj


class TorchBinReader(IndexedReader):
    """``pytorch_model.bin`` (or any flat state-dict pickle), or the shards of a ``*.bin.index.json``.

    Loaded only with ``torch.load(weights_only=True, mmap=True)``: memory-mapped shards stay open
    (their storages are paged in when a tensor is read); a legacy non-zip pickle cannot be mapped, so
    only one such shard is held in memory at a time.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.source = str(path)
        if path.name.endswith(".index.json"):
            index = read_index(path)
            self._files = _shards_of(index, path)
        else:
            index, self._files = None, [path]
        self._mapped: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._last: tuple[Path, Mapping[str, torch.Tensor]] | None = None
        keys = _KeyMap()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        found: set[str] = set()
        for f in self._files:
            sd = self._load(f)
            for key, tensor in sd.items():
                if index is not None and key in index and index[key] != f:
                    raise RetraceError(
                        f"{path}: {key} is in {f.name} but the index puts it in {index[key].name}"
                    )
                found.add(key)
                keys.add(f, key)
                name = canonical_hf_name(key)
                if name is not None:
                    self._shapes[name] = tuple(tensor.shape)
                    self._dtypes[name] = tensor.dtype
        if index is not None:
            missing = sorted(set(index) - found)
            if missing:
                raise RetraceError(
                    f"{path}: {missing[0]} is listed in {index[missing[0]].name} but is not in that file"
                    + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                )
        self._where = keys.where
        self._names = canonical_order(self._where)

    def _load(self, f: Path) -> Mapping[str, torch.Tensor]:
        if f in self._mapped:
            return self._mapped[f]
        if self._last is not None and self._last[0] == f:
            return self._last[1]
        obj, mapped = safe_torch_load_mapped(f, mmap=True)
        sd = _as_state_dict(obj, f)
        if mapped:
            self._mapped[f] = sd
        else:
            self._last = (f, sd)
        return sd

    def names(self) -> list[str]:
        return list(self._names)

    def location(self, name: str) -> str:
        return str(self._where[name][0]) if name in self._where else self.source

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.source}: no parameter {name}")
        path, key = self._where[name]
        return self._load(path)[key]

    def close(self) -> None:
        self._mapped = {}
        self._last = None
