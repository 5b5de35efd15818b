"""A cell's training settings, written once: the specs the trainer runs and everything derived from them.

``TrainConfig`` (``retrace train``: the builtin and DeepSpeed engines) and ``NeoXRunConfig``
(``retrace neox-run``: GPT-NeoX v1.0 itself) are the single source of a run's settings. From their
fields, and nothing else, come:

* the command line: one flag per field (``--start-step`` for ``start_step``), with the help text, metavar
  and choices of the field's metadata (``add_arguments``, ``from_arguments``);
* the workflow's argument: the cell's spec as one JSON object (``to_json``), a Snakemake param of the
  train rule, so that a changed setting reruns the cell (``retrace train --spec JSON``);
* run.json's ``arguments`` (``to_dict``) and the resume fingerprint (fields marked ``resume``, see
  ``TrainConfig.fingerprint``);
* the recipe, resolved in one place (``TrainConfig.resolve_recipe``), by the grid and by the trainer.

A new setting is one field here (plus its key in the study schema when a study may set it): the grid
passes study and model keys that name a field straight through (``retrace.launch``).

This module is torch-free: the workflow's DAG reads it for every job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retrace.errors import RetraceError
from retrace.pythia.constants import DATA_FORMATS, PRECISIONS, SEED
from retrace.pythia.recipes import PYTHIA_RECIPES, Recipe, recipe_for
from retrace.pythia.sizes import ATTENTION_KINDS, GELU_KINDS, ROTARY_ANGLE_KINDS

#: The engines of ``retrace train``; a cell may also name ``neox`` (GPT-NeoX itself, ``retrace neox-run``).
TRAIN_ENGINES = ("builtin", "deepspeed")
ENGINES = (*TRAIN_ENGINES, "neox")
DEVICES = ("auto", "cpu", "cuda")
#: Apex's Adam step counter after resuming from a GPT-NeoX checkpoint with ZeRO state (reference §7 item 2):
#: continue = as if the original run never restarted (t = applied updates + 1); neox = as GPT-NeoX +
#: DeeperSpeed's elastic checkpoint resumes (t restarts at 1, only the moments are restored).
ADAM_RESUME_MODES = ("continue", "neox")
LAUNCHERS = ("local", "slurm")
NEOX_RUNTIMES = ("apptainer", "singularity", "docker")


def setting(help: str, *, default: Any = dataclasses.MISSING, metavar: str | None = None,
            choices: Sequence[str] | None = None, resume: bool = True, cell: bool = True,
            cli: bool = True, factory: Any = dataclasses.MISSING) -> Any:
    """A spec field with its command-line help.

    Args:
        help: the flag's help text (also the field's documentation).
        default: the default value; omit for a required setting.
        metavar, choices: shown by ``--help``; ``choices`` are also checked.
        resume: part of the resume fingerprint (a state of a run that differs in it is refused).
        cell: part of a cell's spec (the workflow's JSON); False for where and how a run executes
            (``out``, ``threads``), which the rule passes itself.
        cli: offered as a flag.
        factory: a default factory, for mutable defaults.
    """
    meta = {"help": help, "metavar": metavar, "choices": tuple(choices) if choices else None,
            "resume": resume, "cell": cell, "cli": cli}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One run of ``retrace train``: what to resume, on which data, in which layout, precision and engine,
    until which step."""

    reference: str = setting("start weights: a local path (written ./… or /…), or org/repo (the start step "
                             "selects org/repo@step{N}), or org/repo@rev", metavar="SRC")
    data: str = setting("tokenized data prefix (PREFIX.bin/.idx)", metavar="PREFIX")
    out: str = setting("the run directory", metavar="DIR", cell=False, resume=False)
    steps: int = setting("the step the run ends at (an absolute step number, like the published branches)",
                         resume=False)
    start_step: int = setting("published step to resume from", default=0)
    data_kind: str = setting("raw: GPT-NeoX v1.0's index maps order the documents; preshuffled: the stream "
                             "is the order", default="preshuffled", choices=DATA_FORMATS)
    shuffle_samples: bool = setting("permute preshuffled items with --order-seed", default=False)
    order_seed: int = setting("seed of the data order (GPT-NeoX: 1234)", default=SEED)
    adam_resume: str = setting(
        "Adam's step counter after resuming a GPT-NeoX checkpoint with ZeRO state: continue = as if the "
        "original never restarted (default: where the published runs restarted is not published, and a "
        "restart more than a few hundred updates back is indistinguishable from none); neox = as GPT-NeoX "
        "itself resumes (DeeperSpeed's elastic checkpoint restarts the counter)", default="continue",
        choices=ADAM_RESUME_MODES)
    order_cache: str | None = setting("directory of the cached index maps (GPT-NeoX's file names; `retrace "
                                      "order` builds them); default: built in memory", default=None,
                                      metavar="DIR", resume=False)
    gpus: int = setting("data-parallel ranks", default=1)
    pdbs: int | None = setting("micro batch per rank (default: the recipe's)", default=None)
    gas: int | None = setting("gradient accumulation steps (default: the recipe's)", default=None)
    global_batch: int | None = setting("override the recipe's 1024 sequences per step", default=None,
                                       resume=False)
    seq_length: int | None = setting("override the recipe's 2048 tokens per sequence", default=None, resume=False)
    attention: str = setting("flash: PyTorch SDPA; global: GPT-NeoX's explicit softmax", default="flash",
                             choices=ATTENTION_KINDS)
    precision: str | None = setting("default: the recipe's (fp16; bf16 for 1b)", default=None, choices=PRECISIONS)
    engine: str = setting("builtin: retrace's GPT-NeoX v1.0 arithmetic; deepspeed: today's DeepSpeed ZeRO-1",
                          default="builtin", choices=TRAIN_ENGINES)
    seed: int = setting("torch seed of the run (dropout is 0 in Pythia, so it changes nothing today)",
                        default=SEED, resume=False)
    recipe: str | None = setting("Pythia size whose recipe to use (default: from the reference's shape)",
                                 default=None, metavar="SIZE", resume=False)
    lr: float | None = setting("peak learning rate (default: the recipe's)", default=None, resume=False)
    min_lr: float | None = setting("learning-rate floor (default: the recipe's)", default=None, resume=False)
    warmup_iters: int | None = setting("warmup updates W (default: 0.01·train_iters)", default=None, resume=False)
    train_iters: int | None = setting("E, the original run's length (143000)", default=None, resume=False)
    threads: int | None = setting("torch threads per rank (default: cores / local ranks); fix it for "
                                  "bit-reproducible runs", default=None, cell=False, resume=False)
    device: str = setting("where to train (the workflow passes the cell's: cuda for a GPU cell, else cpu; the "
                          "device type that ran is part of the resume fingerprint)", default="auto",
                          choices=DEVICES, resume=False)
    gpu_names: list[str] | None = setting(
        "on CUDA, torch.cuda.get_device_name() must match one of these (case and punctuation ignored, every "
        "word of a name found in the device's; the workflow passes the cell's gpu_type and its "
        "cluster.gpu_models name); repeatable; default: any GPU", default=None, metavar="NAME", resume=False)
    deterministic: bool = setting(
        "deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, cuDNN "
        "deterministic, TF32 off, NCCL_ALGO=Ring and NCCL_PROTO=Simple unless set): two runs of one cell on "
        "the same node type are bitwise equal (retrace.train.determinism)", default=True)
    published: str | None = setting(
        "the published run this cell reproduces (org/repo), recorded in run.json, the manifest and the "
        "checkpoints when --reference is a local copy of its start step (the workflow's staged "
        "resources/references/<repo>/step{N}.safetensors)", default=None, metavar="REPO", resume=False)
    save_timeout_s: int | None = setting(
        "seconds a rank waits for the others' saves (rank 0's checkpoint, every rank's state shard) and "
        "the process group's collective timeout; default: sized from the model (retrace.placement."
        "save_timeout_s)", default=None, metavar="S", resume=False)
    stop_lead_s: int | None = setting(
        "under SLURM, save and stop this many seconds before the job's end time (SLURM_JOB_END_TIME, else "
        "squeue), as on SIGUSR2; default: sized from the model (retrace.placement.stop_lead_s); 0: never",
        default=None, metavar="S", resume=False)
    checkpoint_activations: bool = setting("recompute layers in backward (memory only)", default=False,
                                           resume=False)
    rotary_angles: str = setting("neox: half-precision rotary angles as GPT-NeoX v1.0 under DeepSpeed",
                                 default="neox", choices=ROTARY_ANGLE_KINDS)
    gelu: str = setting("tanh: the fused approximation Pythia trained with (HF configs say erf)",
                        default="tanh", choices=GELU_KINDS)
    simulate_ranks: bool = setting(
        "run the --gpus ranks one after another in this process (builtin engine): each rank's fp16 gradients "
        "accumulate over its gas micro-batches, then are summed in rank order and averaged, as the all-reduce "
        "would (bitwise for 2 ranks; with more, the all-reduce may associate the sum differently)", default=False)
    keep_states: int = setting("resume states to keep", default=2, resume=False)
    save_steps: list[int] | None = setting("comma-separated steps to save instead of the Pythia schedule "
                                           "(start and end always)", default=None, resume=False)
    reanchor: str | None = setting(
        "directory of the published run's step{N}.safetensors: after the checkpoint of each saved step, the "
        "weights become the published ones (optimizer state, loss scale and data position kept), so each "
        "segment is measured without the compounding of earlier ones (retrace.train.reanchor)",
        default=None, metavar="DIR")
    progress: bool = setting("progress lines on stderr", default=True, resume=False, cell=False)
    extra: dict = setting("test hooks", factory=dict, resume=False, cli=False, cell=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return _from_mapping(cls, d, where="train config")

    def to_json(self) -> str:
        """The cell's settings (fields with ``cell``) as canonical JSON: the train rule's param."""
        return to_json(self)

    def check(self) -> None:
        """Every check that needs nothing but the settings (choices, ranges).

        Raises:
            RetraceError: naming the flag.
        """
        _check_choices(self, "train config")
        if self.gpus < 1:
            raise RetraceError(f"--gpus must be ≥ 1, got {self.gpus}")
        if self.start_step < 0:
            raise RetraceError(f"--start-step must be ≥ 0, got {self.start_step}")
        for name in ("save_timeout_s", "stop_lead_s"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "stop_lead_s" else 1):
                raise RetraceError(f"--{name.replace('_', '-')} must be ≥ {0 if name == 'stop_lead_s' else 1}, "
                                   f"got {value}")
        if self.steps <= self.start_step:
            raise RetraceError(f"--steps ({self.steps}) must be after --start-step ({self.start_step}): "
                               "it is the step number the run ends at")

    def resolve_recipe(self, hf_config: Mapping[str, Any] | None = None) -> Recipe:
        """The recipe named by ``recipe`` or inferred from the reference's shape, with this spec's overrides.

        The one place a run's recipe is worked out: the grid calls it for each cell (with the size it
        knows), the trainer with the reference's config.json.
        """
        return resolve_recipe(self.to_dict(), hf_config, reference=self.reference)

    def resolved(self, recipe: Recipe) -> TrainConfig:
        """This spec with the recipe's micro batch, gas and precision filled in where unset."""
        return dataclasses.replace(self, pdbs=self.pdbs if self.pdbs is not None else recipe.micro_batch,
                                   gas=self.gas if self.gas is not None else recipe.gas,
                                   precision=recipe.precision)

    def fingerprint(self, recipe: Recipe, device: str | None = None) -> dict[str, Any]:
        """What a resume state must match: every ``resume`` field (micro batch, gas and precision as the
        recipe resolves them), the recipe itself and, given, the device type the run computes on
        (``cuda``/``cpu``: a state written on a GPU is not continued on the CPU, or the reverse)."""
        spec = self.resolved(recipe)
        out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.metadata["resume"]}
        out["recipe"] = recipe.to_dict()
        if device is not None:
            out["device"] = device
        return json.loads(json.dumps(out))


