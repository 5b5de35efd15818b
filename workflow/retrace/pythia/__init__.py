"""The Pythia suite's facts, without torch: shapes, recipes, the checkpoint schedule and the constants.

    constants   143000 steps, 1024 × 2048 per step, seed 1234, the 1.005 sample margin, EOD 0
    sizes       ``ModelConfig``, the size registry, Hugging Face ``config.json`` conversion
    recipes     per-size optimizer/schedule/batch/precision settings and the v1.0 LR formula
    schedule    the 154 published steps, a run's save steps, ``org/repo@step{N}`` names

The workflow's DAG, the grid and the GPT-NeoX backend read these; the trainer does too.
"""

from retrace.pythia.constants import GLOBAL_BATCH, SEED, SEQ_LENGTH, TRAIN_ITERS
from retrace.pythia.recipes import (
    PYTHIA_RECIPES,
    RECIPE_SIZES,
    Recipe,
    lr_at,
    lr_v1,
    normalize_size,
    recipe_for,
)
from retrace.pythia.schedule import FINAL_STEP, hub_spec, pythia_steps, save_steps

__all__ = [
    "FINAL_STEP",
    "GLOBAL_BATCH",
    "PYTHIA_RECIPES",
    "RECIPE_SIZES",
    "SEED",
    "SEQ_LENGTH",
    "TRAIN_ITERS",
    "Recipe",
    "hub_spec",
    "lr_at",
    "lr_v1",
    "normalize_size",
    "pythia_steps",
    "recipe_for",
    "save_steps",
]
