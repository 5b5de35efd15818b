"""ZeRO-1 for the builtin engine: the fp32 master and Adam's moments partitioned across data-parallel ranks.

What GPT-NeoX v1.0 ran for Pythia (pp = 1, DeeperSpeed ``eb7f5cff``; reference/pythia-neox.md §7 items 4-5):
the pipeline engine all-reduces the whole fp16 gradient (sum) and multiplies it by 1/dp
(``runtime/pipe/engine.py`` ``_exec_reduce_grads`` ~234-243 → ``runtime/engine.py``
``buffered_allreduce_fallback``/``allreduce_bucket`` ~1323-1347, post-scaled since ``prescale_gradients``
is false), so every rank holds the full averaged gradient; ``stage1.py`` ``step`` (~690-760) computes
the overflow check and the clip norm from it on every rank, updates its own partition of the fp32 master
and moments, copies it to its fp16 partition and all-gathers the fp16 weights. ``reduce_scatter`` is in
the config, but with pp = 1 the all-reduce had already happened and stage1.py's own reduce-scatter path
is not taken.

The partition here: each group's flat buffer is padded to ``dp·s`` (``s = ⌈numel/dp⌉``) and rank r owns
``[r·s, (r+1)·s)`` — DeeperSpeed's layout when a group fits in one comm interval
(``max_elements_per_comm`` = 5e8 elements for Pythia; larger groups are cut into intervals there, which
changes where a rank's elements are, not their values: Adam is elementwise). Results are bitwise those of
the replicated engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from retrace.train.optim import FlatGroup


@dataclass(frozen=True)
class Partition:
    """Which optimizer shard this process holds."""

    world_size: int
    rank: int

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def to_meta(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank}


def all_gather_weights(groups: list[FlatGroup], partition: Partition, group=None) -> None:
    """Every rank's updated shard of the compute-dtype weights into every rank's full flat buffers
    (stage1.py ~740-755: ``dist.all_gather`` of the fp16 sub-partitions)."""
    if not partition.sharded:
        return
    for g in groups:
        if g.padded == 0:
            continue
        s = g.hi - g.lo
        chunks = list(g.model.split(s))
        dist.all_gather(chunks, chunks[partition.rank].clone(), group=group)


def shard_bytes(groups: list[FlatGroup]) -> dict[str, int]:
    """Bytes of the optimizer tensors this rank allocated (fp32 master only where it is a separate copy)."""
    master = sum(g.master.numel() * g.master.element_size() for g in groups
                 if g.master.data_ptr() != g.model.data_ptr() + g.lo * g.model.element_size())
    moments = sum(g.exp_avg.numel() * 4 + g.exp_avg_sq.numel() * 4 for g in groups)
    return {"master": master, "moments": moments, "total": master + moments}


def gather_shards(tensor: torch.Tensor, partition: Partition, numel: int, group=None) -> torch.Tensor:
    """The whole-group tensor from every rank's shard (for tests and exports; gloo/nccl all_gather)."""
    if not partition.sharded:
        return tensor[:numel].clone()
    parts = [torch.empty_like(tensor) for _ in range(partition.world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)[:numel]
