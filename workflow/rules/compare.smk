# Similarity: ONE job per cell over all its checkpoints (not one per step: 154 steps × 500 cells would
# be 77,000 jobs), against the published checkpoints fetched once per (repo, step) into resources/.


rule compare:
    input:
        unpack(compare_inputs),
    output:
        table=f"{RUN}/{rundir.SIMILARITY}",
        tensors=f"{RUN}/{rundir.SIMILARITY_TENSORS}",
    log:
        layout.log("compare", "{cell}"),
    conda:
        TOOLS_ENV
    threads: 1
    params:
        # the published reference: repo, fetched directory, hub settings
        job=compare_job,
        run=RUN,
    shell:
        logged(
            "env {params.job[env]} retrace compare-run --run {params.run:q} --reference {params.job[reference]:q}"
            " --reference-dir {params.job[reference_dir]:q} --out {output.table:q} --tensors-out {output.tensors:q}"
            " --findings {params.job[findings]:q} {params.job[accept]}"
        )


# Versus other generations (optional study key `cross_generation`): each listed published model against
# other repos at the same steps (`retrace cross-compare`), one table for the report's "Versus other
# generations" section. A step that a repo lacks is recorded as missing, not a failure. Where Snakemake
# runs (localrule): it reads the Hub (or the hub cache of local references), like the audit.


rule cross_generation:
    input:
        published=cross_generation_published,
    output:
        report(
            CROSS_GENERATION_TABLE,
            caption="../report/similarity.rst",
            category="Tables",
            labels={"table": "versus other generations"},
        ),
    log:
        "results/logs/cross_generation/cross_generation.log",
    localrule: True
    params:
        # the entries (repos and steps): changing them reruns the table
        entries=jobs.cross_generation_entries(STUDY),
    run:
        jobs.write_cross_generation(STUDY, output[0], log[0])


# Step-0 forensics (optional study key `forensics`): each listed repo's checkpoint at a step against other
# repos' (`retrace compare --forensics`): identical, same scheme with another RNG, different scheme...
# Where Snakemake runs (localrule), reading the Hub or a local reference's hub cache, like the audit.


rule forensics:
    output:
        json=forensics_target.FORENSICS_JSON,
        text=forensics_target.FORENSICS_TEXT,
    log:
        "results/logs/forensics/forensics.log",
    localrule: True
    params:
        # the pairs: changing them reruns the target
        entries=forensics_target.forensics_entries(STUDY),
    run:
        forensics_target.write_forensics(STUDY, output.json, output.text, log[0])
