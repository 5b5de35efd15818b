"""A run's command: the spec of a cell's (or a built reference's) train job, derived from the study.

``train_spec(study, cell)`` is the cell's ``TrainConfig`` (engines builtin, deepspeed) or
``NeoXRunConfig`` (engine neox); the train rule passes ``spec.to_json()`` as one param, so a changed
setting reruns the cell. Settings come from, in order:

* the study's ``train:`` section and the model's keys that name a spec field (``lr``, ``train_iters``,
  ``checkpoint_activations`` …: passed straight through, so a new setting needs no code here);
* the cell's axes (layout, attention, precision, engine, seed, steps) and its data variant (prefix,
  format, order seed, sample shuffling);
* the model's resolved recipe size and global batch.

GPT-NeoX runs the published config of the model's size: a model that overrides the recipe is refused
for engine neox, naming the key. Across nodes a neox cell uses DeeperSpeed's slurm launcher.

Start weights (engines builtin, deepspeed): the ranks never reach the Hub. The cell's ``reference`` is
the local file ``./resources/references/<repo>/step{start}.safetensors`` that the ``fetch_reference``
local rule writes once, verified, with the source's config.json in its metadata (``start_weights``:
an input of the train rule); the repo id the study names is kept as ``published`` (run.json, the
manifest). Built references (``models.<name>.build``) are fetched the same way from their local hub
cache once published. A segment with the published optimizer state (``models.<name>.segments``) reads
instead the GPT-NeoX training checkpoint ``./resources/training_states/<repo>/step{start}`` that the
``fetch_training_state`` local rule stages (weights and ZeRO-1 files). Engine neox cells still name the Hub spec: ``retrace neox-run`` converts the
weights itself and needs a GPT-NeoX native checkpoint (with its optimizer state) to start past step 0.

Device: a GPU cell trains on ``cuda`` and checks that the GPU is the one its ``gpu_type`` names (with the
study's ``cluster.gpu_models`` name for it); a CPU cell trains on ``cpu``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from retrace import paths
from retrace.errors import RetraceError
from retrace.placement import place
from retrace.pythia.constants import GLOBAL_BATCH
from retrace.spec import NeoXRunConfig, TrainConfig

if TYPE_CHECKING:
    from retrace.grid import Cell, Model, Study

#: Recipe overrides GPT-NeoX cannot take (it runs the published config).
_RECIPE_KEYS = ("seq_length", "lr", "min_lr", "train_iters", "warmup_iters")


def train_command(cell: Cell) -> str:
    """The ``retrace`` subcommand of a cell's train job: ``neox-run`` for engine neox, else ``train``."""
    return "neox-run" if cell.engine == "neox" else "train"


def start_fetch_logs(cell: Cell) -> list[str]:
    """The logs of the jobs that stage a cell's start checkpoint (``fetch_reference``, references.smk)."""
    if cell.engine == "neox":
        return []
    return [paths.log("fetch_reference", f"{cell.model.reference_key}/step{cell.model.start_step}")]


def start_weights(cell: Cell) -> list[str]:
    """The staged start checkpoint a cell's train job reads: ``fetch_reference``'s parameters, or for a
    segment with ``optimizer_state`` the GPT-NeoX training checkpoint ``fetch_training_state`` stages
    (weights and ZeRO-1 state); [] for engine neox."""
    if cell.engine == "neox":
        return []
    if cell.model.optimizer_state:
        return [paths.training_state_dir(cell.model.reference_key, cell.model.start_step)]
    return [paths.reference_file(cell.model.reference_key, cell.model.start_step)]


def gpu_names(study: Study, cell: Cell) -> list[str] | None:
    """What ``torch.cuda.get_device_name()`` must match for a GPU cell: its ``gpu_type`` and the scheduler's
    name for it (``cluster.gpu_models``); None for a CPU cell."""
    if not cell.on_gpu:
        return None
    names = [cell.gpu_type]
    model = study.cluster["gpu_models"].get(cell.gpu_type)
    if model and model not in names:
        names.append(model)
    return names


