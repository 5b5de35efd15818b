"""retrace: reproduce published LLM pretraining runs and measure how close each reproduction comes.

Modules, one job each:
    model         the GPT-NeoX/Pythia network, its size registry and its v1.0 initialisation
    checkpoints   reading published checkpoints (HF, GPT-NeoX native, hub) as canonical parameters
    similarity    θ Cos and L2 between two parameter sets, streamed in float64
    data          GPT-NeoX indexed datasets, training order and the Pile variants
    train         the Pythia recipe and the trainer that resumes a published run
    grid          a study config expanded into cells
"""

__version__ = "0.1.0"
