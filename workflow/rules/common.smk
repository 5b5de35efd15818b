# Shared by every rule: the study (cells), wildcard constraints, paths and the input/param/resource
# functions. All logic is in retrace.grid / retrace.paths (pure Python, unit-tested); these are wrappers.
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

_PKG_DIR = Path(workflow.basedir) / "workflow"
if str(_PKG_DIR) not in sys.path:
    sys.path.insert(0, str(_PKG_DIR))

from retrace import paths as layout
from retrace.grid import CELL_ID_PATTERN, TOKEN, load_study

STUDY = load_study(config, root=workflow.basedir)

# Every retrace command runs the package of this checkout (PYTHONPATH) with the job's Python: the
# activated environment's under --sdm conda, else the interpreter Snakemake itself runs in. It is used
# as a global in the shell commands, not as a param: params are rerun triggers, and moving the checkout
# or the virtualenv must not rerun a study.
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
_PYTHON = "python" if _CONDA else shlex.quote(sys.executable)
RETRACE = f"env PYTHONPATH={shlex.quote(str(_PKG_DIR))}${{PYTHONPATH:+:$PYTHONPATH}} {_PYTHON} -m retrace"
_DEPS = sorted({cell.axes["deps"] for cell in STUDY.cells()})
if len(_DEPS) > 1 and not _CONDA:
    print(
        f"retrace: warning: the study's deps axis has {len(_DEPS)} values ({', '.join(_DEPS)}) but conda "
        "deployment is off, so every cell runs in this Python and the deps axis measures nothing: "
        "run with --sdm conda (envs/ holds one environment per value).",
        file=sys.stderr,
    )
#: The environment of the rules outside the grid's `deps` axis (data, fetch, compare, report): CPU work.
TOOLS_ENV = f"{workflow.basedir}/envs/torch-cpu.yaml"


def hub_env(model):
    """Environment settings (for `env`) that make a local reference's hub cache the one read, offline."""
    if not model.is_local:
        return ""
    return f"HF_HUB_CACHE={shlex.quote(model.hub_cache)} HF_HUB_OFFLINE=1"


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
        f"|| {{{{ s=$?; echo {mark}\" (exit status $s)\" >> {{log:q}}; exit $s; }}}}"
    )


# ---------------------------------------------------------------------------------------- targets


def final_outputs():
    return [
        layout.CELLS_TABLE,
        "results/tables/similarity.parquet",
        "results/report/index.html",
    ]


# ------------------------------------------------------------------------------------------- cells


def cell_of(wildcards):
    return STUDY.cell(wildcards.cell)


def all_similarity_tables(wildcards):
    return [layout.similarity(c) for c in STUDY.cell_ids()]


# -------------------------------------------------------------------------------------------- data


def variant_of(wildcards):
    return STUDY.data[wildcards.variant]


def data_prefix(variant):
    return layout.data_prefix(variant, STUDY.synthetic["seed"])


def data_ready(variant):
    return layout.data_ready(variant, STUDY.synthetic["seed"])


def synth_options(wildcards):
    """`retrace synth` flags from the config's `synthetic` section (seed comes from the path)."""
    flags = {"tokens": "--tokens", "vocab": "--vocab", "seq_length": "--seq-length", "epochs": "--epochs",
             "index_seed": "--index-seed", "dup_copies": "--dup-copies", "planted_share": "--planted-share"}
    return " ".join(f"{flag} {STUDY.synthetic[key]}" for key, flag in flags.items() if key in STUDY.synthetic)


def pile_corpus(wildcards):
    return variant_of(wildcards).corpus


def pile_kind(wildcards):
    return variant_of(wildcards).format


def pile_path(wildcards):
    return variant_of(wildcards).path


def order_record(variant, model):
    """The order maps a model's run on a variant needs (raw data, or preshuffled with shuffle_samples)."""
    if variant.format != "raw" and not variant.shuffle_samples:
        return []
    return [layout.order_record(variant, *model.order_key())]


def order_data_ready(wildcards):
    return data_ready(variant_of(wildcards))


def order_prefix(wildcards):
    return data_prefix(variant_of(wildcards))


