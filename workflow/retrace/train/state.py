"""Resume states: OUT/state/step{N}/ with safetensors for tensors and one JSON for everything else.

Layout of one state::

    state/step{N}/tensors.safetensors        (or rank{r}.safetensors, one per rank, for sharded engines)
    state/step{N}/state.json                 scalars, RNG, data position, and the sha256 of every
                                             tensor file; written LAST, so its presence marks a
                                             complete state

Nothing is pickled. Every file is written atomically (retrace.io), streamed tensor by tensor and piece
by piece (retrace.train.tensorfile: no host copy of the whole state), its sha256 computed from the
bytes as they are written. Each rank writes its own file (rank{r}.safetensors) where the optimizer
state is partitioned; a replicated state (one rank, or the stage-0 sizes 14m/31m, whose state is under
0.5 GB) is written by the main rank alone. Only the newest ``keep`` complete states are kept. Loading
verifies the hashes; a corrupt or incomplete newest state falls back to the previous one with a
warning.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from retrace.io import sha256_file, write_json

STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step(\d+)$")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 metadata: dict[str, str] | None = None) -> str:
    """Write tensors (any device) atomically as safetensors, streamed; returns the file's sha256."""
    from retrace.train.tensorfile import write_tensors

    return write_tensors(path, tensors, metadata=metadata)


def state_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step{step}"


def write_state_json(root: Path, step: int, meta: dict[str, Any], files: dict[str, str], keep: int = 2) -> Path:
    """Mark state ``step`` complete (``files``: name → sha256 of tensor files already written there)."""
    d = state_dir(root, step)
    write_json(d / STATE_JSON, {"step": step, "files": files, **meta})
    prune(root, keep)
    return d


def complete_steps(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / STATE_JSON).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete states; drop older ones and incomplete leftovers below them."""
    root = Path(root)
    steps = complete_steps(root)
    if len(steps) <= keep:
        return
    cutoff = steps[-keep]
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and int(m.group(1)) < cutoff:
            shutil.rmtree(p, ignore_errors=True)


def verify_state(d: Path, rank_file: str | None = None) -> dict:
    """Check one state without loading it: its JSON parses and its tensor files (only ``rank_file``, if
    given) have their recorded sha256. Returns the JSON; raises on anything missing or wrong."""
    meta = json.loads((d / STATE_JSON).read_text(encoding="utf-8"))
    names = [n for n in meta["files"] if rank_file is None or n == rank_file]
    if rank_file is not None and rank_file not in meta["files"]:
        raise ValueError(f"{d}: holds no {rank_file}")
    for name in names:
        f = d / name
        got, sha = sha256_file(f), meta["files"][name]
        if got != sha:
            raise ValueError(f"{f}: sha256 {got[:12]}… does not match the recorded {sha[:12]}…")
    return meta


def read_state(d: Path, rank_file: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify one state. Raises on anything missing, unparsable or with a wrong hash."""
    meta = verify_state(d, rank_file)
    tensors: dict[str, torch.Tensor] = {}
    for name in meta["files"]:
        if rank_file is None or name == rank_file:
            tensors.update(load_file(str(d / name)))
    return meta, tensors


def load_latest(root: Path, rank_file: str | None = None,
                check: Callable[[dict], None] | None = None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest state that reads back intact, or None when there is none.

    ``check(meta)`` may raise to reject a state (e.g. written by a different layout).
    """
    for step in reversed(complete_steps(root)):
        d = state_dir(root, step)
        try:
            meta, tensors = read_state(d, rank_file)
            if check is not None:
                check(meta)
            return meta, tensors
        except Exception as exc:  # noqa: BLE001 - any damage means: try the previous state
            warnings.warn(f"resume state {d} is unusable ({exc}); falling back to an older one",
                          RuntimeWarning, stacklevel=2)
    return None


# ---- RNG ------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()  # noqa: NPY002 - saving the legacy global RNG is the point
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random

    import numpy as np

    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "rng.numpy.keys" in tensors and meta.get("numpy"):
        name, pos, has_gauss, cached = meta["numpy"]
        keys = tensors["rng.numpy.keys"].numpy().astype(np.uint32)
        np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    if meta.get("python"):
        v, st, g = meta["python"]
        random.setstate((v, tuple(st), g))
