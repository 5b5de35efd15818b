# Training: one job per cell. Resumes the published start step and trains to the cell's `steps`,
# writing checkpoints on the Pythia schedule. Only checkpoints/manifest.json (written last) is declared,
# so a failed or killed job keeps its checkpoints and state/ and the next attempt resumes from them.
# The cell's settings are one param, its spec (retrace.launch): a changed setting reruns the cell.
# Engine neox cells run `retrace neox-run` (GPT-NeoX v1.0 itself, with the study's `neox:` section) instead
# of `retrace train`; GPT-NeoX starts its own ranks (DeepSpeed's runner, or srun via DeeperSpeed's slurm
# launcher), so they get no srun prefix.


rule train:
    input:
        unpack(train_inputs),
    output:
        manifest=f"{RUN}/{rundir.MANIFEST}",
    log:
        layout.log("train", "{cell}"),
    conda:
        train_env
    threads: train_threads()
    resources:
        # only those some cell's placement sets, as constants where all cells share them
        # (retrace.placement.shared_resources)
        **train_resources(),
    params:
        # the cell's command: its spec (JSON), retrace subcommand, launcher and hub settings
        job=train_job,
        out=RUN,
        threads_per_rank=STUDY.cluster["threads_per_rank"],
    shell:
        logged(
            "{params.job[launcher]} env {params.job[env]} retrace {params.job[command]} --spec {params.job[spec]:q}"
            " --threads {params.threads_per_rank} --out {params.out:q}"
        )
