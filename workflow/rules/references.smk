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
        layout.log("fetch_reference", "{repo}/step{step}"),
    localrule: True
    conda:
        TOOLS_ENV
    threads: 1
    resources:
        # one slot per download: `--resources downloads=4` caps parallel Hub downloads
        downloads=1,
    params:
        env=fetch_env,
    shell:
        logged(
            "env {params.env} retrace fetch-reference --source {wildcards.repo}@step{wildcards.step} --out {output:q}"
        )


rule reference_steps:
    input:
        reference_step_files,
    output:
        "resources/references/{repo}/steps{first}-{last}.json",
    log:
        "results/logs/reference_steps/{repo}/steps{first}-{last}.log",
    localrule: True
    run:
        jobs.write_reference_steps(list(input), output[0], log[0])


# An offline study's own "published" runs (models.<name>.build): a step 0, a training run in the
# original layout on the data the run really used, and its checkpoints published into a hub cache.


rule reference_init:
    output:
        weights="resources/build/init/{init}/model.safetensors",
        config="resources/build/init/{init}/config.json",
    log:
        "results/logs/reference_init/{init}.log",
    conda:
        TOOLS_ENV
    threads: 1
    params:
        args=reference_init_args,
    shell:
        logged(
            "retrace reference init {params.args} --out resources/build/init/{wildcards.init}"
        )


rule reference_train:
    input:
        unpack(reference_train_inputs),
    output:
        manifest="resources/build/{model}/run/checkpoints/manifest.json",
    log:
        "results/logs/reference_train/{model}.log",
    conda:
        TOOLS_ENV
    threads: reference_threads
    params:
        spec=reference_train_spec,
        out=layout.build_run_dir("{model}"),
        threads_per_rank=STUDY.cluster["threads_per_rank"],
    shell:
        logged(
            "retrace train --spec {params.spec:q} --threads {params.threads_per_rank} --out {params.out:q}"
        )


rule reference_publish:
    input:
        manifest="resources/build/{model}/run/checkpoints/manifest.json",
        config=reference_init_config,
    output:
        "resources/build/{model}/published.json",
    log:
        "results/logs/reference_publish/{model}.log",
    conda:
        TOOLS_ENV
    threads: 1
    params:
        repo=reference_repo,
        hub_cache=reference_hub_cache,
        # build.format neox: GPT-NeoX training checkpoints with ZeRO-1 files (retrace.neox.zero_export)
        flags=reference_publish_flags,
    shell:
        logged(
            "retrace reference publish --run resources/build/{wildcards.model}/run --config {input.config:q}"
            " --hub-cache {params.hub_cache:q} --repo {params.repo:q} {params.flags} --record {output:q}"
        )


# A segment's start (models.<name>.segments with optimizer_state): the published GPT-NeoX training
# checkpoint with its ZeRO-1 optimizer files, staged once per (repo, step) as a save directory.


rule fetch_training_state:
    input:
        published=published_record,
    output:
        directory("resources/training_states/{repo}/step{step}"),
    log:
        "results/logs/fetch_training_state/{repo}/step{step}.log",
    localrule: True
    conda:
        TOOLS_ENV
    threads: 1
    resources:
        downloads=1,
    params:
        env=fetch_env,
    shell:
        logged(
            "env {params.env} retrace fetch-state --source {wildcards.repo}@step{wildcards.step} --out {output:q}"
        )
