# Published checkpoints: fetched once per (repo, step) and shared by every cell that compares with them.
# Only the parameters are kept, in canonical names, as one safetensors file per step. Fetches run where
# Snakemake runs (localrule): cluster compute nodes often cannot reach the Hub, and a fetch is I/O, not
# compute, so it is not worth a cluster job (154 per published run).


rule fetch_reference:
    input:
        published=published_record,
    output:
        "resources/references/{repo}/step{step}.safetensors",
    log:
        "results/logs/fetch_reference/{repo}/step{step}.log",
    params:
        env=fetch_env,
    threads: 1
    resources:
        # one slot per download: `--resources downloads=4` caps parallel Hub downloads
        downloads=1,
    localrule: True
    conda:
        TOOLS_ENV
    shell:
        logged("env {params.env} {RETRACE} fetch-reference --source {wildcards.repo}@step{wildcards.step} --out {output:q}")


rule reference_steps:
    input:
        reference_step_files,
    output:
        "resources/references/{repo}/steps{first}-{last}.json",
    log:
        "results/logs/reference_steps/{repo}/steps{first}-{last}.log",
    localrule: True
    run:
        write_reference_steps(input, output[0], log[0])


# An offline study's own "published" runs (models.<name>.build): a step 0, a training run in the
# original layout on the data the run really used, and its checkpoints published into a hub cache.


rule reference_init:
    output:
        weights="resources/build/init/{init}/model.safetensors",
        config="resources/build/init/{init}/config.json",
    log:
        "results/logs/reference_init/{init}.log",
    params:
        args=reference_init_args,
    threads: 1
    conda:
        TOOLS_ENV
    shell:
        logged("{RETRACE} reference init {params.args} --out resources/build/init/{wildcards.init}")


rule reference_train:
    input:
        unpack(reference_train_inputs),
    output:
        manifest="resources/build/{model}/run/checkpoints/manifest.json",
    log:
        "results/logs/reference_train/{model}.log",
    params:
        args=reference_train_args,
        out="resources/build/{model}/run",
        threads_per_rank=STUDY.cluster["threads_per_rank"],
    threads: reference_threads
    conda:
        TOOLS_ENV
    shell:
        logged(
            "{RETRACE} train {params.args} --threads {params.threads_per_rank} --out {params.out:q}"
        )


rule reference_publish:
    input:
        manifest="resources/build/{model}/run/checkpoints/manifest.json",
        config=reference_init_config,
    output:
        "resources/build/{model}/published.json",
    log:
        "results/logs/reference_publish/{model}.log",
    params:
        repo=reference_repo,
        hub_cache=reference_hub_cache,
    threads: 1
    conda:
        TOOLS_ENV
    shell:
        logged(
            "{RETRACE} reference publish --run resources/build/{wildcards.model}/run --config {input.config:q}"
            " --hub-cache {params.hub_cache:q} --repo {params.repo:q} --record {output:q}"
        )
