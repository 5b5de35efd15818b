"""A study config expanded into cells: validation, designs, stable cell ids and the cells table.

``load_study(path_or_dict)`` validates a study with the JSON schema Snakemake's ``validate()`` uses
(workflow/schemas/config.schema.yaml) and then with the checks a schema cannot express, each raising a
``RetraceError`` whose message names the config key:

* an axis value that names no ``models``/``data`` entry, a baseline value that is not on its axis;
* a parallel layout whose gpus·pdbs·gas differs from the model's global batch;
* a ``deps`` value without an environment file ``envs/<deps>.yaml``;
* a start step at or beyond the steps a cell trains to, or one a local reference does not have
  (a Hugging Face repo is checked when its checkpoints are fetched);
* two cells with the same id.

Cell ids
--------
A cell id is the axis tokens joined by ``__``, always all axes, always in this order::

    <model>__<data>__g<gpus>p<pdbs>a<gas>__<gpu_type>__<attention>__<deps>__s<seed>__to<steps>__<precision>__<engine>

    e.g. pythia-70m-deduped__deduped-raw__g2p4a1__a100__flash__torch2.4__s1234__to143000__fp16__builtin

* ``<model>`` is the key under ``models``, followed by ``-from<N>`` when training resumes from a
  published step N > 0 (each segment of ``models.<name>.segments`` is such a model); ``<data>`` is the
  key under ``data``; the others are the axis values.
* Every token matches ``[A-Za-z0-9]+([-._+][A-Za-z0-9]+)*``, so ``__`` only ever separates tokens and an
  id splits back into its axes; ids are valid file names and need no quoting.
* An id depends on nothing but the cell's own axis values (never on which other values an axis has, or
  on which axes vary), so adding a value to an axis adds cells and never renames existing ones, and
  results under ``results/runs/<cell id>/`` stay valid. Should a new axis ever be added to this grammar,
  it must be appended with a default value whose token is omitted, to keep that promise.

Designs
-------
``factorial``: every combination of the axis values. ``one_at_a_time``: a baseline cell (``baseline``,
default the first value of each axis) plus, for each axis, one cell per other value with every other
axis at its baseline; the axes listed in ``cross`` are crossed in full and the design is repeated
within each of their combinations (e.g. ``cross: [model, data]`` gives every model on every variant).
In both designs a model with ``models.<name>.data`` is only paired with those data variants, and one with
``models.<name>.axes`` (e.g. ``{replica: [0], reanchor: [false]}``) only takes those values of the
replica and reanchor axes: the other cells are left out (ids of the remaining cells are unchanged).

Segments
--------
``models.<name>.segments: {starts: [N1, N2, …], length: K}`` makes one model per start, named
``<name>-from<N>`` (its cell-id token, its row in the cells table and its own verdict), which resumes
from published step N and trains to N + K: the axis ``steps`` does not apply to it. With
``optimizer_state`` (the default) a segment starts from the published ZeRO-1 optimizer state of a
GPT-NeoX native repo (fp32 master, Adam moments, loss scale; the data position is the step), staged by
the ``fetch_training_state`` rule; without it, from the weights alone with a fresh Adam. An offline
study's own published run (``build``) is published in that layout with ``build.format: neox``.

This module is pure Python (no torch, no Snakemake); the Snakefile and ``retrace cells`` call it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retrace.errors import RetraceError
from retrace.placement import place
from retrace.pythia.constants import GLOBAL_BATCH, SEED, SEQ_LENGTH

#: The axes, in cell-id order.
AXES = ("model", "data", "parallel", "gpu_type", "attention", "deps", "seed", "steps", "precision", "engine",
        "replica", "reanchor")
#: Axes appended after the first ten: their default value adds no token to the id (old ids stay valid).
OPTIONAL_AXES = {"replica": 0, "reanchor": False}
#: Columns of the cells table: the id, then every axis (``parallel`` as gpus, pdbs, gas).
CELL_COLUMNS = ("cell", "model", "data", "gpus", "pdbs", "gas", "gpu_type", "attention", "deps", "seed",
                "steps", "precision", "engine", "replica", "reanchor")

TOKEN = r"[A-Za-z0-9]+(?:[-._+][A-Za-z0-9]+)*"
#: A cell id, for Snakemake's wildcard_constraints (one token per axis).
CELL_ID_PATTERN = rf"{TOKEN}(?:__{TOKEN}){{{len(AXES) - 1 - len(OPTIONAL_AXES)},{len(AXES) - 1}}}"
CELL_ID_RE = re.compile(CELL_ID_PATTERN)  # use with fullmatch

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


# --------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Build:
    """How the workflow makes a local "published" run itself (``models.<name>.build``)."""

    shape: tuple[tuple[str, int], ...]  # (n_layers, hidden, heads, vocab, seq_len) as (key, value) pairs
    init_seed: int
    data: DataVariant
    parallel: Parallel
    steps: int
    seed: int
    precision: str
    attention: str
    format: str = "hf"  # "neox": published as GPT-NeoX training checkpoints with ZeRO-1 files
    dp: int = 1  # format neox: ranks the ZeRO-1 state is partitioned over
    max_elements_per_comm: int = 500_000_000

    @property
    def init_key(self) -> str:
        """Its step 0's directory name, shared by every build of the same shape and seed."""
        s = dict(self.shape)
        return f"L{s['n_layers']}h{s['hidden']}a{s['heads']}v{s['vocab']}t{s['seq_len']}-seed{self.init_seed}"

    def saved_steps(self) -> list[int]:
        return checkpoint_steps(0, self.steps)


