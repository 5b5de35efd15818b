"""Stage one published GPT-NeoX training checkpoint (weights + ZeRO-1 optimizer state) for a segment's start.

A segment (``models.<name>.segments``) resumes a NeoX-native repo at step N with the exact fp32 master
weights, Adam moments and loss scale. The ranks never reach the Hub, so the ``fetch_training_state``
local rule resolves ``org/repo@step{N}`` once (``resolve_hub(include_optimizer=True)``: every file
checked against its recorded hash) and lays it out as a GPT-NeoX save directory::

    OUT/latest                "global_step{N}"
    OUT/global_step{N}/...    the layer files, mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt,
                              configs/ (and the repo's config.json where it has one)
    OUT/source.json           what was staged: source, commit, verified against what, file hashes

Files are hard links to the cache's blobs where the file system allows (a 410m step's ZeRO state is
~5 GB), else copies. The directory is built beside OUT and renamed into place, so OUT is complete or
absent. A source without optimizer state (no ZeRO files, and for the stage-0 sizes 14m/31m no
``FP16_Optimizer`` state in ``mp_rank_00_model_states.pt``) is refused: a segment that silently started Adam from zero would
answer a different question.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from retrace.errors import RetraceError


def _place(src: Path, dest: Path) -> None:
    real = src.resolve()
    try:
        os.link(real, dest)
    except OSError:
        shutil.copyfile(real, dest)


def _has_stage0_state(step_dir: Path) -> bool:
    """ZeRO stage 0 (14m/31m): FP16_Optimizer's state is the client state's ``optimizer``."""
    from retrace.checkpoints.neox import load_client_state

    try:
        opt = load_client_state(step_dir, 0).get("optimizer")
    except RetraceError:
        return False
    return isinstance(opt, dict) and "fp32_groups_flat" in opt


def stage_training_state(source: str, out: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                         verify: str | None = None) -> Path:
    """Stage ``source`` (``org/repo@step{N}``, or a local GPT-NeoX directory) at ``out``; returns ``out``."""
    from retrace.checkpoints.hub import resolve_hub
    from retrace.checkpoints.neox import is_neox_dir, resolve_neox_dir, zero_optimizer_files
    from retrace.checkpoints.sources import parse_source
    from retrace.io import write_json

    src = parse_source(source)
    record: dict = {"source": str(source)}
    if src.kind == "hub":
        snap = resolve_hub(src.repo_id, src.revision, cache_dir=cache_dir, verify=verify, include_optimizer=True)
        folder = snap.weights
        if not folder.is_dir():
            raise RetraceError(f"{source}: a Hugging Face checkpoint ({folder.name}), not a GPT-NeoX native one; "
                               "it holds no optimizer state to start a segment from")
        record.update({"commit": snap.commit, "verified": snap.verified, "verified_against": snap.verified_against,
                       "hashes": dict(snap.hashes)})
    else:
        folder = Path(src.path)
        if not is_neox_dir(folder):
            raise RetraceError(f"{source}: not a GPT-NeoX checkpoint directory")
        record.update({"verified": False})
    step_dir = resolve_neox_dir(folder)
    if not zero_optimizer_files(step_dir) and not _has_stage0_state(step_dir):
        raise RetraceError(f"{source}: {step_dir.name} holds no zero_pp_rank_*_optim_states.pt and no "
                           "FP16_Optimizer state in mp_rank_00_model_states.pt; a segment needs the published "
                           "optimizer state (set segments.optimizer_state: false to start from the weights "
                           "with a fresh Adam)")
    m = re.fullmatch(r"global_step(\d+)", step_dir.name)
    want = re.fullmatch(r"step(\d+)", src.revision or "") if src.kind == "hub" else None
    if m and want and m.group(1) != want.group(1):
        raise RetraceError(f"{source}: its checkpoint directory is {step_dir.name}, not global_step{want.group(1)}")

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / step_dir.name).mkdir(parents=True)
    for f in sorted(step_dir.rglob("*")):
        if f.is_file():
            dest = tmp / step_dir.name / f.relative_to(step_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _place(f, dest)
    top_config = folder / "config.json"
    if top_config.is_file() and not (tmp / step_dir.name / "config.json").exists():
        _place(top_config, tmp / step_dir.name / "config.json")
    write_json(tmp / "source.json", record)
    (tmp / "latest").write_text(step_dir.name, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_source_record(staged: str | os.PathLike) -> dict:
    """``source.json`` of a staged training state."""
    return json.loads((Path(staged) / "source.json").read_text(encoding="utf-8"))