def order_kind(wildcards):
    return variant_of(wildcards).format


def order_shuffle(wildcards):
    return "--shuffle-samples" if variant_of(wildcards).shuffle_samples else ""


# ------------------------------------------------------------------------------------- references


def reference_steps_record(cell):
    """The record of every published checkpoint a cell compares with (one input instead of 154)."""
    return layout.reference_steps(cell.model.reference_key, cell.model.start_step, cell.steps)


def reference_step_files(wildcards):
    from retrace.grid import checkpoint_steps

    steps = checkpoint_steps(int(wildcards.first), int(wildcards.last))
    return [layout.reference_file(wildcards.repo, s) for s in steps]


def reference_model(wildcards):
    """A model whose published run is {repo} (all models of one repo share its hub cache)."""
    return next(m for m in STUDY.used_models() if m.reference_key == wildcards.repo)


def built_record(model):
    """A built reference is read only once published (its record is written last); [] for the others."""
    return [layout.built_record(model.name)] if model.build is not None else []


def published_record(wildcards):
    return built_record(reference_model(wildcards))


def fetch_env(wildcards):
    return hub_env(reference_model(wildcards))


def built_model(wildcards):
    model = STUDY.models[wildcards.model]
    if model.build is None:
        raise ValueError(f"model {model.name} has no build section")
    return model


def reference_init_args(wildcards):
    build = next(m.build for m in STUDY.models.values() if m.build and m.build.init_key == wildcards.init)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in build.shape)
    return f"{flags} --seed {build.init_seed}"


def reference_init_config(wildcards):
    return f"{layout.build_init_dir(built_model(wildcards).build.init_key)}/config.json"


def reference_train_inputs(wildcards):
    model = built_model(wildcards)
    return {"init": reference_init_config(wildcards), "data": data_ready(model.build.data),
            "order": order_record(model.build.data, model)}


def reference_train_args(wildcards):
    return shlex.join(STUDY.build_train_args(built_model(wildcards)))


def reference_threads(wildcards):
    lay = built_model(wildcards).build.parallel
    return min(lay.gpus, STUDY.cluster["gpus_per_node"]) * STUDY.cluster["threads_per_rank"]


def reference_repo(wildcards):
    return built_model(wildcards).reference


def reference_hub_cache(wildcards):
    return built_model(wildcards).hub_cache


# ------------------------------------------------------------------------------------------ train


def train_inputs(wildcards):
    cell = cell_of(wildcards)
    return {"data": data_ready(cell.data), "published": built_record(cell.model),
            "order": order_record(cell.data, cell.model)}


def train_args(wildcards):
    """The `retrace train` arguments of a cell (everything but --out and --threads)."""
    return shlex.join(STUDY.train_args(cell_of(wildcards)))


def placement(wildcards):
    """retrace.grid.Placement: what the cell's train job asks for (None: not asked for)."""
    return STUDY.placement(cell_of(wildcards))


def train_threads(wildcards):
    return placement(wildcards).threads


def train_gpu(wildcards, attempt=1):
    return placement(wildcards).gpu


def train_gpu_model(wildcards, attempt=1):
    return placement(wildcards).gpu_model


def train_constraint(wildcards, attempt=1):
    return placement(wildcards).constraint


def train_nodes(wildcards, attempt=1):
    return placement(wildcards).nodes


def train_tasks_per_node(wildcards, attempt=1):
    return placement(wildcards).tasks_per_node


def train_mpi(wildcards, attempt=1):
    return placement(wildcards).mpi


def train_cpus_per_task(wildcards, threads, attempt=1):
    cpus = placement(wildcards).cpus_per_task
    return threads if cpus is None else cpus


def train_slurm_extra(wildcards, attempt=1):
    return placement(wildcards).slurm_extra


def train_launcher(wildcards):
    return placement(wildcards).launcher


def train_env(wildcards):
    return f"{workflow.basedir}/envs/{cell_of(wildcards).deps}.yaml"


# ---------------------------------------------------------------------------------------- compare


def compare_inputs(wildcards):
    cell = cell_of(wildcards)
    return {"manifest": layout.manifest(cell.id), "references": reference_steps_record(cell)}


