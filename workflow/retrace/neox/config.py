"""One cell → a GPT-NeoX v1.0 YAML: the published Pythia config of that size plus the cell's overrides.

``neox_config(...)`` is pure (it reads only the packaged published configs) and returns a
``NeoXConfig`` whose ``text()`` is the YAML GPT-NeoX v1.0 (``71df4d50``) reads with ``yaml.load``.
Every value is the published one unless a comment in the YAML says why not; the result lists the
documented ``corrections`` and the cell's ``overrides`` separately.

What a cell changes (GPT-NeoX v1.0 argument names, reference/pythia-neox.md):

* layout: ``train_micro_batch_size_per_gpu`` = pdbs, ``gradient_accumulation_steps`` = gas (the
  published ``"gas": 1`` is dropped: v1.0 overwrites ``gas`` from ``gradient_accumulation_steps``),
  ``train_batch_size`` = 1024 and ``global_num_gpus`` = gpus × model-parallel size, so v1.0's
  ``check_batch_parameters`` refuses a launch whose world size differs. ``gpus`` is the number of
  data-parallel ranks, as in the grid (gpus·pdbs·gas = 1024); 6.9b (mp 2) and 12b (mp 4) need
  ``mp`` GPUs per rank. The model-parallel size is the published one: it fixes the padded vocabulary
  (50304/50432/50688) and the checkpoint layout, which v1.0 cannot reshard.
* ``attention_config`` [[["flash"], L]] or [[["global"], L]].
* data: ``train/valid/test_data_paths`` = the cell's prefix (the published runs used the same file for
  all three). It must be the *raw* tokenized corpus (``…_text_document``): v1.0 always builds its own
  doc/sample/shuffle index maps with the seed, so EleutherAI's preshuffled stream would be shuffled
  again. The index maps are cached next to the prefix (write access needed, or copy them there).
* start: ``load`` + ``finetune``. v1.0 takes the tag from ``<load>/latest`` (its ``iteration``
  argument is only for evaluate/generate), so the runner points ``load`` at a directory whose
  ``latest`` names ``global_step{start}``. start 0 → ``finetune: true`` (weights only, iteration 0,
  no optimizer or RNG state: how the published run began); start > 0 → ``finetune: false`` (iteration,
  optimizer, LR scheduler and RNG from the checkpoint; the data loader resumes at item 1024·start).
  Without ``load`` (start 0 only) v1.0 initialises from the seed.
  Caveat, from DeeperSpeed ``eb7f5cff`` (not run here): a weights-only load under ZeRO-1 leaves the
  fp32 master weights at their initialisation, so from update 1 on the weights are the seed's init
  unless it equals the loaded step 0; ``retrace.neox.convert`` checks step1 == step0 for this.
* stop: ``train_iters`` and ``lr_decay_iters`` stay 143000, so the v1.0 schedule (warmup 1430, cosine
  period 143000) *and* the index maps (num_samples = 143000·1024·1.005, hence the epoch count and the
  shuffle) are the published ones; a smaller ``train_iters`` would change the data order.
  ``exit_interval`` = steps makes v1.0 ``sys.exit()`` at that iteration, after its checkpoint is saved
  (the save comes before the exit test in ``training.train``).
* save: ``save`` = the run's directory; ``checkpoint_factor`` 1000 (published) and ``extra_save_iters``
  = the published 0,1,2,4…512 inside (start, steps] plus ``steps``; v1.0 saves ``global_step0`` after
  loading when it starts at iteration 0.
* ``seed`` (v1.0 default and published 1234): it seeds init, dropout (0 here) *and* the index maps,
  so another seed also changes the data order.
* precision: the fp16 block as published; ``bf16`` adds ``"type": "bfloat16"`` (v1.0/DeeperSpeed
  eb7f5cff spelling), ``fp32`` sets ``enabled: false``.
* launcher: ``local`` (one node: ``deepspeed_slurm: false``, DeepSpeed's runner starts the ranks) or
  ``slurm`` (the published ``launcher: slurm``/``deepspeed_slurm: true``; needs a DeeperSpeed with
  ``SlurmRunner`` (e650c52f, 2022-09 or later; v1.0's pinned ``eb7f5cff`` has none), which json-parses
  the config file, so write it with ``fmt="json"``).
* ``log_interval`` 1: one log line per step for ``train_log.parquet`` (logging only).

Corrections (reference/pythia-neox.md §1, §3, §6), each a ``Correction`` and a YAML comment:
12b-deduped's 40 layers/36 heads → 36/40; pythia-12b.yml's missing comma; 1b's precision → bf16
(README) unless the cell sets one; 6.9b/12b init keys written as the v1.0 defaults that were used
(normal/scaled_normal, README erratum, pythia#135); 14m/31m's data path (deduped directory, standard
file name) replaced by the cell's. The 1b yml's lr 0.00025 (README table 3e-4) is kept, as
``retrace.pythia.recipes`` does, and reported as a note.

Not run here: GPT-NeoX itself (no GPU, no checkout). The YAML is checked against the published values
and against v1.0's argument names and batch arithmetic (read from its source), not by v1.0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrace.errors import RetraceError
from retrace.io import atomic_open
from retrace.neox.published import Correction, PublishedConfig, normalize_key, published_config

NEOX_VERSION = "v1.0 (71df4d5017f9f4919566a11454fe3a507ffdc632)"
ATTENTIONS = ("flash", "global")
PRECISIONS = ("fp16", "bf16", "fp32")
LAUNCHERS = ("local", "slurm")
FORMATS = ("yaml", "json")
GLOBAL_BATCH = 1024
TRAIN_ITERS = 143_000
_README = "EleutherAI/pythia README"


@dataclasses.dataclass(frozen=True)
class Override:
    """A published value the cell replaces (``published`` None: the key was not in the yml)."""

    key: str
    published: Any
    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Entry:
    key: str  # as written (the published spelling where the key was published)
    value: Any
    comment: str | None = None
    added: bool = False


class _Doc:
    """Ordered key/values addressed by their GPT-NeoX (underscore) name."""

    def __init__(self, values: Mapping[str, Any]):
        self.entries = [_Entry(k, v) for k, v in values.items()]

    def find(self, key: str) -> _Entry | None:
        n = normalize_key(key)
        for e in self.entries:
            if normalize_key(e.key) == n:
                return e
        return None

    def get(self, key: str, default: Any = None) -> Any:
        e = self.find(key)
        return default if e is None else e.value

    def set(self, key: str, value: Any, comment: str | None = None) -> Any:
        """Set ``key`` (in place if published, else appended); returns the published value or None."""
        e = self.find(key)
        if e is None:
            self.entries.append(_Entry(key, value, comment, added=True))
            return None
        old, e.value = e.value, value
        if comment:
            e.comment = comment if not e.comment else f"{e.comment}; {comment}"
        return old

    def rename(self, old: str, new: str, value: Any, comment: str) -> Any:
        e = self.find(old)
        if e is None:
            return self.set(new, value, comment)
        published = e.value
        e.key, e.value, e.comment = new, value, comment
        return published

    def as_dict(self) -> dict[str, Any]:
        return {e.key: e.value for e in self.entries}


@dataclasses.dataclass
class NeoXConfig:
    """A generated GPT-NeoX v1.0 config and what was done to the published one."""

    published: PublishedConfig
    doc: _Doc
    header: list[str]
    corrections: list[Correction]
    overrides: list[Override]
    notes: list[str]
    data_parallel: int
    model_parallel: int
    world_size: int
    start_step: int
    steps: int
    save_steps: list[int]  # canonical steps of the run: start, the Pythia schedule inside, steps
    launcher: str

    @property
    def values(self) -> dict[str, Any]:
        """Keys as written, in file order."""
        return self.doc.as_dict()

    def normalized(self) -> dict[str, Any]:
        """Keys as GPT-NeoX v1.0 reads them ('-' → '_')."""
        return {normalize_key(k): v for k, v in self.values.items()}

    def text(self, fmt: str = "yaml") -> str:
        if fmt == "yaml":
            return render_yaml(self.doc, self.header)
        if fmt == "json":
            return render_json(self.values)
        raise RetraceError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "published": {"name": self.published.name, "repo": self.published.repo,
                          "path": self.published.path, "commit": self.published.commit},
            "corrections": [c.to_dict() for c in self.corrections],
            "overrides": [o.to_dict() for o in self.overrides],
            "notes": list(self.notes),
            "layout": {"data_parallel": self.data_parallel, "model_parallel": self.model_parallel,
                       "world_size": self.world_size},
            "start_step": self.start_step,
            "steps": self.steps,
            "save_steps": list(self.save_steps),
            "launcher": self.launcher,
        }


# -- the generator ---------------------------------------------------------------------------------------
def neox_config(
    size: str,
    *,
    gpus: int,
    pdbs: int,
    gas: int,
    data: str,
    steps: int,
    save: str,
    deduped: bool = False,
    attention: str = "flash",
    load: str | None = None,
    start_step: int = 0,
    seed: int = 1234,
    precision: str | None = None,
    launcher: str = "local",
    vocab_file: str | None = None,
    data_kind: str = "raw",
    extra: Mapping[str, Any] | None = None,
) -> NeoXConfig:
    """The GPT-NeoX v1.0 config of one cell (see the module docstring for every key it sets).

    ``size`` is a Pythia size or name ("70m", "pythia-2.8b-deduped"; a "-deduped" name implies
    ``deduped``); ``gpus`` the data-parallel ranks; ``data`` the tokenized corpus prefix (a trailing
    ``.bin``/``.idx`` is dropped); ``load`` the directory GPT-NeoX loads from (its ``latest`` must name
    ``global_step{start_step}``; ``retrace.neox.runner.prepare_load`` makes such a directory);
    ``precision`` None keeps the published (corrected) precision; ``extra`` sets further GPT-NeoX keys
    verbatim (listed as overrides). Raises ``RetraceError`` for an impossible cell.
    """
    from retrace.pythia.sizes import pythia_config, pythia_size

    size_key = pythia_size(size)
    deduped = bool(deduped or "-deduped" in str(size).lower())
    pub = published_config(size_key, deduped)
    doc = _Doc(pub.values)
    corrections = list(pub.corrections)
    overrides: list[Override] = []
    notes: list[str] = []
    where = pub.name

    # -- input checks ---------------------------------------------------------------------------------
    for name, value, low in (("gpus", gpus, 1), ("pdbs", pdbs, 1), ("gas", gas, 1), ("steps", steps, 1),
                             ("start_step", start_step, 0), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RetraceError(f"{where}: {name} must be an integer ≥ {low}, got {value!r}")
    if attention not in ATTENTIONS:
        raise RetraceError(f"{where}: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if precision is not None and precision not in PRECISIONS:
        raise RetraceError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if launcher not in LAUNCHERS:
        raise RetraceError(f"{where}: launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if data_kind != "raw":
        raise RetraceError(
            f"{where}: data {data!r} is {data_kind!r}; GPT-NeoX v1.0 builds its own shuffled index maps "
            "from the seed, so it needs the raw tokenized corpus (…_text_document), not a preshuffled stream"
        )
    for name, value in (("data", data), ("save", save)):
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise RetraceError(f"{where}: {name} must be a path, got {value!r}")
    train_iters = doc.get("train-iters")
    if train_iters != TRAIN_ITERS or doc.get("lr-decay-iters") != TRAIN_ITERS:  # pragma: no cover - data
        raise RetraceError(f"{pub.file}: train-iters/lr-decay-iters are not {TRAIN_ITERS}")
    if steps <= start_step:
        raise RetraceError(f"{where}: steps ({steps}) must be after the start step ({start_step})")
    if steps > train_iters:
        raise RetraceError(f"{where}: steps ({steps}) is beyond the published run's {train_iters} iterations")
    if start_step > 0 and not load:
        raise RetraceError(
            f"{where}: start step {start_step} needs load (a GPT-NeoX checkpoint of that step with its "
            "optimizer states); only step 0 can start from GPT-NeoX's own initialisation"
        )

    # -- corrections of the published config ----------------------------------------------------------
    model = pythia_config(size_key)
    n_layers = doc.get("num-layers")
    if pub.name == "pythia-12b-deduped":
        for key, right in (("num-layers", model.n_layers), ("num-attention-heads", model.heads)):
            old = doc.set(key, right, f"retrace correction: published {doc.get(key)} is a typo")
            corrections.append(Correction(
                normalize_key(key), old, right,
                "pythia-12b-deduped.yml says 40 layers and 36 heads (edits of 2023-01-23 and 2025-05-23); "
                "the model has 36 layers and 40 heads", f"{_README} table; HF config.json of pythia-12b-deduped"))
        n_layers = model.n_layers
    if size_key in ("6.9b", "12b"):
        for key, default in (("init_method", "normal"), ("output_layer_init_method", "scaled_normal")):
            if doc.find(key) is None:
                doc.set(key, default, "retrace correction: the v1.0 default the run used, made explicit")
                corrections.append(Correction(
                    key, None, default,
                    "the yml has no init keys, so v1.0's defaults were used (not small_init/wang_init as for "
                    "the other sizes); written explicitly, no change in behaviour",
                    f"{_README} erratum; EleutherAI/pythia#135"))
    prefix = str(data)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    data_reason = "cell data"
    if size_key in ("14m", "31m"):
        data_reason = ("cell data; retrace correction: the published path is the deduped directory with the "
                       "standard file name (the README lists 14m/31m as standard-Pile models)")
        for key in ("train-data-paths", "valid-data-paths", "test-data-paths"):
            corrections.append(Correction(
                normalize_key(key), doc.get(key), [prefix],
                "the published path is the deduped directory with the standard file name; the README lists "
                "14m/31m as standard-Pile models; replaced by the cell's data", f"{_README}; reference §4"))
    if size_key == "1b":
        notes.append(
            "pythia-1b: the yml's lr 0.00025 is kept (the README table says 3.0e-4; which one ran is not "
            "documented); retrace.pythia.recipes keeps 0.00025 too"
        )
    if (n_layers, doc.get("hidden-size"), doc.get("num-attention-heads")) != (
        model.n_layers, model.hidden, model.heads
    ):  # pragma: no cover - the packaged data and the registry agree
        raise RetraceError(f"{pub.file}: shape differs from retrace.pythia.sizes' pythia-{size_key}")

    def override(key: str, value: Any, reason: str, *, comment: bool = True) -> None:
        before = doc.find(key)
        published = None if before is None or before.added else before.value
        if before is not None and not before.added and _same(before.value, value):
            return  # unchanged: the published value stands
        text = f"retrace: {reason}" + (f"; published: {_scalar(published)}" if before is not None else "")
        doc.set(key, value, text if comment else None)
        overrides.append(Override(normalize_key(key), published, value, reason))

    # -- layout ---------------------------------------------------------------------------------------
    mp = int(doc.get("model-parallel-size", 1) or 1)
    pp = int(doc.get("pipe-parallel-size", 0) or 0)
    batch = gpus * pdbs * gas
    if batch != GLOBAL_BATCH:
        raise RetraceError(
            f"{where}: layout gpus {gpus} × pdbs {pdbs} × gas {gas} = {batch} sequences per step, but the "
            f"published global batch is {GLOBAL_BATCH} (data-parallel ranks × train_micro_batch_size_per_gpu × "
            "gradient_accumulation_steps must equal it)"
        )
    world = gpus * mp * max(pp, 1)
    override("train_micro_batch_size_per_gpu", pdbs, "cell layout")
    if doc.find("gas") is not None:
        published_gas = doc.rename(
            "gas", "gradient_accumulation_steps", gas,
            f"retrace: cell layout; replaces the published \"gas\": {doc.get('gas')}, which v1.0 overwrites "
            "from gradient_accumulation_steps")
        overrides.append(Override("gradient_accumulation_steps", published_gas, gas,
                                  "cell layout (the published gas key is dropped)"))
    else:
        override("gradient_accumulation_steps", gas, "cell layout")
    override("train_batch_size", GLOBAL_BATCH,
             "explicit global batch: v1.0 checks it equals micro × GAS × data-parallel ranks")
    override("global_num_gpus", world,
             f"world size = {gpus} data-parallel × {mp} model-parallel; fixes v1.0's data-parallel size")
    if mp > 1:
        notes.append(f"{where} is model-parallel {mp}: {gpus} data-parallel ranks need {world} GPUs")

    # -- attention, data, tokenizer -------------------------------------------------------------------
    override("attention-config", [[[attention], n_layers]], f"cell attention {attention}")
    for key in ("train-data-paths", "valid-data-paths", "test-data-paths"):
        override(key, [prefix], data_reason)
    if vocab_file:
        override("vocab-file", str(vocab_file), "tokenizer file on this cluster")
    else:
        notes.append(f"vocab-file is still the published {doc.get('vocab-file')!r}; pass vocab_file")

    # -- start, stop, save ----------------------------------------------------------------------------
    if load:
        override("load", str(load), f"directory whose latest names global_step{start_step}")
        if start_step == 0:
            override("finetune", True, "start at step 0: weights only, iteration 0, fresh optimizer")
        else:
            override("finetune", False,
                     f"resume at step {start_step}: iteration, optimizer, scheduler and RNG from the checkpoint")
    else:
        notes.append("no load: GPT-NeoX initialises from the seed (compare step 0 with the published step0)")
    override("save", str(save), "the run's checkpoint directory")
    published_extra = list(doc.get("extra-save-iters") or [])
    factor = int(doc.get("checkpoint-factor") or 0)
    extra_iters = sorted({s for s in published_extra if start_step < s <= steps}
                         | ({0} if start_step == 0 and 0 in published_extra else set()))
    if not (factor and steps % factor == 0 and steps < train_iters) and steps not in extra_iters:
        extra_iters.append(steps)
    override("extra-save-iters", extra_iters,
             f"the published schedule inside ({start_step}, {steps}] plus the last step")
    override("exit_interval", steps,
             f"stop after iteration {steps} (saved first); train-iters stays {train_iters} so the LR schedule "
             "and the index maps are the published ones")
    override("seed", seed, "cell seed; it also seeds the index maps (data order)" if seed != 1234
             else "v1.0 default, made explicit; it also seeds the index maps (data order)")

    # -- precision ------------------------------------------------------------------------------------
    fp16 = dict(doc.get("fp16") or {})
    if precision is None and size_key == "1b":
        new = {**fp16, "type": "bfloat16"}
        doc.set("fp16", new, "retrace correction: pythia-1b was trained in bf16 (v1.0: fp16.type bfloat16)")
        corrections.append(Correction(
            "fp16", fp16, new,
            "pythia-1b was trained in bf16 after an fp16 loss spike; the yml still says fp16",
            f"{_README}"))
    elif precision == "bf16":
        override("fp16", {**fp16, "type": "bfloat16"}, "cell precision bf16 (v1.0: fp16.type bfloat16)")
    elif precision == "fp32":
        override("fp16", {**fp16, "enabled": False}, "cell precision fp32")
    elif precision == "fp16" and size_key == "1b":
        notes.append("pythia-1b was trained in bf16 (README); this cell asks for fp16")

    # -- launcher, logging, extra ----------------------------------------------------------------------
    if launcher == "local":
        if doc.get("deepspeed_slurm"):
            override("deepspeed_slurm", False,
                     "one node: ranks come from deepspeed.launcher.launch, not from SLURM_PROCID/SLURM_LOCALID")
    else:
        override("launcher", "slurm", "several nodes: srun via DeeperSpeed's SlurmRunner")
        override("deepspeed_slurm", True, "ranks from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS")
        notes.append("launcher slurm needs a DeeperSpeed with SlurmRunner (e650c52f or later, not v1.0's pinned "
                     "eb7f5cff), which json-parses the config: write it with fmt='json'")
    override("log-interval", 1, "one log line per step for train_log.parquet (logging only)")
    for key, value in (extra or {}).items():
        override(str(key), value, "set by the study")

    from retrace.pythia.schedule import save_steps

    header = _header(pub, corrections, gpus, pdbs, gas, mp, world, start_step, steps)
    return NeoXConfig(
        published=pub, doc=doc, header=header, corrections=corrections, overrides=overrides, notes=notes,
        data_parallel=gpus, model_parallel=mp, world_size=world, start_step=start_step, steps=steps,
        save_steps=save_steps(start_step, steps), launcher=launcher,
    )


def write_neox_config(cfg: NeoXConfig, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write ``cfg`` atomically; ``fmt`` None: json for a ``.json`` path, else yaml."""
    path = Path(path)
    if fmt is None:
        fmt = "json" if path.suffix == ".json" else "yaml"
    text = cfg.text(fmt)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _header(pub: PublishedConfig, corrections: list[Correction], gpus: int, pdbs: int, gas: int, mp: int,
            world: int, start: int, steps: int) -> list[str]:
    lines = [
        f"GPT-NeoX {NEOX_VERSION} config written by retrace.neox for one cell.",
        f"published: {pub.repo} {pub.path} @ {pub.commit}",
        f"layout: {gpus} data-parallel × micro {pdbs} × GAS {gas} = {gpus * pdbs * gas} sequences; "
        f"model-parallel {mp}; {world} GPUs",
        f"steps: resume at {start}, stop after {steps}",
        "Every value is the published one unless its comment says retrace changed it.",
    ]
    if corrections:
        lines.append("corrections of the published config:")
        lines += [f"  - {c.key}: {c.reason} [{c.source}]" for c in corrections]
    return lines


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type all the way down (so True is not 1 and 1 is not 1.0)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# -- rendering -------------------------------------------------------------------------------------------
def _float(x: float) -> str:
    """A float YAML 1.1 (PyYAML, GPT-NeoX's loader) and JSON both read as a float: 1e-08 → 1.0e-08."""
    if math.isnan(x) or math.isinf(x):
        raise RetraceError(f"cannot write {x!r} into a GPT-NeoX config")
    text = repr(float(x))
    if "e" in text:
        mant, exp = text.split("e")
        if "." not in mant:
            mant += ".0"
        if exp[0] not in "+-":
            exp = "+" + exp
        text = f"{mant}e{exp}"
    elif "." not in text:  # pragma: no cover - repr always has one of them
        text += ".0"
    return text


