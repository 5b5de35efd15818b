# The study's tables and report: the cells table, every cell's tables joined with its axes, and the
# report (verdict, factor tables, trajectories) that `snakemake --report` also collects. These are
# small and run where Snakemake runs (localrule), not as cluster jobs.


rule cells_table:
    output:
        report(
            layout.CELLS_TABLE,
            caption="../report/cells.rst",
            category="Study",
            labels={"table": "cells"},
        ),
    log:
        "results/logs/cells_table/cells.log",
    localrule: True
    params:
        # the cell ids: adding a cell changes this parameter, which reruns the table (and what reads it)
        cells=STUDY.cell_ids(),
    run:
        jobs.write_cells_table(STUDY, output[0], log[0])


rule aggregate:
    input:
        cells=layout.CELLS_TABLE,
        similarity=all_similarity_tables,
    output:
        similarity=report(
            "results/tables/similarity.parquet",
            caption="../report/similarity.rst",
            category="Tables",
            labels={"table": "similarity"},
        ),
        tensors=report(
            "results/tables/similarity_tensors.parquet",
            caption="../report/similarity_tensors.rst",
            category="Tables",
            labels={"table": "similarity per tensor"},
        ),
        train_log=report(
            "results/tables/train_log.parquet",
            caption="../report/train_log.rst",
            category="Tables",
            labels={"table": "train log"},
        ),
    log:
        "results/logs/aggregate/aggregate.log",
    localrule: True
    conda:
        TOOLS_ENV
    shell:
        logged(
            "retrace aggregate --cells {input.cells:q} --runs results/runs --out results/tables"
        )


rule report:
    input:
        similarity="results/tables/similarity.parquet",
        tensors="results/tables/similarity_tensors.parquet",
        train_log="results/tables/train_log.parquet",
        # the "Versus other generations" section, when the study sets cross_generation (compare.smk)
        cross_generation=cross_generation_targets(),
        # the fetched references, whose repo, commit and verification the report lists
        references=all_reference_records(),
        # the Provenance section: first divergent steps, flagged published steps (provenance.smk)
        divergence="results/tables/divergence.parquet",
        flagged="results/tables/flagged_steps.parquet",
    output:
        index=report(
            "results/report/index.html",
            caption="../report/report.rst",
            category="Report",
            labels={"page": "index"},
        ),
        verdict=report(
            "results/report/verdict.txt",
            caption="../report/verdict.rst",
            category="Report",
            labels={"page": "verdict"},
        ),
        tables=report(
            directory("results/report/tables"),
            patterns=["{name}.csv"],
            caption="../report/factor_tables.rst",
            category="Factor tables",
        ),
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            caption="../report/trajectories.rst",
            category="Figures",
        ),
    log:
        "results/logs/report/report.log",
    localrule: True
    conda:
        TOOLS_ENV
    params:
        documented=report_documented,
        references=report_references,
        primary_step=report_primary_step,
    shell:
        logged(
            "retrace report --tables results/tables --out results/report {params.documented} {params.references}"
            " {params.primary_step}"
        )
