# Shared by every rule: the study (its cells), wildcard constraints, and the input, param and resource
# functions. Only functions live here; the logic they call is in the retrace package (unit-tested):
# retrace.grid (the study), retrace.launch (a run's spec), retrace.placement (its resources),
# retrace.paths and retrace.rundir (where things are written), retrace.jobs (the local jobs).
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

sys.path.insert(
    0, str(Path(workflow.basedir) / "workflow")
)  # this checkout's package, first

from retrace import forensics_target, jobs, launch, plan, rebuilt
from retrace import paths as layout
from retrace import rundir
from retrace.grid import CELL_ID_PATTERN, TOKEN, load_study
from retrace.placement import (
    VARIES,
    gpu_limit_error,
    place,
    shared_resources,
    train_placement,
)
from retrace.pythia.schedule import save_steps
from retrace.signatures import remember_signatures, rule_functions

STUDY = load_study(config, root=workflow.basedir)
#: Each cell's train placement (retrace.placement), computed once: its job's threads, resources and
#: launcher read it (at 5,000 cells a placement per job and resource was seconds of DAG time).
PLACEMENTS = {
    c.id: train_placement(cell=c, cluster=STUDY.cluster) for c in STUDY.cells()
}

# The rules call `retrace` (workflow/bin/retrace), which runs this checkout's package under the job's Python,
# the activated environment's under --sdm conda, else the interpreter Snakemake itself runs in. It is
# set up once here for every shell command (not as params: params are rerun triggers, and moving the
# checkout or the virtualenv must not rerun a study).
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
_PYTHON = "python" if _CONDA else sys.executable
_BIN = Path(workflow.basedir) / "workflow" / "bin"
shell.prefix(
    f'set -euo pipefail; export PATH={shlex.quote(str(_BIN))}:"$PATH" RETRACE_PYTHON={shlex.quote(_PYTHON)}; '
)
_DEPS = sorted({cell.deps for cell in STUDY.cells()})
if len(_DEPS) > 1 and not _CONDA:
    print(
        f"retrace: warning: the study's deps axis has {len(_DEPS)} values ({', '.join(_DEPS)}) but conda "
        "deployment is off, so every cell runs in this Python and the deps axis measures nothing: "
        "run with --sdm conda (envs/ holds one environment per value).",
        file=sys.stderr,
    )
#: The environment of the rules outside the grid's `deps` axis (data, fetch, compare, report): CPU work.
TOOLS_ENV = f"{workflow.basedir}/envs/torch-cpu.yaml"
#: A cell's run directory, as a pattern of the {cell} wildcard.
RUN = layout.run_dir("{cell}")
AUDIT_PARQUET = "results/audit/audit.parquet"
AUDIT_SUMMARY = "results/audit/summary.txt"
CROSS_GENERATION_TABLE = "results/tables/cross_generation.parquet"


wildcard_constraints:
    cell=CELL_ID_PATTERN,
    repo=r"[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*",
    step=r"\d+",
    first=r"\d+",
    last=r"\d+",
    seed=r"\d+",
    variant=TOKEN,
    model=TOKEN,
    init=TOKEN,
    num_samples=r"\d+",
    seq_length=r"\d+",
    order_seed=r"\d+",


def logged(command):
    """A shell command writing stdout+stderr to {log}; on failure it appends layout.FAILURE_MARK (which
    `retrace cells` reads) and exits with the command's status."""
    mark = shlex.quote(layout.FAILURE_MARK)
    return (
        f"({command}) > {{log:q}} 2>&1 "
        f'|| {{{{ s=$?; echo {mark}" (exit status $s)" >> {{log:q}}; exit $s; }}}}'
    )


def hub_env(model):
    """Environment settings (for `env`) that make a local reference's hub cache the one read, offline."""
    if not model.is_local:
        return ""
    return f"HF_HUB_CACHE={shlex.quote(model.hub_cache)} HF_HUB_OFFLINE=1"


# ---------------------------------------------------------------------------------------- targets


def final_outputs():
    return [
        layout.CELLS_TABLE,
        "results/tables/similarity.parquet",
        "results/report/index.html",
    ]


def audit_targets():
    """The audit outputs the default target asks for: both when the study sets audit.in_all, else none."""
    return [AUDIT_PARQUET, AUDIT_SUMMARY] if STUDY.audit["in_all"] else []


