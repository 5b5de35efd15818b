# Data: the variants cells train on, and the GPT-NeoX order maps built once per (variant, sample count,
# sequence length, order seed) before the cells that share them start.


# The synthetic corpus (seconds of CPU) is made where Snakemake runs; so are Pile downloads (compute
# nodes often cannot reach the Hub). Order maps of a real corpus take minutes and GBs: a cluster job.
rule synth_data:
    output:
        "resources/data/synthetic/s{seed}/manifest.json",
    log:
        "results/logs/synth_data/s{seed}.log",
    params:
        out="resources/data/synthetic/s{seed}",
        options=synth_options,
    threads: 1
    localrule: True
    conda:
        TOOLS_ENV
    shell:
        logged("{RETRACE} synth --out {params.out:q} --seed {wildcards.seed} {params.options}")


rule pile_data:
    output:
        "resources/data/pile/{variant}.json",
    log:
        "results/logs/pile_data/{variant}.log",
    params:
        data=pile_corpus,
        kind=pile_kind,
        path=pile_path,
        dest="resources/data/pile/{variant}",
    threads: 1
    resources:
        # one slot per download: `--resources downloads=4` caps parallel Hub downloads
        downloads=1,
    localrule: True
    run:
        prepare_pile_variant(wildcards, params, output, log[0])


rule order_maps:
    input:
        data=order_data_ready,
    output:
        "resources/order/{variant}/ns{num_samples}_sl{seq_length}_s{order_seed}.json",
    log:
        "results/logs/order_maps/{variant}/ns{num_samples}_sl{seq_length}_s{order_seed}.log",
    params:
        prefix=order_prefix,
        kind=order_kind,
        shuffle=order_shuffle,
    threads: 1
    conda:
        TOOLS_ENV
    shell:
        logged(
            "{RETRACE} order --data {params.prefix:q} --kind {params.kind} {params.shuffle}"
            " --num-samples {wildcards.num_samples} --seq-length {wildcards.seq_length}"
            " --seed {wildcards.order_seed} --marker {output:q}"
        )