@dataclass(frozen=True)
class Model:
    """A published run to reproduce: where its checkpoints are and how it was trained.

    ``settings`` are the model's keys that name a training setting (``retrace.spec.TrainConfig`` fields:
    ``lr``, ``train_iters``, ``checkpoint_activations`` …), passed to its cells' specs as they are.
    """

    name: str
    reference: str
    start_step: int = 0
    recipe: str | None = None
    global_batch: int = GLOBAL_BATCH
    documented: str | None = None
    hub_cache: str | None = None
    build: Build | None = None
    data: tuple[str, ...] | None = None  # the data variants it is reproduced on (None: every one)
    #: (axis, values) its cells are limited to on the replica/reanchor axes (models.<name>.axes); () = all
    axis_values: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    accept: tuple[str, ...] = ()  # flagged branches used anyway (retrace.audit.gate)
    settings: tuple[tuple[str, Any], ...] = ()
    segment_of: str | None = None  # models.<segment_of>.segments made this model (named <segment_of>-from<N>)
    end_step: int | None = None  # a segment's last step (replaces the steps axis)
    optimizer_state: bool = False  # start from the published ZeRO-1 state (a GPT-NeoX native repo)

    @property
    def train_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def seq_length(self) -> int | None:
        return self.train_settings.get("seq_length")

    def reproduced_on(self, variant: str) -> bool:
        """Whether cells pair this model with data variant ``variant`` (``models.<name>.data``)."""
        return self.data is None or variant in self.data

    def takes(self, cell: Cell) -> bool:
        """Whether ``cell`` (of this model) is in its design: its data variant and its values on the axes
        ``models.<name>.axes`` limits."""
        return self.reproduced_on(cell.data.name) and all(
            getattr(cell, axis) in values for axis, values in self.axis_values)

    @property
    def token(self) -> str:
        if self.segment_of is not None or self.start_step == 0:
            return self.name
        return f"{self.name}-from{self.start_step}"

    @property
    def build_name(self) -> str:
        """The ``models`` key whose ``build`` (if any) makes this model's published run."""
        return self.segment_of or self.name

    @property
    def is_local(self) -> bool:
        """A local reference lives in a hub cache on this machine (offline); else it is fetched from the Hub."""
        return self.hub_cache is not None

    @property
    def reference_key(self) -> str:
        """Its directory under resources/references/ (the repo id)."""
        return self.reference

    def recipe_values(self):
        """The training recipe with this model's overrides (``retrace.spec.resolve_recipe``, the one place
        the trainer resolves it too); worked out once per model."""
        return _model_recipe(self)

    def order_key(self) -> tuple[int, int]:
        """(num_samples, seq_length) the data order is built for: GPT-NeoX's sample count of the original
        schedule, ceil(train_iters · global_batch · 1.005); the order depends on it."""
        from retrace.data.order import neox_num_samples

        r = self.recipe_values()
        return neox_num_samples(r.train_iters, r.global_batch), r.seq_length