def cross_generation_targets():
    """The table when the study sets `cross_generation` (an optional input of the report), else none."""
    return [CROSS_GENERATION_TABLE] if jobs.cross_generation_entries(STUDY) else []


# ------------------------------------------------------------------------------------------- cells


def cell_of(wildcards):
    return STUDY.cell(wildcards.cell)


def all_similarity_tables(wildcards):
    return [layout.similarity(c) for c in STUDY.cell_ids()]


# -------------------------------------------------------------------------------------------- data


def variant_of(wildcards):
    return STUDY.data[wildcards.variant]


def data_ready(variant):
    return layout.data_ready(variant, STUDY.synthetic["seed"])


def synth_options(wildcards):
    """`retrace synth` flags from the config's `synthetic` section (seed comes from the path)."""
    flags = {
        "tokens": "--tokens",
        "vocab": "--vocab",
        "seq_length": "--seq-length",
        "epochs": "--epochs",
        "index_seed": "--index-seed",
        "dup_copies": "--dup-copies",
        "planted_share": "--planted-share",
    }
    return " ".join(
        f"{flag} {STUDY.synthetic[key]}"
        for key, flag in flags.items()
        if key in STUDY.synthetic
    )


def pile_dest(wildcards):
    return layout.pile_dir(variant_of(wildcards))


def pile_source(wildcards):
    v = variant_of(wildcards)
    return {
        "corpus": v.corpus,
        "format": v.format,
        "path": v.path,
        **jobs.pile_needs(STUDY, wildcards.variant),
    }


def pile_inputs(wildcards):
    """A variant whose copy the study tokenizes itself waits for PREFIX.bin/.idx (retrace.rebuilt)."""
    return rebuilt.tokenized_inputs(STUDY, variant_of(wildcards))


def tokenize_inputs(wildcards):
    entry = rebuilt.tokenize_entry(STUDY, wildcards.prefix)
    return {"jsonl": list(entry["input"]), "tokenizer": entry["tokenizer"]}


def tokenize_threads(wildcards):
    return int(rebuilt.tokenize_entry(STUDY, wildcards.prefix).get("workers", 1))


def order_check_model(variant):
    """A model trained on the raw variant: its (num_samples, seq_length) name the maps to check."""
    for cell in STUDY.cells():
        if cell.data.name == variant.name:
            return cell.model
    raise ValueError(f"order_check: no cell trains on {variant.name!r}")


def order_check_inputs(wildcards):
    entry = rebuilt.order_check_entry(STUDY, wildcards.variant)
    raw, pre = STUDY.data[entry["raw"]], STUDY.data[entry["preshuffled"]]
    return {
        "raw": data_ready(raw),
        "preshuffled": data_ready(pre),
        "maps": order_record(raw, order_check_model(raw)),
    }


def order_check_job(wildcards):
    """The `retrace order-check` flags of one entry: both prefixes, the maps' key, the items compared."""
    entry = rebuilt.order_check_entry(STUDY, wildcards.variant)
    raw, pre = STUDY.data[entry["raw"]], STUDY.data[entry["preshuffled"]]
    num_samples, seq_length = order_check_model(raw).order_key()
    seed = STUDY.synthetic["seed"]
    return " ".join(
        [
            f"--raw {shlex.quote(layout.data_prefix(raw, seed))}",
            f"--preshuffled {shlex.quote(layout.data_prefix(pre, seed))}",
            f"--seed {entry['seed']} --num-samples {num_samples} --seq-length {seq_length}",
            f"--items {entry['items']} --start {entry['start']}",
            f"--maps-dir {shlex.quote(layout.order_dir(raw))}",
        ]
    )


def order_record(variant, model):
    """The order maps a model's run on a variant needs (raw data, or preshuffled with shuffle_samples)."""
    if variant.format != "raw" and not variant.shuffle_samples:
        return []
    return [layout.order_record(variant, *model.order_key())]


def order_data_ready(wildcards):
    return data_ready(variant_of(wildcards))


def order_prefix(wildcards):
    return layout.data_prefix(variant_of(wildcards), STUDY.synthetic["seed"])


def order_kind(wildcards):
    return variant_of(wildcards).format


def order_shuffle(wildcards):
    return "--shuffle-samples" if variant_of(wildcards).shuffle_samples else ""


