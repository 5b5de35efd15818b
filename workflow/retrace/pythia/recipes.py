"""The Pythia training recipe per model size and the v1.0 LR formula (GPT-NeoX v1.0 configs,
reference/pythia-neox.md §1-2).

Every field can be overridden (``recipe_for("70m", global_batch=32, seq_length=128, train_iters=200)``)
so that tiny CPU studies run the same code path with a small batch and a short schedule.

What is fixed by the published configs:
  * Adam in AdamW mode (apex FusedAdam, adam_w_mode default True): betas (0.9, 0.95), eps 1e-8,
    decoupled weight decay 0.1 on everything but LayerNorm parameters and biases, bias correction.
  * global-norm gradient clipping 1.0.
  * v1.0 ``AnnealingLR``: linear warmup over ``warmup·lr_decay_iters`` updates, then cosine with period
    ``lr_decay_iters`` (not decay-warmup), floored at min_lr; LR 0 on the first update.
  * global batch 1024 sequences of 2048 tokens; micro batch / GAS / GPUs as the yml comments say.
  * fp16 with dynamic loss scaling (initial 2^12, window 1000, hysteresis 2, min 1), except pythia-1b,
    which the README says was trained in bf16 (its yml still says fp16).
  * ZeRO stage 1 (stage 0 for 14m/31m); seed 1234.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from retrace.errors import RetraceError
from retrace.pythia.constants import GLOBAL_BATCH, SEED, SEQ_LENGTH, TRAIN_ITERS


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule, batch and precision settings of one Pythia run."""

    size: str
    lr: float
    min_lr: float
    # Schedule: train_iters is how long the original run was; lr_decay_iters = E in the v1.0 formula.
    train_iters: int = TRAIN_ITERS
    lr_decay_iters: int | None = None  # None: same as train_iters (as in every Pythia config)
    warmup: float = 0.01  # fraction of lr_decay_iters (NeoX `warmup`)
    warmup_iters: int | None = None  # explicit W overrides the fraction
    # Batch layout of the original run.
    global_batch: int = GLOBAL_BATCH
    seq_length: int = SEQ_LENGTH
    micro_batch: int = 32  # train_micro_batch_size_per_gpu (pdbs)
    gas: int = 1
    gpus: int = 32  # data-parallel ranks (GPUs / model parallel)
    # Optimizer.
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    # Precision and loss scaling (DeepSpeed fp16 block: loss_scale 0 = dynamic).
    precision: str = "fp16"
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # ZeRO.
    zero_stage: int = 1
    reduce_bucket_size: int = 500_000_000
    seed: int = SEED
    extra: dict = field(default_factory=dict)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def warmup_steps(self) -> float:
        """W in the v1.0 formula: ``warmup_iters`` if set, else ``warmup · lr_decay_iters`` (1430.0 for
        Pythia), kept as a float as v1.0's ``warmup_iter`` is (0.01 · 250 = 2.5 warms up over 2.5 steps)."""
        if self.warmup_iters is not None:
            return float(self.warmup_iters)
        return self.warmup * self.decay_iters

    @property
    def initial_loss_scale(self) -> float:
        return float(2**self.initial_scale_power)

    def replace(self, **overrides) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["warmup_steps"] = self.warmup_steps
        d["decay_iters"] = self.decay_iters
        return d


def _r(size, lr, min_lr, micro, gas, gpus, *, precision="fp16", zero_stage=1, bucket=500_000_000) -> Recipe:
    assert micro * gas * gpus == GLOBAL_BATCH, size
    return Recipe(size=size, lr=lr, min_lr=min_lr, micro_batch=micro, gas=gas, gpus=gpus,
                  precision=precision, zero_stage=zero_stage, reduce_bucket_size=bucket)


# Table §1 of reference/pythia-neox.md. "gpus" is the data-parallel degree (GPUs / model parallel).
PYTHIA_RECIPES: dict[str, Recipe] = {
    r.size: r
    for r in [
        _r("14m", 1e-3, 1e-4, 32, 1, 32, zero_stage=0, bucket=50_000_000),
        _r("31m", 1e-3, 1e-4, 32, 1, 32, zero_stage=0),
        _r("70m", 1e-3, 1e-4, 32, 1, 32),
        _r("160m", 6e-4, 6e-5, 32, 1, 32),
        _r("410m", 3e-4, 3e-5, 32, 1, 32),
        # The 1b yml says lr 2.5e-4 (README table: 3e-4) and fp16; the README says it was trained in bf16.
        _r("1b", 2.5e-4, 2.5e-5, 16, 1, 64, precision="bf16"),
        _r("1.4b", 2e-4, 2e-5, 16, 1, 64),
        _r("2.8b", 1.6e-4, 1.6e-5, 16, 1, 64),
        _r("6.9b", 1.2e-4, 1.2e-5, 8, 2, 64, bucket=1_260_000_000),
        _r("12b", 1.2e-4, 1.2e-5, 8, 2, 64, bucket=1_260_000_000),
    ]
}

RECIPE_SIZES = tuple(PYTHIA_RECIPES)


def recipe_for(size: str, **overrides) -> Recipe:
    """The published recipe of ``size`` ("70m", "pythia-70m-deduped", ...), with overrides applied.

    Overrides whose value is None are ignored, so CLI flags can be passed straight through.
    """
    try:
        key = normalize_size(size)
    except RetraceError:
        key = None
    if key not in PYTHIA_RECIPES:
        raise RetraceError(f"unknown recipe size {size!r}; known: {', '.join(RECIPE_SIZES)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise RetraceError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
    return PYTHIA_RECIPES[key].replace(**overrides)


def normalize_size(size: str) -> str:
    """'EleutherAI/pythia-160m-deduped-v0' → '160m' (the model registry's key)."""
    from retrace.pythia.sizes import pythia_size

    return pythia_size(size)


def lr_at(n: int, recipe: Recipe) -> float:
    """GPT-NeoX v1.0 ``AnnealingLR.get_lr`` for scheduler counter ``n`` (cosine style).

    n' = min(n, E - W); n ≤ W: lr·n'/W; else max(min_lr, lr/2·(1 + cos(π·(n' - W)/E))).
    The cosine period is E (not E - W). Update k (1-based, counting only applied updates) uses n = k - 1,
    so the first update has LR 0.
    """
    return lr_v1(n, recipe.lr, recipe.min_lr, recipe.warmup_steps, recipe.decay_iters)


def lr_v1(n: int, lr_max: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    num_iters = min(int(n), decay_iters - warmup)
    if warmup > 0 and int(n) <= warmup:
        return float(lr_max) * num_iters / warmup
    return max(float(min_lr), float(lr_max) / 2.0 * (math.cos(math.pi * (num_iters - warmup) / decay_iters) + 1))