def compare_reference_dir(wildcards):
    return f"resources/references/{cell_of(wildcards).model.reference_key}"


def compare_reference(wildcards):
    return cell_of(wildcards).model.reference


def cell_env(wildcards):
    return hub_env(cell_of(wildcards).model)


# ----------------------------------------------------------------------------------------- report


def report_documented(wildcards):
    """--documented MODEL=VARIANT for every model whose published data variant the config states."""
    pairs = [f"{m.name}={m.documented}" for m in STUDY.used_models() if m.documented]
    return " ".join(f"--documented {shlex.quote(p)}" for p in pairs)


# ------------------------------------------------------------------------------------------ audit
# The audit target (audit.smk): `retrace audit` over the study's references and audit.repos.

from retrace.errors import RetraceError

AUDIT_PARQUET = "results/audit/audit.parquet"
AUDIT_SUMMARY = "results/audit/summary.txt"


def audit_targets():
    """The audit outputs the default target asks for: both when the study sets audit.in_all, else none."""
    return [AUDIT_PARQUET, AUDIT_SUMMARY] if STUDY.audit["in_all"] else []


def audit_repos():
    """The references the cells train and compare against, then audit.repos, each once."""
    return list(dict.fromkeys([m.reference for m in STUDY.used_models()] + list(STUDY.audit["repos"])))


def audit_cache():
    """The hub cache an all-local study is audited from (offline), or None when every reference is on the Hub."""
    local = sorted({m.hub_cache for m in STUDY.used_models() if m.is_local})
    remote = [m.name for m in STUDY.used_models() if not m.is_local]
    if not local:
        return None
    if remote or len(local) > 1:
        raise RetraceError(
            f"audit: study {STUDY.name} mixes references from the Hub ({', '.join(remote) or 'none'}) and "
            f"local hub caches ({', '.join(local)}); `retrace audit` reads one source, so audit them "
            "separately (retrace audit REPO… [--offline --cache-dir DIR])"
        )
    return local[0]


def audit_published(wildcards):
    """Built references are audited once published into their hub cache."""
    return [r for m in STUDY.used_models() for r in built_record(m)]


def audit_repos_arg(wildcards):
    return shlex.join(audit_repos())


def audit_options(wildcards):
    """--offline --cache-dir and the last published step for local references; --weights if asked."""
    from retrace.grid import local_reference_steps

    flags = []
    cache = audit_cache()
    if cache is not None:
        last = 0
        for m in STUDY.used_models():
            steps = m.build.saved_steps() if m.build is not None else local_reference_steps(m.hub_cache, m.reference)
            last = max([last, *steps])
        flags += ["--offline", "--cache-dir", cache, "--max-step", str(last)]
    if STUDY.audit["weights"]:
        flags.append("--weights")
    return shlex.join(flags)


# ------------------------------------------------------------------------------------- run blocks


def write_cells_table(path, log_path):
    from retrace.io import write_parquet

    frame = STUDY.cells_frame()
    write_parquet(path, frame)
    Path(log_path).write_text(f"{len(frame)} cells of study {STUDY.name} -> {path}\n")


def write_reference_steps(files, path, log_path):
    """One record per (repo, first, last): the fetched checkpoints a compare job reads, with their sizes.
    A compare job depends on it instead of on each of its (up to 154) checkpoints: the same ordering and
    rerun triggers, with 150× fewer edges in the DAG."""
    from retrace.io import write_json

    write_json(path, {"files": {f: Path(f).stat().st_size for f in files}})
    Path(log_path).write_text(f"{len(files)} checkpoints -> {path}\n")


def prepare_pile_variant(wildcards, params, output, log_path):
    """Download and merge (or check a copy of) one Pile variant; the JSON record is written last."""
    from retrace.data.variants import prepare_variant
    from retrace.io import write_json

    with open(log_path, "w") as fh:
        prefix = prepare_variant(params.data, params.kind, params.dest, path=params.path,
                                 log=lambda msg: print(msg, file=fh, flush=True))
        print(f"{wildcards.variant}: {prefix}", file=fh)
    write_json(output[0], {"variant": wildcards.variant, "prefix": str(prefix)})