def _scalar(value: Any) -> str:
    """One value in flow style (valid YAML and, for these types, JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_scalar(v)}" for k, v in value.items()) + "}"
    raise RetraceError(f"cannot write a {type(value).__name__} ({value!r}) into a GPT-NeoX config")


def _block(key: str, value: Any, indent: int, comment: str | None) -> list[str]:
    pad = " " * indent
    if isinstance(value, Mapping) and value:
        lines = [f"{pad}# {comment}"] if comment else []
        lines.append(f"{pad}{key}:")
        for k, v in value.items():
            lines += _block(str(k), v, indent + 2, None)
        return lines
    line = f"{pad}{key}: {_scalar(value)}"
    return [f"{line}  # {comment}" if comment else line]


def render_yaml(doc: _Doc, header: list[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    added = False
    for e in doc.entries:
        if e.added and not added:
            lines += ["", "# ---- keys added by retrace (not in the published config) ----"]
            added = True
        lines += _block(e.key, e.value, 0, e.comment)
    return "\n".join(lines) + "\n"


def render_json(values: Mapping[str, Any]) -> str:
    """A plain JSON object (no comments), one key per line; also valid YAML for GPT-NeoX's loader."""
    body = ",\n".join(f"  {json.dumps(str(k))}: {_scalar(v)}" for k, v in values.items())
    return "{\n" + body + "\n}\n"