# ------------------------------------------------------------------------------------- references


def reference_steps_record(cell):
    """The record of every published checkpoint a cell compares with (one input instead of 154)."""
    return layout.reference_steps(
        cell.model.reference_key, cell.model.start_step, cell.steps
    )


def all_reference_records():
    """Every (repo, steps) record the study's cells compare with, each once (the report lists them)."""
    return sorted({reference_steps_record(c) for c in STUDY.cells()})


def report_references(wildcards, input):
    """``--references DIR`` for each fetched repo the report lists the provenance of."""
    dirs = sorted({str(Path(r).parent) for r in input.references})
    return " ".join(f"--references {shlex.quote(d)}" for d in dirs)


def reference_step_files(wildcards):
    steps = save_steps(int(wildcards.first), int(wildcards.last))
    return [layout.reference_file(wildcards.repo, s) for s in steps]


def reference_model(wildcards):
    """A model whose published run is {repo} (all models of one repo share its hub cache)."""
    return next(m for m in STUDY.used_models() if m.reference_key == wildcards.repo)


def built_record(model):
    """A built reference is read only once published (its record is written last); [] for the others."""
    return [layout.built_record(model.build_name)] if model.build is not None else []


def published_record(wildcards):
    return built_record(reference_model(wildcards))


def fetch_env(wildcards):
    return hub_env(reference_model(wildcards))


def built_model(wildcards):
    return STUDY.models[wildcards.model]


def reference_init_args(wildcards):
    build = next(
        m.build
        for m in STUDY.models.values()
        if m.build and m.build.init_key == wildcards.init
    )
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in build.shape)
    return f"{flags} --seed {build.init_seed}"


def reference_init_config(wildcards):
    return f"{layout.build_init_dir(built_model(wildcards).build.init_key)}/config.json"


def reference_train_inputs(wildcards):
    model = built_model(wildcards)
    return {
        "init": reference_init_config(wildcards),
        "data": data_ready(model.build.data),
        "order": order_record(model.build.data, model),
    }


def reference_train_spec(wildcards):
    """The built reference's training settings (retrace.spec.TrainConfig) as one JSON param."""
    return launch.build_spec(STUDY, built_model(wildcards)).to_json()


def reference_threads(wildcards):
    build = built_model(wildcards).build
    return place(
        gpus=build.parallel.gpus, gpu_type="cpu", cluster=STUDY.cluster
    ).threads


def reference_repo(wildcards):
    return built_model(wildcards).reference


def reference_publish_flags(wildcards):
    return launch.publish_flags(built_model(wildcards))


def reference_hub_cache(wildcards):
    return built_model(wildcards).hub_cache


# ------------------------------------------------------------------------------------------ train


def train_inputs(wildcards):
    """Data, order maps and the staged start checkpoint (fetched once, verified, where Snakemake runs)."""
    cell = cell_of(wildcards)
    return {
        "data": data_ready(cell.data),
        "published": built_record(cell.model),
        "order": order_record(cell.data, cell.model),
        "start": launch.start_weights(cell),
        # a rebuilt corpus must reproduce the published stream first (study key order_check), and the
        # model's start step must pass the reference hygiene gate (models.<name>.accept overrides it)
        "gate": [
            *rebuilt.gate_for(STUDY, cell.data),
            layout.start_gate(cell.model.name),
        ],
        # re-anchored segments read every published checkpoint they reach (its fetched file)
        "reanchor": reference_steps_record(cell) if cell.reanchor else [],
    }


def train_job(wildcards):
    """The cell's train command in one param (one function per job keeps a 5,000-cell DAG fast): its
    settings (retrace.spec, as JSON: a changed setting reruns the cell), the retrace subcommand (`train`,
    or `neox-run` for engine neox), what starts the ranks (srun across nodes; nothing for GPT-NeoX, which
    starts its own) and the hub settings of a local reference."""
    cell = cell_of(wildcards)
    command = launch.train_command(cell)
    launcher = "" if command == "neox-run" else placement(wildcards).launcher
    return {
        "spec": launch.train_spec(STUDY, cell).to_json(),
        "command": command,
        "launcher": launcher,
        "env": hub_env(cell.model),
    }


