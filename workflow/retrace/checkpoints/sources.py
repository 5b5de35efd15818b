"""Open any checkpoint source as a ``ParamReader``: a file, a directory, or ``org/repo@revision``.

Accepted sources (``parse_source`` decides which):

* a local file: ``*.safetensors``, ``pytorch_model.bin`` or any flat state-dict pickle (``.bin``/``.pt``),
  a ``*.index.json`` of shards, or a GPT-NeoX ``mp_rank_XX_model_states.pt`` / layer file (opens its
  directory);
* a local directory: Hugging Face format (``model.safetensors``, ``model.safetensors.index.json``,
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json``, in that order of preference, or a single
  ``*.safetensors``), or GPT-NeoX native (``global_stepN/`` or a save directory with ``latest``);
* a Hub spec ``org/repo@revision`` (``hf://`` prefix optional; no ``@`` means ``main``), fetched through
  huggingface_hub and verified (see ``hub``).

A string shaped like ``org/repo[@revision]`` is a Hub spec, never a local path: a folder that happens to
carry that name (``EleutherAI/pythia-70m-deduped@step1000``, or one a download left behind) must not
silently stand in for the published checkpoint. If such a path exists, the spec is refused as
ambiguous; write a local path unambiguously (``./org/repo``, an absolute path, or pass a ``Path``).
Strings that cannot be Hub specs (``model.safetensors``, ``runs/a/b``, ``./x``, ``/x``) are local.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.base import ParamReader
from retrace.checkpoints.hf import (
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TORCH_BIN,
    TORCH_BIN_INDEX,
    SafetensorsReader,
    TorchBinReader,
)
from retrace.checkpoints.hub import resolve_hub
from retrace.checkpoints.names import EMBED
from retrace.checkpoints.neox import (
    LAYER_FILE_RE,
    MP_FILE_RE,
    NeoXReader,
    hf_config_from_neox,
    is_neox_dir,
    load_neox_yaml,
    resolve_neox_dir,
)
from retrace.errors import RetraceError

HUB_PREFIX = "hf://"
_HUB_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?$"
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: safetensors metadata key under which ``retrace fetch-reference`` keeps the source's config.json.
CONFIG_METADATA_KEY = "retrace.config"


@dataclasses.dataclass(frozen=True)
class Source:
    """A parsed checkpoint source: ``kind`` is ``"local"`` (``path``) or ``"hub"`` (``repo_id``, ``revision``)."""

    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    pinned: bool = False  # hub: the spec named a revision (org/repo@rev)
    forced: bool = False  # hub: the spec said hf://

    @property
    def explicit(self) -> bool:
        """Clearly meant for the Hub, not a mistyped two-part local path."""
        return self.pinned or self.forced

    def __str__(self) -> str:
        return str(self.path) if self.kind == "local" else f"{self.repo_id}@{self.revision}"


def parse_source(spec: str | os.PathLike) -> Source:
    """``Source`` for a path or ``org/repo[@revision]`` (``hf://org/repo@rev`` forces the Hub).

    A ``Path`` (any ``os.PathLike``) is always local. A string that matches ``org/repo[@revision]`` is
    always a Hub spec; if a local file or directory of that name exists too, it is refused as ambiguous
    rather than guessed.

    Raises:
        RetraceError: empty or non-string spec, a malformed ``hf://`` spec, or an ambiguous one.
    """
    if isinstance(spec, os.PathLike):
        return Source("local", path=Path(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise RetraceError(f"checkpoint source must be a path or org/repo@revision, got {spec!r}")
    spec = spec.strip()
    forced = spec.startswith(HUB_PREFIX)
    if forced:
        spec = spec[len(HUB_PREFIX) :]
    m = _HUB_RE.fullmatch(spec)
    if m:
        if not forced and os.path.lexists(spec):
            raise RetraceError(
                f"{spec!r} is ambiguous: it is a Hub spec (org/repo[@revision]) and a local "
                f"{'directory' if os.path.isdir(spec) else 'path'} of that name exists. Write "
                f"'./{spec}' (or an absolute path) for the local one, or '{HUB_PREFIX}{spec}' for the Hub"
            )
        return Source(
            "hub",
            repo_id=m.group("repo"),
            revision=m.group("rev") or "main",
            pinned=m.group("rev") is not None,
            forced=forced,
        )
    if forced:
        raise RetraceError(f"{HUB_PREFIX}{spec}: not a Hub spec org/repo[@revision]")
    return Source("local", path=Path(spec))


def start_source(reference: str | os.PathLike, start_step: int) -> str:
    """The checkpoint a run starting at ``start_step`` of ``reference`` opens.

    A Hub repo without a revision gets ``@step{start_step}`` (the train rule's ``org/repo``); a Hub spec
    with a revision, and a local path, are returned as given. A local folder named like the repo does
    not count (``parse_source`` refuses it as ambiguous): the start weights of a Hub reference always
    come from the Hub (or its cache), verified.

    Raises:
        RetraceError: as ``parse_source``; a negative step.
    """
    if int(start_step) < 0:
        raise RetraceError(f"start step must be >= 0, got {start_step}")
    src = parse_source(reference)
    if src.kind == "local" or src.pinned:
        return str(reference).strip() if not isinstance(reference, os.PathLike) else os.fspath(reference)
    return f"{HUB_PREFIX if src.forced else ''}{src.repo_id}@step{int(start_step)}"


def _with_revision(src: Source, revision: str | None) -> Source:
    if revision is None:
        return src
    if src.kind != "hub":
        raise RetraceError(f"{src}: a revision ({revision!r}) only applies to a Hub repo")
    if src.pinned and src.revision != revision:
        raise RetraceError(f"{src}: conflicting revisions {src.revision!r} and {revision!r}")
    return dataclasses.replace(src, revision=revision, pinned=True)


def open_params(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    verify: str | bool | None = None,
) -> ParamReader:
    """A ``ParamReader`` over ``source`` (see the module docstring). Close it (or use ``with``) when done.

    ``verify`` only applies to Hub sources (``"require"`` | ``"warn"`` | ``"off"``, see
    ``retrace.checkpoints.trust``); the default requires every file to match the Hub's record, online or
    against the cache's metadata offline. The reader's ``hub`` attribute is the ``HubSnapshot``.
    """
    src = _with_revision(parse_source(source), revision)
    if src.kind == "hub":
        snap = _resolve(src, cache_dir, verify)
        reader = open_local(snap.weights)
        reader.source = snap.spec
        reader.hub = snap  # type: ignore[attr-defined]
        return reader
    return open_local(src.path)


def _resolve(src: Source, cache_dir, verify, *, config_only: bool = False):
    try:
        return resolve_hub(
            src.repo_id, src.revision, cache_dir=cache_dir, verify=verify, config_only=config_only
        )
    except RetraceError as exc:
        if not src.explicit:
            raise RetraceError(
                f"{exc} (a local checkpoint is written ./{src.repo_id} or as an absolute path)"
            ) from exc
        raise


def open_local(path: str | os.PathLike) -> ParamReader:
    """A reader for a local file or directory, format detected from the names in it."""
    path = Path(path)
    if path.is_dir():
        return _open_dir(path)
    if path.is_file():
        return _open_file(path)
    raise RetraceError(f"{path}: no such file or directory")


def _open_file(path: Path) -> ParamReader:
    name = path.name
    if name.endswith(".index.json"):
        return SafetensorsReader(path) if "safetensors" in name else TorchBinReader(path)
    if name.endswith(".safetensors"):
        return SafetensorsReader(path)
    if MP_FILE_RE.fullmatch(name) or LAYER_FILE_RE.fullmatch(name):
        return NeoXReader(path.parent)
    if name.endswith(_TORCH_SUFFIXES):
        return TorchBinReader(path)
    raise RetraceError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt or .index.json)")


def _weights_file(path: Path) -> Path | None:
    for marker in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX):
        if (path / marker).is_file():
            return path / marker
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    return None


def _open_dir(path: Path) -> ParamReader:
    weights = _weights_file(path)
    if weights is not None:
        return _open_file(weights)
    if is_neox_dir(path):
        return NeoXReader(path)
    raise RetraceError(
        f"{path}: no checkpoint found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, "
        f"{TORCH_BIN_INDEX}, a single *.safetensors, or GPT-NeoX global_stepN files)"
    )


def load_params(source: str | os.PathLike, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Every parameter of ``source`` in memory (name → tensor), canonical names, buffers dropped."""
    with open_params(source, **kwargs) as reader:
        return {name: reader.get(name) for name in reader.names()}


def open_config(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    verify: str | bool | None = None,
) -> dict[str, Any]:
    """The Hugging Face ``config.json`` next to the weights of ``source``, as a dict.

    A Hub revision with a config.json fetches and verifies only that file. A GPT-NeoX directory without
    config.json gets one built from its ``configs/*.yml`` (as GPT-NeoX v1.0's converter builds it; the
    padded vocabulary is read from the embedding's shape). A single safetensors file without a
    config.json beside it uses the one ``retrace fetch-reference`` stored in its metadata.
    """
    src = _with_revision(parse_source(source), revision)
    if src.kind == "hub":
        snap = _resolve(src, cache_dir, verify, config_only=True)
        if (snap.folder / "config.json").is_file():
            return _read_json(snap.folder / "config.json")
        snap = _resolve(src, cache_dir, verify)
        return _local_config(snap.weights)
    return _local_config(src.path)


def _local_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RetraceError(f"{path}: no such file or directory")
    if path.is_file() and (MP_FILE_RE.fullmatch(path.name) or LAYER_FILE_RE.fullmatch(path.name)):
        path = path.parent
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():
        return _read_json(folder / "config.json")
    if path.is_file() and path.name.endswith(".safetensors"):
        embedded = _embedded_config(path)
        if embedded is not None:
            return embedded
    if path.is_dir() and _weights_file(path) is None and is_neox_dir(path):
        step_dir = resolve_neox_dir(path)
        if (step_dir / "config.json").is_file():
            return _read_json(step_dir / "config.json")
        neox = load_neox_yaml(step_dir)
        with NeoXReader(step_dir) as reader:
            vocab = reader.shape(EMBED)[0]
        return hf_config_from_neox(neox, vocab)
    raise RetraceError(f"{folder}: no config.json next to the weights")


def _embedded_config(path: Path) -> dict[str, Any] | None:
    """The config.json a canonical reference file carries in its metadata, or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            text = (fh.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise RetraceError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RetraceError(f"{path}: metadata {CONFIG_METADATA_KEY} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RetraceError(f"{path}: metadata {CONFIG_METADATA_KEY} is not a JSON object")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RetraceError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise RetraceError(f"{path}: expected a JSON object")
    return data


def check_fits(reader: ParamReader, cfg: Any, *, allow_extra: bool = False) -> None:
    """Every parameter ``cfg`` (a ``ModelConfig``, or a mapping name → shape) expects is in ``reader``
    with that shape, and nothing else is (unless ``allow_extra``); else one ``RetraceError`` naming
    the file, each tensor, and the expected vs found shapes.
    """
    expected: Mapping[str, Any] = cfg.param_shapes() if hasattr(cfg, "param_shapes") else cfg
    found = reader.names()
    found_set = set(found)
    problems: list[str] = []
    for name, shape in expected.items():
        shape = tuple(int(d) for d in shape)
        if name not in found_set:
            problems.append(
                f"{reader.location(name)}: tensor {name} is missing (expected shape {list(shape)})"
            )
            continue
        got = tuple(reader.shape(name))
        if got != shape:
            problems.append(
                f"{reader.location(name)}: tensor {name} has shape {list(got)}, expected {list(shape)}"
            )
    if not allow_extra:
        for name in found:
            if name not in expected:
                problems.append(
                    f"{reader.location(name)}: unexpected tensor {name} {list(reader.shape(name))}"
                )
    if problems:
        what = _describe(cfg)
        head = f"{reader.source} does not fit {what}" if len(problems) > 1 else ""
        shown = problems[:12]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        if head:
            raise RetraceError(head + ":\n  " + "\n  ".join(shown) + more)
        raise RetraceError(f"{problems[0]} (for {what})")


def _describe(cfg: Any) -> str:
    if hasattr(cfg, "n_layers") and hasattr(cfg, "hidden"):
        return (
            f"the model config (layers {cfg.n_layers}, hidden {cfg.hidden}, heads "
            f"{getattr(cfg, 'heads', '?')}, vocab {getattr(cfg, 'vocab', '?')})"
        )
    return "the expected parameter shapes"
