"""What a study will cost before it runs: downloads, disk, per-GPU memory and GPU-hours (``retrace plan``).

Every figure is derived from the study and the model's numbers, never measured here:

* downloads — each Pile variant's shards the cells read (``retrace.data.variants.plan_variant_fetch``,
  which knows the published shard layout), and each published checkpoint once per (repo, step) at 2 bytes
  per parameter (the fp16 files on the Hub); local references and synthetic data cost nothing;
* disk — the same data, the fetched references (canonical fp16 copies), every cell's checkpoints (fp16,
  one per step on the Pythia schedule), its resume states (``keep_states`` × 12 bytes per parameter: the
  fp32 master and Adam's two moments, summed over the ZeRO-1 shards) and its similarity tables;
* memory — ``retrace.memory.cell_memory`` per cell (the builtin engine's model states, activations,
  workspace), checked against the GPU's memory in ``GPUS``;
* time — training FLOPs per token 6·N + 12·L·h·T (Kaplan et al. 2020 / Chowdhery et al. 2022 App. B),
  ×4/3 with activation recomputation, divided by the GPU's dense fp16 peak (``GPUS``: vendor datasheets)
  times an *assumed* model FLOPs utilisation (``ASSUMED_MFU``; retrace has not measured one on a GPU yet:
  benchmarks/gpu_check.sh measures it, and its ``mfu`` figures replace the assumption when passed with
  ``--throughput``). CPU cells are costed from the rate measured on this project's 2-core machines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrace.errors import RetraceError
from retrace.pythia.sizes import ModelConfig, pythia_config

if TYPE_CHECKING:
    from retrace.grid import Cell, Model, Study

GB = 10**9
GIB = 1 << 30
#: GPU model → (memory bytes, dense fp16/bf16 tensor peak FLOP/s, source).
GPUS: dict[str, tuple[int, float, str]] = {
    "a40": (48 * GIB, 149.7e12, "NVIDIA A40 datasheet: 48 GB, FP16 tensor 149.7 TFLOPS dense"),
    "a100": (80 * GIB, 312e12, "NVIDIA A100 datasheet: 80 GB (40 GB part: a100_40gb), FP16 tensor 312 TFLOPS dense"),
    "a100_40gb": (40 * GIB, 312e12, "NVIDIA A100 datasheet: 40 GB, FP16 tensor 312 TFLOPS dense"),
    "a100_80gb": (80 * GIB, 312e12, "NVIDIA A100 datasheet: 80 GB, FP16 tensor 312 TFLOPS dense"),
    "h100": (80 * GIB, 989e12, "NVIDIA H100 SXM datasheet: 80 GB, FP16 tensor 989 TFLOPS dense"),
    "h200": (141 * GB, 989e12, "NVIDIA H200 datasheet: 141 GB, FP16 tensor 989 TFLOPS dense"),
    "v100": (32 * GIB, 125e12, "NVIDIA V100 datasheet: 32 GB, tensor 125 TFLOPS"),
}
#: Model FLOPs utilisation assumed where none was measured (GPT-NeoX reports ~40-50% on A100s).
ASSUMED_MFU = 0.4
#: FLOP/s of one CPU core in fp32, and the slowdown of fp16/bf16 on the CPU: measured here with
#: benchmarks/train_step.py (70m shape: ~0.2 TFLOP/s on 2 threads; fp16 ~8× slower, reference
#: torch-deepspeed-cpu.md and benchmarks/RESULTS.md).
CPU_CORE_FLOPS = 1.0e11
CPU_HALF_SLOWDOWN = 8.0
#: Bytes of one similarity row per tensor and step (a Parquet row of 15 columns, uncompressed bound).
TENSOR_ROW_BYTES = 200


@dataclass
class CellPlan:
    cell: str
    params: int
    checkpoints: int  # how many it saves
    checkpoint_bytes: int
    state_bytes: int
    table_bytes: int
    memory_per_gpu: int | None  # None: a CPU cell
    gpu_memory: int | None
    fits: bool | None
    gpu_hours: float | None
    cpu_core_hours: float | None
    throughput_source: str


@dataclass
class StudyPlan:
    study: str
    data: list[dict[str, Any]] = field(default_factory=list)  # per variant: fetch/disk bytes
    references: list[dict[str, Any]] = field(default_factory=list)  # per repo: steps, fetch/disk bytes
    cells: list[CellPlan] = field(default_factory=list)

    @property
    def download_bytes(self) -> int:
        return sum(d["fetch_bytes"] for d in self.data) + sum(r["fetch_bytes"] for r in self.references)

    @property
    def disk_bytes(self) -> int:
        return (sum(d["disk_bytes"] for d in self.data) + sum(r["disk_bytes"] for r in self.references)
                + sum(c.checkpoint_bytes + c.state_bytes + c.table_bytes for c in self.cells))

    @property
    def gpu_hours(self) -> float:
        return sum(c.gpu_hours or 0.0 for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "data": self.data, "references": self.references,
                "cells": [asdict(c) for c in self.cells], "download_bytes": self.download_bytes,
                "disk_bytes": self.disk_bytes, "gpu_hours": self.gpu_hours}


def model_shape(model: Model) -> ModelConfig:
    """The network a model's cells train: its build shape, else its Pythia size's."""
    if model.build is not None:
        return ModelConfig(**dict(model.build.shape))
    if model.recipe is None:
        raise RetraceError(f"models.{model.name}: no Pythia size to plan with (set models.{model.name}.recipe)")
    return pythia_config(model.recipe)


def flops_per_token(shape: ModelConfig, seq_len: int, *, recompute: bool) -> float:
    """Training FLOPs per token: 6·N + 12·L·h·T, with one more forward (×4/3) under recomputation."""
    base = 6.0 * shape.n_params + 12.0 * shape.n_layers * shape.hidden * seq_len
    return base * (4.0 / 3.0 if recompute else 1.0)


def cell_plan(study: Study, cell: Cell, *, mfu: dict[str, float] | None = None) -> CellPlan:
    """The plan of one cell (see the module doc); ``mfu``: measured utilisation per GPU model."""
    from retrace.launch import train_spec
    from retrace.memory import cell_memory

    m = cell.model
    shape = model_shape(m)
    spec = train_spec(study, cell)
    recipe = m.recipe_values() if m.recipe else None
    seq = (recipe.seq_length if recipe else shape.seq_len)
    global_batch = m.global_batch
    recompute = bool(getattr(spec, "checkpoint_activations", False))
    n = shape.n_params
    steps = cell.checkpoint_steps()
    keep = getattr(spec, "keep_states", 2)
    tensors = len(shape.param_shapes())
    trained_tokens = (cell.steps - m.start_step) * global_batch * seq
    work = flops_per_token(shape, seq, recompute=recompute) * trained_tokens
    lay = cell.parallel
    if cell.on_gpu:
        gpu = study.cluster["gpu_models"].get(cell.gpu_type, cell.gpu_type) or cell.gpu_type
        memory_total, peak, source = GPUS.get(gpu, (None, None, f"unknown GPU {gpu!r}: no datasheet figures"))
        used = mfu.get(gpu) if mfu else None
        util, util_src = (used, "measured MFU") if used else (ASSUMED_MFU, f"assumed MFU {ASSUMED_MFU:.0%}")
        mem = cell_memory(model=shape, pdbs=lay.pdbs, seq_len=seq, dp=lay.gpus, precision=cell.precision,
                          zero1=recipe.zero_stage >= 1 if recipe else True, checkpoint_activations=recompute,
                          flash_attention=cell.attention == "flash").total
        hours = work / (peak * util) / 3600.0 if peak else None  # GPU-time: the work is split over the GPUs
        return CellPlan(cell.id, n, len(steps), len(steps) * 2 * n, keep * 12 * n, len(steps) * tensors * TENSOR_ROW_BYTES,
                        mem, memory_total, mem <= memory_total if memory_total else None, hours, None,
                        f"{source}; {util_src}")
    rate = CPU_CORE_FLOPS / (CPU_HALF_SLOWDOWN if cell.precision in ("fp16", "bf16") else 1.0)
    threads = lay.gpus * study.cluster["threads_per_rank"]
    return CellPlan(cell.id, n, len(steps), len(steps) * 2 * n, keep * 12 * n, len(steps) * tensors * TENSOR_ROW_BYTES,
                    None, None, None, None, work / rate / 3600.0,
                    f"CPU: {CPU_CORE_FLOPS / 1e9:.0f} GFLOP/s per core in fp32, {CPU_HALF_SLOWDOWN:g}× slower in "
                    f"fp16/bf16 (measured here); {threads} cores")


def study_plan(study: Study, *, mfu: dict[str, float] | None = None) -> StudyPlan:
    """Downloads, disk, memory and time of a whole study."""
    from retrace.data.variants import plan_variant_fetch
    from retrace.jobs import pile_needs
    from retrace.rebuilt import order_check_entries

    plan = StudyPlan(study.name)
    gates = [e["preshuffled"] for e in order_check_entries(study)]  # streams read only by an order check
    for name in dict.fromkeys([c.data.name for c in study.cells()] + gates):
        v = study.data[name]
        if v.source != "pile":
            plan.data.append({"variant": name, "source": v.source, "fetch_bytes": 0, "disk_bytes": 0, "exact": True})
            continue
        needs = pile_needs(study, name)
        if v.path is not None:
            plan.data.append({"variant": name, "source": f"path {v.path}", "fetch_bytes": 0, "disk_bytes": 0,
                              "exact": True})
            continue
        fp = plan_variant_fetch(v.corpus, v.format, max_items=needs["max_items"], first_item=needs["first_item"],
                                seq_length=needs["seq_length"] or 2048, shuffle_samples=v.shuffle_samples)
        plan.data.append({"variant": name, "source": f"{v.corpus} {v.format}", "fetch_bytes": fp.fetch_bytes,
                          "disk_bytes": fp.disk_bytes, "exact": fp.exact, "shards": len(fp.shards),
                          "legacy_fetch_bytes": fp.legacy_fetch_bytes, "legacy_disk_bytes": fp.legacy_disk_bytes})
    steps_by_repo: dict[str, set[int]] = {}
    models: dict[str, Model] = {}
    for c in study.cells():
        steps_by_repo.setdefault(c.model.reference, set()).update(c.checkpoint_steps())
        models.setdefault(c.model.reference, c.model)
    for repo, steps in steps_by_repo.items():
        m = models[repo]
        size = 2 * model_shape(m).n_params * len(steps)
        plan.references.append({"repo": repo, "steps": len(steps), "local": m.is_local,
                                "fetch_bytes": 0 if m.is_local else size, "disk_bytes": size})
    # segments' starts with the published optimizer state (fetch_training_state): fp16 weights plus the fp32
    # master and two Adam moments, 2 + 3·4 bytes per parameter (staged as hard links to the hub cache)
    starts: dict[str, set[int]] = {}
    for c in study.cells():
        if c.model.optimizer_state:
            starts.setdefault(c.model.reference, set()).add(c.model.start_step)
    for repo, steps in starts.items():
        m = models[repo]
        size = (2 + 3 * 4) * model_shape(m).n_params * len(steps)
        plan.references.append({"repo": repo, "steps": len(steps), "local": m.is_local, "what": "training states",
                                "fetch_bytes": 0 if m.is_local else size, "disk_bytes": size})
    plan.cells = [cell_plan(study, c, mfu=mfu) for c in study.cells()]
    return plan


def read_mfu(path: str | Path) -> dict[str, float]:
    """``{gpu model: mfu}`` from benchmarks/gpu_check.sh's figures file (its ``mfu`` entries).

    Raises:
        RetraceError: the file is missing or holds no MFU figure.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetraceError(f"{path}: cannot read throughput figures: {exc}") from None
    mfu = data.get("mfu") if isinstance(data, dict) else None
    if not isinstance(mfu, dict) or not mfu:
        raise RetraceError(f"{path}: no 'mfu' mapping (gpu model → utilisation) in it")
    return {str(k): float(v) for k, v in mfu.items()}


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def render(plan: StudyPlan, *, max_cells: int | None = None) -> str:
    """The plan as text: totals first, then data, references and one line per cell (the first
    ``max_cells``, then how many more)."""
    lines = [f"# plan of study {plan.study}: {len(plan.cells)} cells",
             f"downloads {_size(plan.download_bytes)}, disk {_size(plan.disk_bytes)}, "
             f"GPU-hours {plan.gpu_hours:,.1f}"]
    for d in plan.data:
        extra = ""
        if d.get("legacy_fetch_bytes") is not None:  # None: raw data has no merged-copy alternative
            extra = (f" ({d['shards']} shard(s); a full download and merge would be {_size(d['legacy_fetch_bytes'])}"
                     f" + {_size(d['legacy_disk_bytes'] - d['legacy_fetch_bytes'])})")
        bound = "" if d["exact"] else " at least"
        lines.append(f"data {d['variant']} [{d['source']}]: fetch{bound} {_size(d['fetch_bytes'])}, "
                     f"disk{bound} {_size(d['disk_bytes'])}{extra}")
    for r in plan.references:
        where = "local hub cache" if r["local"] else "Hub"
        what = f" {r['what']}" if r.get("what") else ""
        lines.append(f"reference {r['repo']}{what} ({where}): {r['steps']} step(s), fetch {_size(r['fetch_bytes'])}, "
                     f"disk {_size(r['disk_bytes'])}")
    shown = plan.cells if max_cells is None else plan.cells[:max_cells]
    for c in shown:
        disk = _size(c.checkpoint_bytes + c.state_bytes + c.table_bytes)
        if c.memory_per_gpu is not None:
            fit = "?" if c.fits is None else ("fits" if c.fits else "DOES NOT FIT")
            mem = f"{_gib(c.memory_per_gpu)}/GPU of {_gib(c.gpu_memory) if c.gpu_memory else '?'} ({fit})"
            time = f"{c.gpu_hours:,.1f} GPU-h" if c.gpu_hours is not None else "GPU-h ?"
        else:
            mem, time = "CPU", f"{c.cpu_core_hours:,.2f} core-h"
        lines.append(f"cell {c.cell}: {mem}, {time}, disk {disk} [{c.throughput_source}]")
    if len(shown) < len(plan.cells):
        lines.append(f"… and {len(plan.cells) - len(shown)} more cells (retrace plan lists them all)")
    return "\n".join(lines) + "\n"
