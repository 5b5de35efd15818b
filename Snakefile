# retrace: reproduce published pretraining runs over a grid of conditions and measure the distance to
# the published checkpoints. The grid logic lives in workflow/retrace/grid.py; this file only wires it.
#
#   snakemake --cores 2                                   the embedded study (config.yaml), on this machine
#   snakemake --profile profiles/slurm --configfile studies/pythia-70m-control.yaml
#   retrace cells                                         each cell and its state (done/failed/running/pending)
#   snakemake audit                                       audit the published references (retrace audit)
from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default study, unless a study is given with --configfile (then that study alone: the
# directive would otherwise merge config.yaml's models and axes into it).
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config.yaml"


report: "workflow/report/workflow.rst"


# common.smk loads the study with retrace.grid.load_study: the schema below plus the checks a schema
# cannot express (global batch, env files, start steps), each failing with one message naming the key.
include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/data.smk"
include: "workflow/rules/references.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/provenance.smk"


onstart:
    # what the study will cost (retrace.plan): downloads, disk, per-GPU memory, GPU-hours
    print(plan.render(plan.study_plan(STUDY), max_cells=20), file=sys.stderr)


rule all:
    default_target: True
    input:
        final_outputs(),
        # `snakemake audit` audits the published references; part of `all` only with audit.in_all
        audit_targets(),
        # step-0 forensics of the study's `forensics` pairs, when it has some
        forensics_target.forensics_targets(STUDY),
