"""Kill-and-resume with two data-parallel ranks: `retrace train --gpus 2` forwards SIGTERM to its ranks,
which save their state at the end of the step and exit 143; the rerun ends bit-identical."""

from __future__ import annotations

import pytest

from test_train_helpers import check_sigterm_then_restart


@pytest.mark.slow
def test_sigterm_then_restart_is_bit_identical_two_ranks(world):
    check_sigterm_then_restart(world, gpus=2)
