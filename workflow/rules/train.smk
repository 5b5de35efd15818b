# Training: one job per cell. Resumes the published start step and trains to the cell's `steps`,
# writing checkpoints on the Pythia schedule. Only checkpoints/manifest.json (written last) is declared,
# so a failed or killed job keeps its checkpoints and state/ and the next attempt resumes from them.
# Engine neox cells run `retrace neox-run` (GPT-NeoX v1.0 itself, with the study's `neox:` section) instead
# of `retrace train`; GPT-NeoX starts its own ranks (DeepSpeed's runner, or srun via DeeperSpeed's slurm
# launcher), so they get no srun prefix.


def train_command(wildcards):
    """`train`, or `neox-run` for an engine-neox cell (retrace.grid.Study.train_command)."""
    return STUDY.train_command(cell_of(wildcards))


def train_prefix(wildcards):
    """What starts the ranks: the cell's launcher (srun across nodes), nothing for GPT-NeoX."""
    return "" if STUDY.train_command(cell_of(wildcards)) == "neox-run" else train_launcher(wildcards)


rule train:
    input:
        unpack(train_inputs),
    output:
        manifest="results/runs/{cell}/checkpoints/manifest.json",
    log:
        "results/logs/train/{cell}.log",
    params:
        env=cell_env,
        args=train_args,
        command=train_command,
        launcher=train_prefix,
        out="results/runs/{cell}",
        threads_per_rank=STUDY.cluster["threads_per_rank"],
    threads: train_threads
    resources:
        gpu=train_gpu,
        gpu_model=train_gpu_model,
        constraint=train_constraint,
        nodes=train_nodes,
        tasks_per_node=train_tasks_per_node,
        mpi=train_mpi,
        cpus_per_task=train_cpus_per_task,
        slurm_extra=train_slurm_extra,
    conda:
        train_env
    shell:
        logged(
            "{params.launcher} env {params.env} {RETRACE} {params.command} {params.args} --threads {params.threads_per_rank}"
            " --out {params.out:q}"
        )
