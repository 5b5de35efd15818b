"""The published GPT-NeoX configs of the Pythia suite, held as a facts table (no file is read).

Source: the ``models/*/*.yml`` configs of EleutherAI/pythia at commit
a19eecb807ec2c79a39ebf18108816e6ffffc1d5 (2025-11-15), read 2026-11; reference/pythia-neox.md §1-§4.
The table below restates what those configs set, in our own structure: ``_COMMON`` holds the settings
every config shares, ``_RUNS`` what differs per size, ``_SMALL_CLUSTER``/``_LARGE_LAYOUT`` the two
groups of configs written differently, and ``_VARIANT_VALUES`` the one per-variant difference beyond
the data path. ``published_config`` assembles one config with its keys in the published order and
published spelling (``rotary-pct`` vs ``rotary_pct``), so a generated GPT-NeoX config lists them as
the published one does.

The table keeps the published inconsistencies on purpose; ``retrace.neox.config`` corrects them,
explicitly, each as a ``Correction``:

* ``pythia-12b-deduped``: 40 layers and 36 heads (a typo; the model has 36 and 40);
* ``pythia-1b``: lr 0.00025 (README table: 3.0e-4) and the fp16 block (the run was bf16, README);
* ``6.9b``/``12b``: no ``init_method``/``output_layer_init_method`` (v1.0's defaults normal and
  scaled_normal were used; README erratum, pythia#135);
* ``14m``/``31m``: data paths in the deduped directory with the standard file name.

One fact about the published text is reported here as a ``Correction`` too: ``models/12B/pythia-12b.yml``
is not valid YAML (no comma after ``"attention-config": [[["flash"], 36]]``, since pythia commit 6e9a44b
of 2023-01-23), so GPT-NeoX v1.0's ``yaml.load`` refuses it as published.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from retrace.errors import RetraceError

PYTHIA_REPO = "EleutherAI/pythia"
PYTHIA_COMMIT = "a19eecb807ec2c79a39ebf18108816e6ffffc1d5"
PYTHIA_READ = "2026-11"

#: Sizes with a published config; 14m and 31m have no deduped run.
PUBLISHED_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
NO_DEDUPED = ("14m", "31m")


# -- the facts -----------------------------------------------------------------------------------------------
# Keys are GPT-NeoX v1.0 argument names ('_' form); ``_spelling`` gives the published spelling.

#: Settings every published config holds with the same value.
_COMMON: dict[str, Any] = {
    "seq_length": 2048,
    "max_position_embeddings": 2048,
    "pos_emb": "rotary",
    "rotary_pct": 0.25,
    "no_weight_tying": True,
    "gpt_j_residual": True,
    "output_layer_parallelism": "column",
    "scaled_upper_triang_masked_softmax_fusion": True,
    "bias_gelu_fusion": True,
    "data_impl": "mmap",
    "checkpoint_num_layers": 1,
    "synchronize_each_layer": True,
    "gradient_clipping": 1.0,
    "weight_decay": 0.1,
    "hidden_dropout": 0,
    "attention_dropout": 0,
    "fp16": {
        "fp16": True,
        "enabled": True,
        "loss_scale": 0,  # dynamic
        "loss_scale_window": 1000,
        "initial_scale_power": 12,  # initial scale 4096
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "train_iters": 143_000,
    "lr_decay_iters": 143_000,
    "distributed_backend": "nccl",
    "lr_decay_style": "cosine",
    "warmup": 0.01,
    "checkpoint_factor": 1000,
    "extra_save_iters": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    "eval_iters": 10,
    "log_interval": 10,
    "steps_per_print": 10,
    "wall_clock_breakdown": True,
    "tokenizer_type": "HFTokenizer",
}

#: The optimizer block, lr aside (``optimizer.params.lr`` is per size).
_ADAM_TYPE = "Adam"
_ADAM_BETAS = (0.9, 0.95)
_ADAM_EPS = 1.0e-8

#: The ZeRO block, stage and bucket sizes aside (allgather and reduce buckets are equal in every config).
_ZERO_FLAGS = {"allgather_partitions": True, "overlap_comm": True, "reduce_scatter": True,
               "contiguous_gradients": True, "cpu_offload": False}


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one size's config sets that the others may not."""

    layers: int
    hidden: int
    heads: int
    lr: float
    min_lr: float
    micro: int  # train_micro_batch_size_per_gpu
    gas: int  # written as "gas" (14m-2.8b) or "gradient_accumulation_steps" (6.9b, 12b)
    pp: int  # pipe-parallel-size
    mp: int  # model-parallel-size
    zero_stage: int
    bucket: int  # allgather_bucket_size = reduce_bucket_size
    eval_interval: int


