# The reference hygiene gate (retrace.audit.gate): each published repo is audited once from metadata
# (the Hub's, or its local hub cache's), and its findings are shared by every cell of the repo. A model
# whose start step is flagged stops at start_gate, before any training job, with one message naming the
# repo, the branch, the finding and the key that overrides it (models.<name>.accept); the compare jobs
# leave flagged steps out and the report lists them.


rule reference_findings:
    input:
        published=published_record,
    output:
        layout.findings("{repo}"),
    log:
        "results/logs/reference_findings/{repo}.log",
    # Hub metadata requests, where Snakemake runs (compute nodes often cannot reach the Hub)
    localrule: True
    run:
        jobs.write_reference_findings(STUDY, wildcards.repo, output[0], log[0])


rule start_gate:
    input:
        findings=gate_findings,
    output:
        layout.start_gate("{model}"),
    log:
        "results/logs/start_gate/{model}.log",
    localrule: True
    params:
        # changing what the study accepts reruns the gate
        accept=gate_accept,
    run:
        jobs.check_start_gate(STUDY, wildcards.model, input.findings, output[0], log[0])


# Where each cell first stops being bit-identical to its baseline cell (and a built reference's run),
# from the per-step fingerprints in the train logs, and the flagged steps: two tables for the report.


rule provenance_tables:
    input:
        manifests=[layout.manifest(c) for c in STUDY.cell_ids()],
        findings=sorted({layout.findings(m.reference_key) for m in STUDY.used_models()}),
    output:
        divergence=report(
            "results/tables/divergence.parquet",
            caption="../report/provenance.rst",
            category="Tables",
            labels={"table": "first divergent step"},
        ),
        flagged="results/tables/flagged_steps.parquet",
    log:
        "results/logs/provenance_tables/provenance.log",
    localrule: True
    run:
        jobs.write_provenance_tables(STUDY, output.divergence, output.flagged, log[0])
