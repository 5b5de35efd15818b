# The audit target (`snakemake audit`): `retrace audit` over the study's published references (and the
# extra repos of `audit.repos`): revisions whose weights are byte-identical to another revision or repo,
# revisions missing from the Pythia schedule, weight formats that change. From Hub metadata (no weights
# downloaded) where Snakemake runs, or offline from the hub cache of local references. Not part of
# `rule all` unless the study sets `audit.in_all: true`; a finding is a result, not a failure.
# Its input/param functions are in common.smk (audit section).


rule audit:
    input:
        published=audit_published,
    output:
        parquet=report(
            AUDIT_PARQUET,
            caption="../report/audit.rst",
            category="Audit",
            labels={"file": "audit table"},
        ),
        summary=report(
            AUDIT_SUMMARY,
            caption="../report/audit.rst",
            category="Audit",
            labels={"file": "audit summary"},
        ),
    log:
        "results/logs/audit/audit.log",
    # Hub metadata requests, where Snakemake runs (compute nodes often cannot reach the Hub)
    localrule: True
    conda:
        TOOLS_ENV
    threads: 1
    params:
        repos=audit_repos_arg,
        options=audit_options,
    shell:
        logged(
            "retrace audit {params.repos} {params.options} --parquet {output.parquet:q}"
            " --summary {output.summary:q} --quiet"
        )