@dataclass
class NeoXRunConfig:
    """One run of ``retrace neox-run``: a cell trained by GPT-NeoX v1.0 itself from the published weights."""

    reference: str = setting("start weights: a local path (./… or /…), org/repo (with --start-step: "
                             "org/repo@step{N}) or org/repo@rev", metavar="SRC")
    data: str = setting("raw tokenized corpus prefix (…_text_document)", metavar="PREFIX")
    out: str = setting("the run directory", metavar="DIR", cell=False)
    steps: int = setting("the step the run ends at (absolute step number)")
    pdbs: int = setting("micro batch per rank")
    gas: int = setting("gradient accumulation steps")
    start_step: int = setting("published step to start from", default=0)
    data_kind: str = setting("must be raw: GPT-NeoX v1.0 builds and shuffles its own index maps", default="raw",
                             choices=DATA_FORMATS)
    gpus: int = setting("data-parallel ranks", default=1)
    attention: str = setting("GPT-NeoX attention config", default="flash", choices=ATTENTION_KINDS)
    precision: str | None = setting("default: the published one (bf16 for 1b)", default=None, choices=PRECISIONS)
    seed: int = setting("GPT-NeoX seed (init, and the index maps)", default=SEED)
    size: str | None = setting("Pythia size of the published config (default: from --reference's name or shape)",
                               default=None)
    deduped: bool = setting("the deduped run's published config", default=False)
    launcher: str = setting("local: DeepSpeed's runner; slurm: DeeperSpeed's srun launcher", default="local",
                            choices=LAUNCHERS)
    gpus_per_node: int | None = setting("needed for --launcher slurm", default=None)
    vocab_file: str | None = setting("the GPT-NeoX tokenizer file on this machine", default=None)
    neox_path: str | None = setting("the gpt-neox v1.0 checkout (deepy.py)", default=None, metavar="DIR")
    neox_container: str | None = setting("Apptainer/Singularity or Docker image", default=None)
    neox_runtime: str = setting("container runtime", default="apptainer", choices=NEOX_RUNTIMES)
    neox_conda_env: str | None = setting("conda environment (instead of a container)", default=None)
    neox_python: str = setting("python inside the environment", default="python")
    neox_bind: list[str] = setting("extra path the container must see (repeatable)", factory=list,
                                   metavar="PATH")
    threads: int | None = setting("accepted for the train rule's command line; GPT-NeoX sets its own threads",
                                  default=None, cell=False)
    dry_run: bool = setting("write the load directory and config, print the command, run nothing",
                            default=False, cell=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeoXRunConfig:
        return _from_mapping(cls, d, where="neox-run config")

    def to_json(self) -> str:
        return to_json(self)

    def neox_env(self) -> dict[str, Any]:
        """The ``neox_*`` fields as a study's ``neox:`` mapping (``retrace.neox.runner.NeoXEnv.from_config``)."""
        env: dict[str, Any] = {"path": self.neox_path, "runtime": self.neox_runtime, "python": self.neox_python,
                               "binds": list(self.neox_bind)}
        if self.neox_container:
            env["container"] = self.neox_container
        if self.neox_conda_env:
            env["conda_env"] = self.neox_conda_env
        return env


Spec = TrainConfig | NeoXRunConfig


#: The settings that override a recipe, by TrainConfig field name (= Recipe field name).
RECIPE_OVERRIDES = ("global_batch", "seq_length", "lr", "min_lr", "warmup_iters", "train_iters", "precision")


def resolve_recipe(settings: Mapping[str, Any], hf_config: Mapping[str, Any] | None = None, *,
                   reference: str = "") -> Recipe:
    """The recipe of ``settings["recipe"]`` (a Pythia size; None: inferred from ``hf_config``'s shape)
    with the ``RECIPE_OVERRIDES`` that ``settings`` sets (None = not set).

    Raises:
        RetraceError: unknown size, or a shape that is no Pythia size.
    """
    size = settings.get("recipe")
    if size is None:
        size = infer_size(hf_config, reference)
    return recipe_for(size, **{k: settings.get(k) for k in RECIPE_OVERRIDES})


def infer_size(hf_config: Mapping[str, Any] | None, reference: str) -> str:
    """The Pythia size whose shape (layers, hidden, heads) ``hf_config`` has.

    Raises:
        RetraceError: the shape is no Pythia size (or there is no config), naming ``--recipe``.
    """
    from retrace.pythia.sizes import PYTHIA_SIZES, config_from_hf

    if hf_config is not None:
        try:
            mc = config_from_hf(hf_config)
        except RetraceError:
            mc = None
        if mc is not None:
            for name, ref in PYTHIA_SIZES.items():
                if (ref.n_layers, ref.hidden, ref.heads) == (mc.n_layers, mc.hidden, mc.heads) and name in PYTHIA_RECIPES:
                    return name
    raise RetraceError(
        f"cannot infer the Pythia recipe from {reference!r} (its shape is no Pythia size); "
        f"pass --recipe SIZE (one of {', '.join(PYTHIA_RECIPES)}) and any overrides"
    )


# -- derived: JSON -------------------------------------------------------------------------------------
def cell_fields(cls: type) -> list[str]:
    """The fields of a spec class that a cell sets (``cell`` metadata)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata["cell"]]


def to_json(spec: Spec) -> str:
    """The cell's part of a spec as canonical JSON (sorted keys, defaults included)."""
    return json.dumps({name: getattr(spec, name) for name in cell_fields(type(spec))}, sort_keys=True)


def _from_mapping(cls: type, d: Mapping[str, Any], *, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RetraceError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RetraceError(f"{where}: missing required setting(s) "
                           + ", ".join(f"{n} (--{n.replace('_', '-')})" for n in missing))
    spec = cls(**d)
    _check_choices(spec, where)
    return spec


def _check_choices(spec: Any, where: str) -> None:
    for f in dataclasses.fields(spec):
        choices, value = f.metadata["choices"], getattr(spec, f.name)
        if choices and value is not None and value not in choices:
            raise RetraceError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}"
                               f" ({where})")


