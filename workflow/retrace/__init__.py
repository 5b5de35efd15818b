"""retrace: reproduce published LLM pretraining runs and measure how close each reproduction comes.

Modules, one job each (a module imports only those listed below it, errors/io/rundir at the ground):
    cli, commands   the ``retrace`` command line, one subcommand per module
    jobs            the workflow's small local jobs (cells table, reference records, cross table)
    launch          a run's spec from the study: what a cell's train job runs
    placement       where a run executes: SLURM resources and CPU threads
    grid            a study config expanded into cells (validation, designs, cell ids)
    cell_state      a cell's state read from the files the workflow leaves
    paths           where the workflow writes
    spec            a run's settings, written once (TrainConfig, NeoXRunConfig): flags, JSON, fingerprint
    neox            engine neox: GPT-NeoX v1.0 itself, from the published configs
    train           the trainer that resumes a published run (builtin and DeepSpeed engines)
    report          aggregation, factor tables, trajectories, the verdict
    audit, forensics  published repos' incidents; step-0 forensics
    compare         θ Cos and L2 in float64, over a run and across generations
    model           the GPT-NeoX/Pythia network, its v1.0 initialisation and loss
    checkpoints     published checkpoints (HF, GPT-NeoX native, the Hub) as canonical parameters
    data            GPT-NeoX indexed datasets, training order and the Pile variants
    pythia          the suite's facts: sizes, recipes, the save schedule, constants (torch-free)
    rundir, io, hubenv, errors   a run directory's paths; atomic writes and hashes; Hub settings; RetraceError
"""

__version__ = "0.1.0"
