"""The Pythia recipe table, the GPT-NeoX v1.0 LR formula, the checkpoint schedule and the loss scaler."""

from __future__ import annotations

import math

import pytest

from retrace.errors import RetraceError
from retrace.model import PYTHIA_SIZES
from retrace.pythia.recipes import PYTHIA_RECIPES, lr_at, lr_v1, recipe_for
from retrace.pythia.schedule import save_steps as pythia_save_steps
from retrace.train.scaler import LossScaleAtMinimum, LossScaler


def test_recipe_table_matches_the_published_configs():
    assert set(PYTHIA_RECIPES) == set(PYTHIA_SIZES)
    for r in PYTHIA_RECIPES.values():
        assert r.micro_batch * r.gas * r.gpus == r.global_batch == 1024
        assert r.seq_length == 2048 and r.train_iters == 143000 and r.decay_iters == 143000
        assert r.warmup_steps == 1430
        assert r.betas == (0.9, 0.95) and r.eps == 1e-8 and r.weight_decay == 0.1 and r.clip_grad == 1.0
        assert r.initial_loss_scale == 4096 and r.loss_scale_window == 1000 and r.hysteresis == 2
        assert r.min_loss_scale == 1 and r.seed == 1234
        assert math.isclose(r.min_lr, 0.1 * r.lr)
    assert PYTHIA_RECIPES["1b"].precision == "bf16"
    assert {s for s, r in PYTHIA_RECIPES.items() if r.precision == "fp16"} == set(PYTHIA_RECIPES) - {"1b"}
    assert PYTHIA_RECIPES["160m"].lr == 6e-4 and PYTHIA_RECIPES["12b"].lr == 1.2e-4
    assert (PYTHIA_RECIPES["6.9b"].micro_batch, PYTHIA_RECIPES["6.9b"].gas) == (8, 2)
    assert PYTHIA_RECIPES["14m"].zero_stage == 0 and PYTHIA_RECIPES["70m"].zero_stage == 1


def test_recipe_overrides_for_tiny_studies():
    r = recipe_for("EleutherAI/pythia-70m-deduped", global_batch=32, seq_length=128, train_iters=200, lr=None)
    assert (r.size, r.global_batch, r.seq_length, r.train_iters, r.lr) == ("70m", 32, 128, 200, 1e-3)
    assert r.warmup_steps == 2  # 0.01 · 200
    assert recipe_for("70m", warmup_iters=7).warmup_steps == 7
    # v1.0 keeps warmup·E as a float: with E = 250, W = 2.5, so n = 2 is still warmup (lr·2/2.5)
    # and n = 3 is on the cosine with n' − W = 0.5.
    odd = recipe_for("70m", train_iters=250)
    assert odd.warmup_steps == 2.5
    assert lr_at(2, odd) == odd.lr * 2 / 2.5
    assert lr_at(3, odd) == max(odd.min_lr, odd.lr / 2 * (1 + math.cos(math.pi * 0.5 / 250)))
    with pytest.raises(RetraceError, match="unknown recipe size"):
        recipe_for("71m")
    with pytest.raises(RetraceError, match="unknown recipe field"):
        recipe_for("70m", learning_rate=1.0)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, 0.0),  # the first update: LR 0
        (1, 1 / 1430),
        (715, 0.5),
        (1430, 1.0),  # end of warmup (n ≤ W branch)
        (50000, 0.7414),  # reference §2 sample values
        (100000, 0.2199),
        (143000, 0.1),  # floored at min_lr
    ],
)
def test_lr_v1_formula_hand_values(n, expected):
    got = lr_v1(n, 1.0, 0.1, 1430, 143000)
    assert got == pytest.approx(expected, abs=5e-5 if n in (50000, 100000) else 1e-12)


def test_lr_v1_cosine_period_is_E_and_counter_is_clipped():
    # lr_max/2·(1 + cos(π·(n − W)/E)): at n = W + E/2 the cosine is 0 → lr_max/2 (would be floored if < min)
    assert lr_v1(1430 + 71500, 1.0, 0.0, 1430, 143000) == pytest.approx(0.5, abs=1e-12)
    # min(n, E − W): beyond E − W the LR stops moving
    assert lr_v1(143000 - 1430, 1.0, 0.0, 1430, 143000) == lr_v1(10**6, 1.0, 0.0, 1430, 143000)
    # the floor is reached near n ≈ 115,139 for min_lr = 0.1·lr_max
    assert lr_v1(115000, 1.0, 0.1, 1430, 143000) > 0.1
    assert lr_v1(115300, 1.0, 0.1, 1430, 143000) == 0.1
    r = recipe_for("160m")
    assert lr_at(0, r) == 0.0 and lr_at(1430, r) == pytest.approx(6e-4)


def test_pythia_save_schedule():
    full = pythia_save_steps(0, 143000)
    assert len(full) == 154  # the published branches
    assert full[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and full[-1] == 143000
    assert pythia_save_steps(0, 20) == [0, 1, 2, 4, 8, 16, 20]
    assert pythia_save_steps(3, 1500) == [3, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1500]


def test_loss_scaler_follows_deepspeed_sequence_on_a_scripted_pattern():
    # Written by hand from DeepSpeed's rules (window 5 to keep it short; hysteresis 2; min 1):
    # overflow: counter > 1 → counter −1, scale kept; counter == 1 → scale / 2. last_overflow = iter.
    # good step: (iter − last_overflow) % window == 0 → scale × 2 and counter refilled (only then).
    s = LossScaler(scale=16, window=5, delayed_shift=2, min_scale=1)
    pattern = "..XX.....X.XX.........."
    expected = [16, 16, 16, 8, 8, 8, 8, 8, 16, 16, 16, 8, 4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 16]
    hyst = [2, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    got, got_h = [], []
    for c in pattern:
        s.update(c == "X")
        got.append(s.scale)
        got_h.append(s.hysteresis)
    assert got == expected
    assert got_h == hyst
    assert s.cur_iter == len(pattern) and s.last_overflow_iter == 12


def test_loss_scaler_pythia_settings_window_and_minimum():
    s = LossScaler()  # 2^12, window 1000, hysteresis 2, min 1
    for _ in range(999):
        s.update(False)
    assert s.scale == 4096  # 999 good steps: not yet
    s.update(False)
    assert s.scale == 8192  # the 1000th good step from the start (last_overflow_iter = −1) doubles
    for _ in range(1000):
        s.update(False)
    assert s.scale == 16384  # and again every 1000 steps
    m = LossScaler(scale=2, window=1000, delayed_shift=1, min_scale=1)
    m.update(True)
    assert m.scale == 1  # halved down to min_loss_scale ...
    before = m.state_dict()
    with pytest.raises(LossScaleAtMinimum, match="minimum"):  # ... and DeepSpeed raises at the next overflow
        m.update(True)
    assert m.state_dict() == before
    st = LossScaler()
    st.load_state_dict(s.state_dict())
    assert st == s