@dataclass(frozen=True)
class DataVariant:
    name: str
    source: str
    corpus: str
    format: str
    shuffle_samples: bool = False
    order_seed: int = SEED
    path: str | None = None


@dataclass(frozen=True)
class Parallel:
    gpus: int
    pdbs: int
    gas: int

    @property
    def token(self) -> str:
        return f"g{self.gpus}p{self.pdbs}a{self.gas}"

    @property
    def global_batch(self) -> int:
        return self.gpus * self.pdbs * self.gas

    def as_dict(self) -> dict[str, int]:
        return {"gpus": self.gpus, "pdbs": self.pdbs, "gas": self.gas}


@dataclass(frozen=True)
class Cell:
    """One training run of the grid and its comparison against the published checkpoints."""

    model: Model
    data: DataVariant
    parallel: Parallel
    gpu_type: str
    attention: str
    deps: str
    seed: int
    steps: int
    precision: str
    engine: str
    replica: int = 0  # the same settings run again (r<N> in the id): nondeterminism on GPU, none on CPU
    reanchor: bool = False  # re-anchored segments (retrace.train.reanchor; `anchored` in the id)
    id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", "__".join(self.tokens()))

    def tokens(self) -> list[str]:
        return [self.model.token, self.data.name, self.parallel.token, self.gpu_type, self.attention,
                self.deps, f"s{self.seed}", f"to{self.steps}", self.precision, self.engine,
                *([f"r{self.replica}"] if self.replica else []), *(["anchored"] if self.reanchor else [])]

    @property
    def axes(self) -> dict[str, Any]:
        """Axis name → plain value (model and data by name, parallel as a dict)."""
        return {"model": self.model.name, "data": self.data.name, "parallel": self.parallel.as_dict(),
                "gpu_type": self.gpu_type, "attention": self.attention, "deps": self.deps,
                "seed": self.seed, "steps": self.steps, "precision": self.precision, "engine": self.engine,
                "replica": self.replica, "reanchor": self.reanchor}

    def row(self) -> dict[str, Any]:
        """The cell's row of the cells table (``CELL_COLUMNS``)."""
        return {"cell": self.id, "model": self.model.name, "data": self.data.name, **self.parallel.as_dict(),
                "gpu_type": self.gpu_type, "attention": self.attention, "deps": self.deps, "seed": self.seed,
                "steps": self.steps, "precision": self.precision, "engine": self.engine,
                "replica": self.replica, "reanchor": self.reanchor}

    def checkpoint_steps(self) -> list[int]:
        """Steps this cell saves (and compares): the start, the Pythia schedule, the last step."""
        return checkpoint_steps(self.model.start_step, self.steps)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_type != "cpu"


# ---------------------------------------------------------------------------------------------- study