def gpu_limit_stop(cell_id, where):
    """Why the cell must not start under this run's --resources gpu=N limit, or None: Snakemake would
    start it on fewer GPUs (retrace.placement.gpu_limit_error)."""
    limit = workflow.global_resources.get("gpu").value
    if not workflow.is_main_process or limit is None:
        return None
    return gpu_limit_error(cell_id=cell_id, placement=where, gpu_limit=int(limit))


def placement(wildcards):
    """retrace.placement.Placement: what the cell's train job asks for. Under a --resources gpu=N limit
    a cell needing more stops the workflow, naming the cell, when its job is scheduled.
    """
    where = PLACEMENTS[cell_of(wildcards).id]
    error = gpu_limit_stop(wildcards.cell, where)
    if error:
        raise WorkflowError(error)
    return where


def train_threads():
    """The train rule's threads: one number where every cell's placement has the same, else a function
    of the cell. A function also where some cell needs more GPUs than this run allows: it is what stops
    the workflow at that cell's job (placement), and only if the job is scheduled."""
    threads = {p.threads for p in PLACEMENTS.values()}
    if len(threads) == 1 and not any(
        gpu_limit_stop(i, p) for i, p in PLACEMENTS.items()
    ):
        return threads.pop()
    return cell_threads


def cell_threads(wildcards):
    return placement(wildcards).threads


def train_resources():
    """The train rule's resources: those some cell's placement sets, each one value where every cell
    asks the same (retrace.placement.shared_resources), else a function of the cell's placement.
    """
    shared = shared_resources(list(PLACEMENTS.values()))
    return {
        name: train_resource(name) if value is VARIES else value
        for name, value in shared.items()
    }


def train_resource(name):
    """The train rule's resource ``name`` (gpu, nodes, slurm_extra …) from the cell's placement."""

    def value(wildcards, threads=None, attempt=1):
        return placement(wildcards).resource(name, threads)

    remember_signatures(functions=[value])
    return value


def train_env(wildcards):
    return f"{workflow.basedir}/envs/{cell_of(wildcards).deps}.yaml"


# ---------------------------------------------------------------------------------------- compare


def compare_inputs(wildcards):
    cell = cell_of(wildcards)
    return {
        "manifest": layout.manifest(cell.id),
        "references": reference_steps_record(cell),
        "findings": layout.findings(cell.model.reference_key),
    }


def compare_job(wildcards):
    """The published reference a cell is compared with: repo, fetched directory, hub settings."""
    model = cell_of(wildcards).model
    return {
        "reference": model.reference,
        "reference_dir": layout.reference_dir(model.reference_key),
        "env": hub_env(model),
        "findings": layout.findings(model.reference_key),
        "accept": " ".join(f"--accept {shlex.quote(b)}" for b in model.accept),
    }


def cross_generation_published(wildcards):
    """Built local references are read once published into their hub cache."""
    return sorted(
        {
            r
            for e in jobs.cross_generation_entries(STUDY)
            for m in jobs.cross_generation_models(STUDY, e)
            for r in built_record(m)
        }
    )


# ----------------------------------------------------------------------------------------- report


def report_documented(wildcards):
    """--documented MODEL=VARIANT for every model whose published data variant the config states."""
    pairs = [f"{m.name}={m.documented}" for m in STUDY.used_models() if m.documented]
    return " ".join(f"--documented {shlex.quote(p)}" for p in pairs)


def report_primary_step(wildcards):
    """--primary-step N when the study declares the verdict's primary step (else Holm over all steps)."""
    step = config.get("verdict", {}).get("primary_step")
    return "" if step is None else f"--primary-step {int(step)}"


# ------------------------------------------------------------------------------------------ audit


def gate_findings(wildcards):
    return layout.findings(STUDY.used_model(wildcards.model).reference_key)


def gate_accept(wildcards):
    return list(STUDY.used_model(wildcards.model).accept)


def audit_published(wildcards):
    """Built references are audited once published into their hub cache."""
    return [r for m in STUDY.used_models() for r in built_record(m)]


def audit_repos_arg(wildcards):
    return shlex.join(jobs.audit_repos(STUDY))


def audit_options(wildcards):
    return shlex.join(jobs.audit_options(STUDY))


# Last: Snakemake inspects a function's signature at every call (seconds at 5,000 cells); each function
# above keeps its own, computed once (retrace.signatures).
remember_signatures(
    functions=rule_functions(namespace=globals(), directory=workflow.current_basedir)
)
