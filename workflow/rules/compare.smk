# Similarity: ONE job per cell over all its checkpoints (not one per step: 154 steps × 500 cells would
# be 77,000 jobs), against the published checkpoints fetched once per (repo, step) into resources/.


rule compare:
    input:
        unpack(compare_inputs),
    output:
        table="results/runs/{cell}/similarity.parquet",
        tensors="results/runs/{cell}/similarity_tensors.parquet",
    log:
        "results/logs/compare/{cell}.log",
    params:
        env=cell_env,
        run="results/runs/{cell}",
        reference=compare_reference,
        reference_dir=compare_reference_dir,
    threads: 1
    conda:
        TOOLS_ENV
    shell:
        logged(
            "env {params.env} {RETRACE} compare-run --run {params.run:q} --reference {params.reference:q}"
            " --reference-dir {params.reference_dir:q} --out {output.table:q} --tensors-out {output.tensors:q}"
        )
