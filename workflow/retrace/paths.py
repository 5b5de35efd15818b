"""Where the workflow writes: every path of a study on disk, relative to the directory Snakemake runs in.

Paths::

    results/cells.parquet                              the cells table (retrace.grid.CELL_COLUMNS)
    results/runs/<cell>/checkpoints/step{N}.safetensors  the cell's checkpoints (kept across failures)
    results/runs/<cell>/checkpoints/manifest.json      written last by `retrace train`: training is done
    results/runs/<cell>/state/                         optimizer/scaler/RNG/data position for resuming
    results/runs/<cell>/similarity.parquet             `retrace compare-run`: one row per step
    results/runs/<cell>/similarity_tensors.parquet     ... and one row per step and tensor
    results/logs/<rule>/<cell>.log                     the log of each rule's job for that cell
    results/tables/, results/report/                   aggregate and report
    resources/data/..., resources/references/<repo>/step{N}.safetensors (+ steps{A}-{B}.json records)
    resources/training_states/<repo>/step{N}/          a GPT-NeoX training checkpoint with its ZeRO-1
                                                       state (`latest`, global_step{N}/), a segment's start
"""

from __future__ import annotations

from retrace import rundir

RESULTS = "results"
RESOURCES = "resources"
CELLS_TABLE = f"{RESULTS}/cells.parquet"
#: The last line a rule writes to its log when its command fails.
FAILURE_MARK = "retrace-workflow: FAILED"


def run_dir(cell: str) -> str:
    return f"{RESULTS}/runs/{cell}"


def manifest(cell: str) -> str:
    return f"{run_dir(cell)}/{rundir.MANIFEST}"


def similarity(cell: str) -> str:
    return f"{run_dir(cell)}/{rundir.SIMILARITY}"


def similarity_tensors(cell: str) -> str:
    return f"{run_dir(cell)}/{rundir.SIMILARITY_TENSORS}"


def log(rule: str, name: str) -> str:
    return f"{RESULTS}/logs/{rule}/{name}.log"


#: The file prefix `retrace synth` gives each variant under DIR/<corpus>/<format>/.
SYNTH_NAME = "document"


def synthetic_dir(seed: int) -> str:
    return f"{RESOURCES}/data/synthetic/s{seed}"


def data_prefix(variant, synthetic_seed: int) -> str:
    """The .bin/.idx prefix of a data variant (``retrace train --data``)."""
    if variant.source == "synthetic":
        return f"{synthetic_dir(synthetic_seed)}/{variant.corpus}/{variant.format}/{SYNTH_NAME}"
    from retrace.data.variants import variant_source

    # Hub shards and `path:` copies alike are read through the manifest the pile_data rule writes here.
    return f"{pile_dir(variant)}/{variant_source(variant.corpus, variant.format).name}"


def pile_dir(variant) -> str:
    """Where a Pile variant's record and shard manifest live (the data itself stays in the Hub cache, or
    in the copy ``path:`` names)."""
    return f"{RESOURCES}/data/pile/{variant.name}"


def data_ready(variant, synthetic_seed: int) -> str:
    """The file written last when a variant's data is complete (what its train jobs wait for)."""
    if variant.source == "synthetic":
        return f"{synthetic_dir(synthetic_seed)}/manifest.json"
    return f"{RESOURCES}/data/pile/{variant.name}.json"


def order_dir(variant) -> str:
    """The cache of a variant's order maps (GPT-NeoX's file names), never beside the data."""
    return f"{RESOURCES}/order/{variant.name}"


def order_record(variant, num_samples: int, seq_length: int) -> str:
    """The record of the order maps of (variant, sample count, sequence length, order seed)."""
    return f"{order_dir(variant)}/ns{num_samples}_sl{seq_length}_s{variant.order_seed}.json"


def built_record(model_name: str) -> str:
    """Written last by reference_publish: a built reference's checkpoints are in its hub cache."""
    return f"{RESOURCES}/build/{model_name}/published.json"


def build_init_dir(init_key: str) -> str:
    return f"{RESOURCES}/build/init/{init_key}"


def build_run_dir(model_name: str) -> str:
    """The run directory of a built reference's training (``reference_train``)."""
    return f"{RESOURCES}/build/{model_name}/run"


def reference_dir(key: str) -> str:
    return f"{RESOURCES}/references/{key}"


def reference_file(key: str, step: int) -> str:
    return f"{reference_dir(key)}/{rundir.checkpoint_name(step)}"


def training_state_dir(key: str, step: int) -> str:
    """The staged GPT-NeoX training checkpoint of published step ``step`` (``fetch_training_state``)."""
    return f"{RESOURCES}/training_states/{key}/step{int(step)}"


def reference_steps(key: str, first: int, last: int) -> str:
    """The record that every published checkpoint from ``first`` to ``last`` (Pythia schedule) is fetched."""
    return f"{reference_dir(key)}/steps{first}-{last}.json"


def findings(key: str) -> str:
    """A published repo's audit findings (``retrace.audit.gate``): one metadata read, shared by its cells."""
    return f"{RESOURCES}/audit/{key}/findings.json"


def start_gate(model_name: str) -> str:
    """The record that a model's start step passed the reference hygiene gate."""
    return f"{RESULTS}/provenance/{model_name}/start-gate.json"