_RUNS: dict[str, _Run] = {
    #            layers hidden heads lr        min_lr     micro gas pp mp zero bucket         eval
    "14m": _Run(6, 128, 4, 0.001, 0.0001, 32, 1, 0, 1, 0, 50_000_000, 100_000),
    "31m": _Run(6, 256, 8, 0.001, 0.0001, 32, 1, 0, 1, 0, 500_000_000, 100_000),
    "70m": _Run(6, 512, 8, 0.001, 0.0001, 32, 1, 1, 1, 1, 500_000_000, 100_000),
    "160m": _Run(12, 768, 12, 0.0006, 0.00006, 32, 1, 1, 1, 1, 500_000_000, 40_000),
    "410m": _Run(24, 1024, 16, 0.0003, 0.00003, 32, 1, 1, 1, 1, 500_000_000, 40_000),
    "1b": _Run(16, 2048, 8, 0.00025, 0.000025, 16, 1, 1, 1, 1, 500_000_000, 40_000),  # README: lr 3.0e-4
    "1.4b": _Run(24, 2048, 16, 0.0002, 0.00002, 16, 1, 1, 1, 1, 500_000_000, 40_000),
    "2.8b": _Run(32, 2560, 32, 0.00016, 0.000016, 16, 1, 1, 1, 1, 500_000_000, 40_000),
    "6.9b": _Run(32, 4096, 32, 0.00012, 0.000012, 8, 2, 1, 2, 1, 1_260_000_000, 1000),
    "12b": _Run(36, 5120, 40, 0.00012, 0.000012, 8, 2, 1, 4, 1, 1_260_000_000, 1000),
}

#: Init methods of every size but 6.9b/12b, whose configs have no init keys.
_INIT = {"init_method": "small_init", "output_layer_init_method": "wang_init"}

#: Data and tokenizer paths of the runs on the main cluster (``launcher: slurm``).
_FSX = {"standard": "/fsx/pile/pile_20B_tokenizer_text_document",
        "deduped": "/fsx/pile_deduped/pile_0.87_deduped_text_document",
        "vocab": "/fsx/pile/20B_tokenizer.json"}

#: 14m and 31m were configured for another machine: no SLURM launcher keys, no activation
#: checkpointing, their own num_workers, and a data path in the deduped directory with the standard
#: file name (the README lists them as standard-Pile models).
_SMALL_CLUSTER: dict[str, dict[str, Any]] = {
    "14m": {"num_workers": 4},
    "31m": {"num_workers": 2},
}
_SMALL_DATA = "/mnt/ssd-2/pile_deduped/pile_20B_tokenizer_text_document"
_SMALL_VOCAB = "/mnt/ssd-2/pile/20B_tokenizer.json"

#: 6.9b and 12b are written differently: ``norm`` present, ``gradient_accumulation_steps`` instead of
#: ``gas``, no ``num_workers``, no init keys, and four keys spelled with '_' (``_UNDERSCORED_IN_LARGE``).
_LARGE_LAYOUT = ("6.9b", "12b")
_LARGE_ONLY = {"norm": "layernorm"}

#: Values one variant publishes beyond its size's: pythia-12b-deduped.yml's layer/head typo (its
#: attention-config still says 36 layers).
_VARIANT_VALUES: dict[str, dict[str, Any]] = {
    "pythia-12b-deduped": {"num_layers": 40, "num_attention_heads": 36},
}

