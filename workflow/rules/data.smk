# Data: the variants cells train on, and the GPT-NeoX order maps built once per (variant, sample count,
# sequence length, order seed) before the cells that share them start.


# The synthetic corpus (seconds of CPU) is made where Snakemake runs; so are Pile downloads (compute
# nodes often cannot reach the Hub). Order maps of a real corpus take minutes and GBs: a cluster job.
rule synth_data:
    output:
        "resources/data/synthetic/s{seed}/manifest.json",
    log:
        "results/logs/synth_data/s{seed}.log",
    localrule: True
    conda:
        TOOLS_ENV
    threads: 1
    params:
        out="resources/data/synthetic/s{seed}",
        options=synth_options,
    shell:
        logged(
            "retrace synth --out {params.out:q} --seed {wildcards.seed} {params.options}"
        )


rule pile_data:
    output:
        "resources/data/pile/{variant}.json",
    log:
        "results/logs/pile_data/{variant}.log",
    localrule: True
    threads: 1
    resources:
        # one slot per download: `--resources downloads=4` caps parallel Hub downloads
        downloads=1,
    params:
        # what the variant is and which items the cells read: a study that trains further fetches more
        source=pile_source,
        dest=pile_dest,
    run:
        jobs.prepare_pile_variant(
            STUDY, wildcards.variant, params.dest, output[0], log[0]
        )


rule order_maps:
    input:
        data=order_data_ready,
    output:
        "resources/order/{variant}/ns{num_samples}_sl{seq_length}_s{order_seed}.json",
    log:
        "results/logs/order_maps/{variant}/ns{num_samples}_sl{seq_length}_s{order_seed}.log",
    conda:
        TOOLS_ENV
    threads: 1
    params:
        prefix=order_prefix,
        kind=order_kind,
        shuffle=order_shuffle,
    shell:
        logged(
            "retrace order --data {params.prefix:q} --kind {params.kind} {params.shuffle}"
            " --num-samples {wildcards.num_samples} --seq-length {wildcards.seq_length}"
            " --seed {wildcards.order_seed} --cache-dir resources/order/{wildcards.variant} --marker {output:q}"
        )
