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
    input:
        # a copy the study tokenizes itself (study key tokenize) is read once written
        pile_inputs,
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


# A corpus published only as jsonl (the standard Pile), tokenized by the workflow (study key `tokenize`):
# GPT-NeoX v1.0's preprocess_data.py --append-eod with the model's tokenizer.json, resumable, atomic.


rule tokenize:
    input:
        unpack(tokenize_inputs),
    output:
        bin="{prefix}.bin",
        idx="{prefix}.idx",
    log:
        "results/logs/tokenize/{prefix}.log",
    wildcard_constraints:
        prefix=rebuilt.tokenize_prefix_pattern(STUDY),
    conda:
        TOOLS_ENV
    threads: tokenize_threads
    shell:
        logged(
            "retrace tokenize --input {input.jsonl:q} --tokenizer {input.tokenizer:q} --workers {threads}"
            " --output {wildcards.prefix:q}"
        )


# The gate before training on an order rebuilt over such a corpus (study key `order_check`): the index
# maps over it must give the published preshuffled stream item for item; the record is written only on
# a match, and every cell on a raw variant over the same copy waits for it.


rule order_check:
    input:
        unpack(order_check_inputs),
    output:
        "resources/order_check/{variant}.json",
    log:
        "results/logs/order_check/{variant}.log",
    localrule: True
    conda:
        TOOLS_ENV
    threads: 1
    params:
        flags=order_check_job,
    shell:
        logged("retrace order-check {params.flags} --out {output:q}")