# -- published order and spelling ----------------------------------------------------------------------------
#: Every key any config holds, in the order the configs list them.
_ORDER = (
    "pipe_parallel_size", "model_parallel_size",
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings", "norm",
    "pos_emb", "rotary_pct", "no_weight_tying", "gpt_j_residual", "output_layer_parallelism",
    "attention_config", "scaled_upper_triang_masked_softmax_fusion", "bias_gelu_fusion",
    "init_method", "output_layer_init_method",
    "optimizer", "min_lr", "zero_optimization",
    "train_micro_batch_size_per_gpu", "gas", "gradient_accumulation_steps", "data_impl", "num_workers",
    "checkpoint_activations", "checkpoint_num_layers", "partition_activations", "synchronize_each_layer",
    "gradient_clipping", "weight_decay", "hidden_dropout", "attention_dropout",
    "fp16",
    "train_iters", "lr_decay_iters", "distributed_backend", "lr_decay_style", "warmup", "checkpoint_factor",
    "extra_save_iters", "eval_interval", "eval_iters",
    "log_interval", "steps_per_print", "wall_clock_breakdown",
    "train_data_paths", "valid_data_paths", "test_data_paths",
    "tokenizer_type", "vocab_file",
    "launcher", "deepspeed_slurm",
)

#: Keys every config spells with '-' (the rest are spelled with '_').
_DASHED = frozenset({
    "pipe_parallel_size", "model_parallel_size", "num_layers", "hidden_size", "num_attention_heads",
    "seq_length", "max_position_embeddings", "pos_emb", "no_weight_tying", "attention_config",
    "scaled_upper_triang_masked_softmax_fusion", "bias_gelu_fusion", "data_impl", "checkpoint_activations",
    "checkpoint_num_layers", "partition_activations", "synchronize_each_layer", "weight_decay",
    "hidden_dropout", "attention_dropout", "train_iters", "lr_decay_iters", "distributed_backend",
    "lr_decay_style", "checkpoint_factor", "extra_save_iters", "eval_interval", "eval_iters", "log_interval",
    "train_data_paths", "valid_data_paths", "test_data_paths", "vocab_file",
})
#: Keys spelled with '-' except in the 6.9b/12b configs.
_UNDERSCORED_IN_LARGE = frozenset({"rotary_pct", "gpt_j_residual", "output_layer_parallelism", "tokenizer_type"})


def _spelling(key: str, large: bool) -> str:
    if key in _DASHED or (key in _UNDERSCORED_IN_LARGE and not large):
        return key.replace("_", "-")
    return key


def _published_values(size: str, deduped: bool) -> dict[str, Any]:
    """One config's values ('_' keys), assembled from the table."""
    run = _RUNS[size]
    large = size in _LARGE_LAYOUT
    small = size in _SMALL_CLUSTER
    v: dict[str, Any] = dict(_COMMON)
    v.update({
        "pipe_parallel_size": run.pp,
        "model_parallel_size": run.mp,
        "num_layers": run.layers,
        "hidden_size": run.hidden,
        "num_attention_heads": run.heads,
        "attention_config": [[["flash"], run.layers]],
        "optimizer": {"type": _ADAM_TYPE,
                      "params": {"lr": run.lr, "betas": list(_ADAM_BETAS), "eps": _ADAM_EPS}},
        "min_lr": run.min_lr,
        "zero_optimization": {"stage": run.zero_stage, **{
            k: run.bucket if k.endswith("bucket_size") else _ZERO_FLAGS[k]
            for k in ("allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
                      "reduce_bucket_size", "contiguous_gradients", "cpu_offload")}},
        "train_micro_batch_size_per_gpu": run.micro,
        ("gradient_accumulation_steps" if large else "gas"): run.gas,
        "checkpoint_activations": not small,
        "partition_activations": not small,
        "eval_interval": run.eval_interval,
    })
    if large:
        v.update(_LARGE_ONLY)
    else:
        v.update(_INIT)
        v["num_workers"] = 1
    if small:
        v.update(_SMALL_CLUSTER[size])
        data, vocab = _SMALL_DATA, _SMALL_VOCAB
    else:
        v.update({"launcher": "slurm", "deepspeed_slurm": True})
        data, vocab = _FSX["deduped" if deduped else "standard"], _FSX["vocab"]
    v.update({"train_data_paths": [data], "valid_data_paths": [data], "test_data_paths": [data],
              "vocab_file": vocab})
    v.update(_VARIANT_VALUES.get(published_name(size, deduped), {}))
    unknown = set(v) - set(_ORDER)
    if unknown:  # pragma: no cover - the table and the order list are edited together
        raise RetraceError(f"retrace.neox.published: keys {sorted(unknown)} have no place in the published order")
    return {_spelling(k, large): copy.deepcopy(v[k]) for k in _ORDER if k in v}


