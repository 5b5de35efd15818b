"""Re-anchored segments: at every published step a run reaches, its weights become the published ones.

A free-running reproduction compounds: a deviation at step 100 is still there, grown, at step 1000.
Re-anchoring measures each segment on its own: after the checkpoint of a published step is written
(so the comparison at that step sees the segment that ended there), the run's weights are replaced
with the published weights of that step, and training goes on to the next published step. The run
keeps its own optimizer state (Adam moments and step counter), loss scale, learning-rate position and
data position: only the weights are the published run's.

What "the published weights" fix. A checkpoint holds fp16 parameters; the fp32 master that the
optimizer updates is not published. Each master element whose fp16 rounding already equals the
published value is kept (the published checkpoint says nothing against it); every other element
becomes the published value, upcast. The fp16 model weights then equal the published checkpoint
exactly. So a run that is bit-identical to the published one (same data, same layout, same arithmetic)
is left untouched, and stays bit-identical at every step; any other run restarts each segment from
the published point.

The state saved after a published step holds the re-anchored weights, so a resumed run continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from retrace.errors import RetraceError
from retrace.rundir import checkpoint_name


class Reanchor:
    """The published checkpoints of one run (``<dir>/step{N}.safetensors``), applied at each saved step."""

    def __init__(self, directory: str | Path, steps: list[int]):
        self.directory = Path(directory)
        self.steps = sorted(set(steps))
        missing = [s for s in self.steps if not (self.directory / checkpoint_name(s)).is_file()]
        if missing:
            raise RetraceError(
                f"--reanchor {self.directory}: no published checkpoint for step(s) "
                f"{', '.join(map(str, missing))} (expected {checkpoint_name(missing[0])})"
            )
        self.applied: list[dict] = []

    def published(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file  # safetensors: no pickle

        return load_file(str(self.directory / checkpoint_name(step)))

    def __call__(self, engine, step: int) -> dict | None:
        """Re-anchor ``engine`` at ``step`` if it is a published step; a summary of what changed."""
        if step not in self.steps:
            return None
        groups = getattr(engine, "groups", None)
        if groups is None:
            raise RetraceError(f"--reanchor: the {getattr(engine, 'name', '?')} engine does not support it (builtin only)")
        changed = replace_weights(engine, self.published(step))
        row = {"step": step, "changed": changed}
        self.applied.append(row)
        return row


@torch.no_grad()
def replace_weights(engine, published: dict[str, torch.Tensor]) -> int:
    """Set the engine's master and model weights to ``published`` (see the module doc); the number of
    master elements that changed on this rank."""
    from retrace.train.zero1 import all_gather_weights

    changed = 0
    for g in engine.groups:
        for name, start, at, n in g.shard_pieces():
            if name not in published:
                raise RetraceError(f"--reanchor: the published checkpoint has no tensor {name!r}")
            pub = published[name].reshape(-1)[start : start + n].to(g.master.device)
            master = g.master[at : at + n]
            keep = master.to(pub.dtype) == pub
            changed += int((~keep).sum())
            master.copy_(torch.where(keep, master, pub.to(master.dtype)))
        if g.master.data_ptr() != g.model[g.lo : g.hi].data_ptr():
            g.model[g.lo : g.hi].copy_(g.master)
    all_gather_weights(engine.groups, engine.partition, engine.group)
    return changed