@dataclass
class Study:
    name: str
    design: str
    models: dict[str, Model]
    data: dict[str, DataVariant]
    axes: dict[str, list]
    baseline: dict[str, Any]
    cross: list[str]
    synthetic: dict[str, Any]
    cluster: dict[str, Any]
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    neox: dict[str, Any] | None = None  # the `neox` section (engine neox)
    audit: dict[str, Any] = field(default_factory=dict)  # the `audit` section, defaults filled in
    train_settings: dict[str, Any] = field(default_factory=dict)  # the `train` section: every cell's spec

    @functools.cached_property
    def _cells(self) -> list[Cell]:
        return _expand(self)

    def cells(self) -> list[Cell]:
        """Every cell of the design, in a stable order (axis values in config order)."""
        return list(self._cells)

    @functools.cached_property
    def _by_id(self) -> dict[str, Cell]:
        return {c.id: c for c in self._cells}

    def cell(self, cell_id: str) -> Cell:
        try:
            return self._by_id[cell_id]
        except KeyError:
            raise RetraceError(f"no cell {cell_id!r} in study {self.name!r}") from None

    def cell_ids(self) -> list[str]:
        return [c.id for c in self._cells]

    def cells_frame(self):
        """The cells table: one row per cell, every axis a column (``CELL_COLUMNS``)."""
        import pandas as pd

        return pd.DataFrame([c.row() for c in self._cells], columns=list(CELL_COLUMNS))

    def synthetic_seq_length(self) -> int:
        """Item length − 1 of the synthetic preshuffled streams (``synthetic.seq_length`` or synth's default)."""
        from retrace.data.synthetic import SynthConfig

        return int(self.synthetic.get("seq_length", SynthConfig().seq_length))

    @functools.cached_property
    def _used_models(self) -> list[Model]:
        return list(dict.fromkeys(c.model for c in self._cells))

    def used_models(self) -> list[Model]:
        """The models some cell trains, in axis order."""
        return list(self._used_models)

    def used_model(self, name: str) -> Model:
        """The model some cell trains named ``name``: a ``models`` key, or a segment ``<key>-from<N>``."""
        for m in self._used_models:
            if m.name == name:
                return m
        raise RetraceError(f"no cell trains a model named {name!r}")


@functools.cache
def _model_recipe(model: Model):
    from retrace.spec import resolve_recipe

    return resolve_recipe({**model.train_settings, "recipe": model.recipe, "global_batch": model.global_batch},
                          reference=model.reference)


def cells_frame(study: Study | str | Path | Mapping):
    """The cells table of a study (or of a study config path/dict)."""
    if not isinstance(study, Study):
        study = load_study(study)
    return study.cells_frame()


# ------------------------------------------------------------------------------------------- loading