# -- derived: the command line -------------------------------------------------------------------------
def _base_type(hint: Any) -> Any:
    """``int | None`` → int; ``list[int] | None`` → list[int]."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _list_of(item: type, flag: str):
    def parse(text: str) -> list:
        try:
            return [item(s.strip()) for s in text.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated list of {item.__name__}, "
                                             f"got {text!r}") from None
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per ``cli`` field of ``cls``, plus ``--spec JSON`` (a cell's settings, e.g. from the
    workflow) that the flags given on the command line override."""
    parser.add_argument("--spec", default=argparse.SUPPRESS, metavar="JSON",
                        help="the cell's settings as one JSON object (or @FILE); flags given beside it override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if required else f" (default: {f.default if f.default_factory is dataclasses.MISSING else []})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": meta["help"] + ("" if kind is bool else shown)}
        if kind is bool:
            if f.default is True:
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", **kwargs)
            else:
                parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if typing.get_origin(kind) is list and typing.get_args(kind)[0] is str:
            kwargs["action"] = "append"  # repeatable: paths may hold commas
        elif typing.get_origin(kind) is list:
            kwargs["type"] = _list_of(typing.get_args(kind)[0], flag)
        else:
            kwargs["type"] = kind
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """The spec of a parsed command line: ``--spec`` first, then the flags given (see ``add_arguments``).

    Raises:
        RetraceError: ``--spec`` is not a JSON object, names an unknown setting, or a required setting
            is given neither way.
    """
    given = {k: v for k, v in vars(args).items() if k not in ("spec", "func", "command")}
    base: dict[str, Any] = {}
    if hasattr(args, "spec"):
        text = args.spec
        if text.startswith("@"):
            try:
                with open(text[1:], encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as exc:
                raise RetraceError(f"--spec {args.spec}: {exc.strerror}") from None
        try:
            base = json.loads(text)
        except ValueError as exc:
            raise RetraceError(f"--spec: not JSON: {exc}") from None
        if not isinstance(base, dict):
            raise RetraceError(f"--spec: expected a JSON object of settings, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return _from_mapping(cls, {**base, **{k: v for k, v in given.items() if k in names}}, where="--spec")