# -- the public API ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Correction:
    """One documented fix to a published config value, applied explicitly.

    ``key`` is the GPT-NeoX argument (underscore form, as v1.0 reads it); ``published`` is the value the
    yml holds (None when the key is absent), ``value`` the one written; ``source`` says where the fact
    comes from.
    """

    key: str
    published: Any
    value: Any
    reason: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"{self.key}: {self.published!r} -> {self.value!r} ({self.reason}; {self.source})"


@dataclasses.dataclass(frozen=True)
class PublishedConfig:
    """A published Pythia config: its key/values in published order (keys spelled as published)."""

    name: str  # "pythia-70m-deduped"
    size: str  # "70m"
    deduped: bool
    repo: str
    path: str  # path in the repo, e.g. models/70M/pythia-70m-deduped.yml
    commit: str
    values: dict[str, Any]
    corrections: tuple[Correction, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.repo} {self.path} @ {self.commit}"

    @property
    def file(self) -> str:
        """The published file these values restate, for messages (nothing is read from it)."""
        return f"{self.repo}:{self.path}@{self.commit[:8]}"

    def normalized(self) -> dict[str, Any]:
        """Keys as GPT-NeoX v1.0 sees them ('-' → '_')."""
        return {normalize_key(k): v for k, v in self.values.items()}


def normalize_key(key: str) -> str:
    """GPT-NeoX v1.0 ``NeoXArgs.from_ymls``: ``conf_key.replace("-", "_")``."""
    return str(key).replace("-", "_")


def published_name(size: str, deduped: bool = False) -> str:
    return f"pythia-{size}{'-deduped' if deduped else ''}"


def published_path(size: str, deduped: bool = False) -> str:
    """The config's path in EleutherAI/pythia: ``models/1.4B/pythia-1.4b-deduped.yml``."""
    return f"models/{size.upper()}/{published_name(size, deduped)}.yml"


def _syntax_corrections(name: str, source: str) -> tuple[Correction, ...]:
    if name != "pythia-12b":
        return ()
    return (Correction(
        "attention_config", '"attention-config": [[["flash"], 36]]', '"attention-config": [[["flash"], 36]],',
        "the published yml is not valid YAML: no comma after attention-config (since pythia commit "
        "6e9a44b, 2023-01-23); GPT-NeoX's yaml.load refuses it, so the comma is inserted",
        source),)


def published_config(size: str, deduped: bool = False) -> PublishedConfig:
    """The published config of ``pythia-{size}[-deduped]`` (size as in ``retrace.pythia.sizes``: "70m", "1.4b")."""
    from retrace.pythia.sizes import pythia_size

    key = pythia_size(size)
    if key not in PUBLISHED_SIZES:  # pragma: no cover - the registry and this list hold the same sizes
        raise RetraceError(f"no published GPT-NeoX config for pythia-{key}")
    if deduped and key in NO_DEDUPED:
        raise RetraceError(f"pythia-{key} has no deduped run (EleutherAI published only the standard one)")
    name, path = published_name(key, deduped), published_path(key, deduped)
    return PublishedConfig(
        name=name, size=key, deduped=deduped, repo=PYTHIA_REPO, path=path, commit=PYTHIA_COMMIT,
        values=_published_values(key, deduped),
        corrections=_syntax_corrections(name, f"{PYTHIA_REPO} {path} @ {PYTHIA_COMMIT[:8]}"),
    )