def load_study(source: str | Path | Mapping[str, Any], *, root: str | Path | None = None) -> Study:
    """Validate a study config (a YAML path or an already-loaded dict) and build the ``Study``.

    ``root`` is the workflow directory holding ``envs/`` (default: the current directory). Relative
    local reference paths are taken from the current directory, as Snakemake runs there.
    """
    if isinstance(source, Mapping):
        config, where = copy.deepcopy(dict(source)), "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise RetraceError(f"{path}: study config not found")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RetraceError(f"{path}: not valid YAML: {exc}") from exc
        where = str(path)
        if not isinstance(config, Mapping):
            raise RetraceError(f"{path}: a study config must be a mapping, got {type(config).__name__}")
        config = dict(config)
    root = Path(root) if root is not None else Path.cwd()
    _check_schema(config, where)  # fills in the schema's defaults
    return _build(config, where, root)


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _key(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


@functools.lru_cache(maxsize=1)
def _validator_class():
    """The schema's validator, extended to fill in each property's ``default`` where the key is absent
    (before validating it, so nested defaults of a filled-in object are filled too): the defaults are
    written once, in the schema."""
    import jsonschema

    base = jsonschema.validators.validator_for(load_schema())
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return jsonschema.validators.extend(base, {"properties": properties})


def _check_schema(config: dict[str, Any], where: str) -> None:
    schema = load_schema()
    validator = _validator_class()(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    err = errors[0]
    path = list(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        keys = ", ".join(_key([*path, k]) for k in extra)
        hint = f" (known keys: {', '.join(allowed)})" if allowed else ""
        raise RetraceError(f"{where}: unknown key {keys}{hint}")
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        raise RetraceError(f"{where}: missing key {', '.join(_key([*path, k]) for k in missing)}")
    if err.validator == "propertyNames":
        raise RetraceError(f"{where}: config key {_key(path)}: name {err.instance!r} is not a valid token "
                           f"(letters and digits, with single - . _ + between them)")
    if err.validator == "pattern" and err.validator_value == load_schema()["$defs"]["token"]["pattern"]:
        raise RetraceError(f"{where}: config key {_key(path)}: {err.instance!r} is not a valid token "
                           f"(letters and digits, with single - . _ + between them)")
    # allOf/$ref wrap the real failure; report the deepest cause
    while err.context:
        err = sorted(err.context, key=lambda e: -len(e.absolute_path))[0]
        path = list(err.absolute_path)
    raise RetraceError(f"{where}: config key {_key(path)}: {err.message}")


def _build(config: dict[str, Any], where: str, root: Path) -> Study:
    def fail(key: str, msg: str) -> RetraceError:
        return RetraceError(f"{where}: config key {key}: {msg}")

    data = {}
    for name, spec in config["data"].items():
        data[name] = DataVariant(name=name, source=spec["source"], corpus=spec["corpus"], format=spec["format"],
                                 shuffle_samples=spec["shuffle_samples"], order_seed=spec["order_seed"],
                                 path=spec.get("path"))
        if data[name].path is not None and data[name].source != "pile":
            raise fail(f"data.{name}.path", "only for source pile (synthetic data is made by `retrace synth`)")
        if data[name].source == "pile" and data[name].path is None:
            from retrace.data.variants import variant_source

            if variant_source(data[name].corpus, data[name].format).repo_id is None:
                raise fail(f"data.{name}.path", f"the {data[name].corpus} {data[name].format} Pile is not published "
                                                "anywhere to download; set path to a copy on disk")
        if data[name].shuffle_samples and data[name].format == "raw":
            raise fail(f"data.{name}.shuffle_samples", "applies to preshuffled data only (raw data is shuffled "
                                                       "by GPT-NeoX's index maps)")
    models = {name: _model(name, spec, data, fail) for name, spec in config["models"].items()}
    for name, m in models.items():
        if m.documented is not None and m.documented not in data:
            raise fail(f"models.{name}.documented", f"{m.documented!r} is not a data variant "
                                                    f"(defined under data: {', '.join(data)})")
        for i, variant in enumerate(m.data or ()):
            if variant not in data:
                raise fail(f"models.{name}.data[{i}]", f"{variant!r} is not a data variant "
                                                       f"(defined under data: {', '.join(data)})")

    axes: dict[str, list] = {axis: list(config["axes"].get(axis, [OPTIONAL_AXES.get(axis)])) for axis in AXES}
    for i, name in enumerate(axes["model"]):
        if name not in models:
            raise fail(f"axes.model[{i}]", f"unknown model {name!r} (defined under models: {', '.join(models)})")
    for i, name in enumerate(axes["data"]):
        if name not in data:
            raise fail(f"axes.data[{i}]", f"unknown data variant {name!r} (defined under data: {', '.join(data)})")
    segmented = {name: _segments(m, config["models"][name], fail) for name, m in models.items()}
    axes["model"] = [s for n in axes["model"] for s in segmented[n]]
    axes["data"] = [data[n] for n in axes["data"]]
    axes["parallel"] = [Parallel(**p) for p in axes["parallel"]]
    seen: dict[str, int] = {}
    for i, lay in enumerate(axes["parallel"]):
        if lay.token in seen:
            raise fail(f"axes.parallel[{i}]", f"layout {lay.as_dict()} repeats axes.parallel[{seen[lay.token]}]")
        seen[lay.token] = i
    tokens = {m.token: m.name for m in axes["model"]}
    if len(tokens) != len(axes["model"]):
        raise fail("axes.model", "two models give the same cell-id token")

    design = config["design"]
    cross = list(config["cross"])
    baseline_cfg = dict(config.get("baseline", {}))
    if design == "factorial":
        for key in ("baseline", "cross"):
            if config.get(key):
                raise fail(key, "only used by design one_at_a_time (design is factorial)")
    baseline: dict[str, Any] = {}
    for axis in AXES:
        if axis not in baseline_cfg:
            baseline[axis] = axes[axis][0]
            continue
        value = baseline_cfg[axis]
        lookup = {"model": {n: ms[0] for n, ms in segmented.items()} | {m.name: m for m in axes["model"]},
                  "data": data}.get(axis)
        value = lookup.get(value, value) if lookup else (Parallel(**value) if axis == "parallel" else value)
        if value not in axes[axis]:
            shown = value.name if hasattr(value, "name") else (value.as_dict() if axis == "parallel" else value)
            raise fail(f"baseline.{axis}", f"{shown!r} is not one of the values of axes.{axis}")
        baseline[axis] = value

    _check_model_data(axes, baseline, design, cross, fail)
    _check_model_axes(axes, baseline, fail)
    neox = dict(config["neox"]) if "neox" in config else None
    if "neox" in axes["engine"]:
        if neox is None:
            raise fail("neox", "required when axes.engine has neox (where the GPT-NeoX v1.0 checkout is)")
        from retrace.neox.runner import NeoXEnv  # torch-free

        NeoXEnv.from_config(neox, where=f"{where}: config key neox")
    study = Study(name=config["study"], design=design, models=models, data=data, axes=axes, baseline=baseline,
                  cross=cross, synthetic=dict(config["synthetic"]), cluster=dict(config["cluster"]),
                  description=config.get("description", ""), config=config, neox=neox, audit=dict(config["audit"]),
                  train_settings=dict(config["train"]))
    _check_cells(study, fail, root)
    return study


def _check_model_data(axes: dict[str, list], baseline: dict[str, Any], design: str, cross: list[str], fail) -> None:
    """``models.<name>.data`` leaves cells out: every model on the axis keeps some, and one_at_a_time keeps
    its baseline cell (the data variant is crossed, or the baseline variant is one the model is run on)."""
    on_axis = {d.name for d in axes["data"]}
    for m in axes["model"]:
        if m.data is None:
            continue
        if not on_axis & set(m.data):
            raise fail(f"models.{m.name}.data", f"none of {list(m.data)} is a value of axes.data, so model "
                                                f"{m.name!r} would get no cells")
        if design == "one_at_a_time" and "data" not in cross and not m.reproduced_on(baseline["data"].name):
            raise fail(f"models.{m.name}.data", f"leaves out the baseline data variant {baseline['data'].name!r}: "
                                                "add it, or cross the data axis (cross: [..., data])")


def _check_model_axes(axes: dict[str, list], baseline: dict[str, Any], fail) -> None:
    """``models.<name>.axes`` names values of the axis, and keeps the baseline value (the model's baseline
    cell, which every one-at-a-time cell of it is compared with, and the factorial design's first cell)."""
    for m in axes["model"]:
        for axis, values in m.axis_values:
            key = f"models.{m.segment_of or m.name}.axes.{axis}"
            for i, v in enumerate(values):
                if v not in axes[axis]:
                    raise fail(f"{key}[{i}]", f"{v!r} is not one of the values of axes.{axis} ({axes[axis]})")
            if baseline[axis] not in values:
                raise fail(key, f"leaves out the baseline value {baseline[axis]!r} of axes.{axis}")


#: Model keys the grid reads itself; every other key that names a TrainConfig field is passed through.
_MODEL_KEYS = frozenset({"reference", "data", "start_step", "recipe", "global_batch"})


def _model(name: str, spec: Mapping[str, Any], data: dict[str, DataVariant], fail) -> Model:
    from retrace.pythia.recipes import RECIPE_SIZES, normalize_size, recipe_for
    from retrace.spec import TrainConfig

    recipe = spec.get("recipe")
    try:
        size = normalize_size(recipe if recipe is not None else spec["reference"])
    except RetraceError:
        size = None
    if size not in RECIPE_SIZES:
        if recipe is not None:
            raise fail(f"models.{name}.recipe", f"unknown Pythia size {recipe!r} (known: {', '.join(RECIPE_SIZES)})")
        if "global_batch" not in spec:
            raise fail(f"models.{name}", f"cannot tell the Pythia size from reference {spec['reference']!r}: "
                                         f"set models.{name}.recipe (or global_batch)")
        size = None
    global_batch = spec.get("global_batch") or (recipe_for(size).global_batch if size else GLOBAL_BATCH)
    build = None
    if "build" in spec:
        b = spec["build"]
        if "hub_cache" not in spec:
            raise fail(f"models.{name}.hub_cache", "required with build (where the built run is published)")
        if b["data"] not in data:
            raise fail(f"models.{name}.build.data", f"{b['data']!r} is not a data variant "
                                                    f"(defined under data: {', '.join(data)})")
        layout = Parallel(**b["parallel"])
        if layout.global_batch != global_batch:
            raise fail(f"models.{name}.build.parallel",
                       f"gpus·pdbs·gas = {layout.gpus}·{layout.pdbs}·{layout.gas} = {layout.global_batch} breaks "
                       f"the global batch {global_batch} of model {name!r}")
        seq_length = spec.get("seq_length")
        if seq_length is not None and seq_length > b["shape"]["seq_len"]:
            raise fail(f"models.{name}.seq_length", f"{seq_length} exceeds build.shape.seq_len {b['shape']['seq_len']}")
        build = Build(shape=tuple((k, int(b["shape"][k])) for k in ("n_layers", "hidden", "heads", "vocab", "seq_len")),
                      init_seed=int(b["init_seed"]), data=data[b["data"]], parallel=layout,
                      steps=int(b["steps"]), seed=int(b["seed"]), precision=b["precision"],
                      attention=b["attention"], format=b["format"], dp=int(b.get("dp") or layout.gpus),
                      max_elements_per_comm=int(b["max_elements_per_comm"]))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = tuple((k, v) for k, v in spec.items() if k in fields and k not in _MODEL_KEYS)
    return Model(name=name, reference=spec["reference"], start_step=int(spec["start_step"]), recipe=size,
                 global_batch=int(global_batch), documented=spec.get("documented"),
                 hub_cache=spec.get("hub_cache"), build=build,
                 data=tuple(spec["data"]) if "data" in spec else None,
                 axis_values=tuple((axis, tuple(v)) for axis, v in spec.get("axes", {}).items()),
                 accept=tuple(spec.get("accept", ())), settings=settings)


def _segments(m: Model, spec: Mapping[str, Any], fail) -> list[Model]:
    """The models ``models.<name>.segments`` makes (see the module doc); ``[m]`` without segments."""
    seg = spec.get("segments")
    if seg is None:
        return [m]
    if spec.get("start_step"):
        raise fail(f"models.{m.name}.start_step", "set either start_step or segments (each segment has its start)")
    return [dataclasses.replace(m, name=f"{m.name}-from{n}", start_step=int(n), segment_of=m.name,
                                end_step=int(n) + int(seg["length"]), optimizer_state=bool(seg["optimizer_state"]))
            for n in seg["starts"]]


def _check_cells(study: Study, fail, root: Path) -> None:
    axes = study.axes
    for i, deps in enumerate(axes["deps"]):
        env = root / "envs" / f"{deps}.yaml"
        if not env.is_file():
            raise fail(f"axes.deps[{i}]", f"no environment file envs/{deps}.yaml for deps {deps!r} (looked in {root / 'envs'})")
    steps_index = {s: i for i, s in enumerate(axes["steps"])}
    available: dict[str, set[int]] = {}
    keys: dict[str, Model] = {}
    for m in axes["model"]:
        other = keys.setdefault(m.reference_key, m)
        if other.hub_cache != m.hub_cache:
            raise fail(f"models.{m.name}.hub_cache", f"reference {m.reference} is also used by model "
                                                     f"{other.name!r} from another hub cache")
    seen: dict[str, Cell] = {}
    placed: set[tuple[int, str]] = set()
    for cell in study.cells():
        m, lay = cell.model, cell.parallel
        if (lay.gpus, cell.gpu_type) not in placed:  # resources the train job will ask for, checked now
            try:
                place(gpus=lay.gpus, gpu_type=cell.gpu_type, cluster=study.cluster)
            except RetraceError as exc:
                raise fail(f"axes.parallel[{axes['parallel'].index(lay)}]", f"cell {cell.id}: {exc}") from None
            placed.add((lay.gpus, cell.gpu_type))
        if lay.global_batch != m.global_batch:
            i = axes["parallel"].index(lay)
            raise fail(f"axes.parallel[{i}]", f"gpus·pdbs·gas = {lay.gpus}·{lay.pdbs}·{lay.gas} = {lay.global_batch} "
                                               f"breaks the global batch {m.global_batch} of model {m.name!r}")
        steps_key = (f"models.{m.segment_of}.segments" if m.end_step is not None
                     else f"axes.steps[{steps_index.get(cell.steps)}]")
        if cell.steps <= m.start_step:
            raise fail(steps_key,
                       f"steps {cell.steps} is not beyond models.{m.name}.start_step {m.start_step}")
        if cell.data.source == "synthetic" and cell.data.format == "preshuffled":
            want = study.synthetic_seq_length()
            have = m.seq_length or (m.recipe_values().seq_length if m.recipe else SEQ_LENGTH)
            if have != want:
                raise fail(f"models.{m.name}.seq_length",
                           f"{have} differs from the item length of the synthetic preshuffled stream "
                           f"{cell.data.name!r} (synthetic.seq_length = {want})")
        if cell.id in seen:
            raise fail("axes", f"two cells share the id {cell.id!r}")
        seen[cell.id] = cell
        if m.is_local:
            if m.name not in available:
                built = m.build is not None
                available[m.name] = (set(m.build.saved_steps()) if built
                                     else local_reference_steps(m.hub_cache, m.reference))
                if m.start_step not in available[m.name]:
                    what = f"the run models.{m.name}.build makes" if built else f"hub cache {m.hub_cache}"
                    raise fail(f"models.{m.segment_of}.segments" if m.segment_of else f"models.{m.name}.start_step",
                               f"local reference {m.reference} in {what} has no branch "
                               f"step{m.start_step} (it has: {_show_steps(available[m.name])})")
            missing = [s for s in cell.checkpoint_steps() if s not in available[m.name]]
            if missing:
                raise fail(steps_key,
                           f"cells training model {m.name!r} to step {cell.steps} compare against step "
                           f"{missing[0]}, which local reference {m.reference} in {m.hub_cache} lacks "
                           f"(it has: {_show_steps(available[m.name])})")


def _show_steps(steps: set[int]) -> str:
    ordered = sorted(steps)
    if not ordered:
        return "no step branches"
    return ", ".join(map(str, ordered[:8])) + (f" … {ordered[-1]} ({len(ordered)} steps)" if len(ordered) > 8 else "")


# ------------------------------------------------------------------------------------------- designs


def _expand(study: Study) -> list[Cell]:
    axes = study.axes
    if study.design == "factorial":
        combos: Iterable[tuple] = itertools.product(*(axes[a] for a in AXES))
        cells = [Cell(*combo) for combo in combos]
    else:
        cells = []
        crossed = [a for a in AXES if a in study.cross]
        for values in itertools.product(*(axes[a] for a in crossed)):
            base = {**study.baseline, **dict(zip(crossed, values, strict=True))}
            cells.append(Cell(**base))
            for axis in AXES:
                if axis in crossed:
                    continue
                for value in axes[axis]:
                    if value != study.baseline[axis]:
                        cells.append(Cell(**{**base, axis: value}))
    # a segment trains to its own end (models.<name>.segments), whatever the steps axis says
    cells = [dataclasses.replace(c, steps=c.model.end_step) if c.model.end_step is not None else c for c in cells]
    cells = [c for c in cells if c.model.takes(c)]  # models.<name>.data and models.<name>.axes
    return list({c.id: c for c in cells}.values())


# -------------------------------------------------------------------------------------- references


def local_reference_steps(hub_cache: str | Path, repo_id: str) -> set[int]:
    """Published steps (branches ``step<N>``) of ``repo_id`` in a local Hugging Face hub cache."""
    from huggingface_hub.file_download import repo_folder_name  # light; retrace.checkpoints imports torch

    refs = Path(hub_cache).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    if not refs.is_dir():
        return set()
    return {int(p.name[4:]) for p in refs.iterdir() if re.fullmatch(r"step\d+", p.name) and p.is_file()}


def checkpoint_steps(start: int, end: int) -> list[int]:
    """Checkpoints of a run from ``start`` to ``end``: the start, the Pythia schedule, the end."""
    return list(_save_steps(start, end))


@functools.lru_cache(maxsize=4096)
def _save_steps(start: int, end: int) -> tuple[int, ...]:
    from retrace.pythia.schedule import save_steps

    return tuple(save_steps(start, end))