def train_spec(study: Study, cell: Cell) -> TrainConfig | NeoXRunConfig:
    """The spec of a cell's train job (see the module doc)."""
    if cell.engine == "neox":
        return _neox_spec(study, cell)
    m = cell.model
    staged = "./" + start_weights(cell)[0]  # ./: a local path, never read as a Hub spec
    return _train_spec(study, m, data=cell.data, parallel=cell.parallel, attention=cell.attention,
                       precision=cell.precision, engine=cell.engine, steps=cell.steps, seed=cell.seed,
                       reference=staged, start_step=m.start_step, out=paths.run_dir(cell.id),
                       published=m.reference, device="cuda" if cell.on_gpu else "cpu",
                       gpu_names=gpu_names(study, cell),
                       reanchor=paths.reference_dir(m.reference_key) if cell.reanchor else None)


def build_spec(study: Study, model: Model) -> TrainConfig:
    """The spec of a built reference's training run (``models.<name>.build``), from its own step 0."""
    b = model.build
    if b is None:
        raise RetraceError(f"model {model.name} has no build section")
    spec = _train_spec(study, model, data=b.data, parallel=b.parallel, attention=b.attention,
                       precision=b.precision, engine="builtin", steps=b.steps, seed=b.seed,
                       reference=paths.build_init_dir(b.init_key), start_step=0,
                       out=paths.build_run_dir(model.build_name), device="cpu")
    if b.format == "neox":  # every saved step is published with its optimizer state: keep them all
        spec = dataclasses.replace(spec, keep_states=len(b.saved_steps()))
    return spec


def publish_flags(model: Model) -> str:
    """``retrace reference publish`` flags of a built reference: its format (and ZeRO-1 partitioning)."""
    b = model.build
    if b is None or b.format == "hf":
        return ""
    return f"--format neox --dp {b.dp} --max-elements-per-comm {b.max_elements_per_comm}"


def _train_spec(study: Study, m: Model, *, data, parallel, attention, precision, engine, steps, seed,
                reference, start_step, out, published=None, device="auto", gpu_names=None,
                reanchor=None) -> TrainConfig:
    return TrainConfig(**{**study.train_settings, **m.train_settings},
                       reference=reference, start_step=start_step, out=out, published=published,
                       device=device, gpu_names=gpu_names, reanchor=reanchor,
                       data=paths.data_prefix(data, study.synthetic["seed"]), data_kind=data.format,
                       order_seed=data.order_seed, shuffle_samples=data.shuffle_samples,
                       order_cache=paths.order_dir(data) if data.format == "raw" or data.shuffle_samples else None,
                       gpus=parallel.gpus, pdbs=parallel.pdbs, gas=parallel.gas, global_batch=m.global_batch,
                       attention=attention, precision=precision, engine=engine, steps=steps, seed=seed,
                       recipe=m.recipe)


def _neox_spec(study: Study, cell: Cell) -> NeoXRunConfig:
    m, lay, neox = cell.model, cell.parallel, study.neox or {}
    changed = [k for k in _RECIPE_KEYS if k in m.train_settings]
    if m.global_batch != GLOBAL_BATCH:
        changed.insert(0, "global_batch")
    if changed:
        raise RetraceError(
            f"cell {cell.id}: engine neox runs the published GPT-NeoX config, but models.{m.name} sets "
            f"{', '.join(changed)}; drop it (or run this model with engine builtin/deepspeed)")
    where = place(gpus=lay.gpus, gpu_type=cell.gpu_type, cluster=study.cluster)
    multi_node = where.nodes > 1
    return NeoXRunConfig(
        reference=m.reference, start_step=m.start_step, out=paths.run_dir(cell.id),
        data=paths.data_prefix(cell.data, study.synthetic["seed"]), data_kind=cell.data.format,
        gpus=lay.gpus, pdbs=lay.pdbs, gas=lay.gas, attention=cell.attention, precision=cell.precision,
        steps=cell.steps, seed=cell.seed, size=m.recipe, deduped="deduped" in m.reference.lower(),
        launcher="slurm" if multi_node else "local",
        gpus_per_node=where.ranks_per_node if multi_node else None,
        neox_path=neox.get("path"), neox_container=neox.get("container"),
        neox_runtime=neox.get("runtime", "apptainer"), neox_conda_env=neox.get("conda_env"),
        neox_python=neox.get("python", "python"), neox_bind=list(neox.get("binds") or ()))
