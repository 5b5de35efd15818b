"""Kill-and-resume with two data-parallel ranks: `retrace train --gpus 2` forwards SIGTERM to its ranks,
which save their state at the end of the step and exit 143; the rerun ends bit-identical."""

from __future__ import annotations

import pytest

from test_train_helpers import SEQ, B, check_sigterm_then_restart, make_data, make_reference


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_ranks")
    make_reference(root / "ref")
    make_data(root / "data" / "tiny", SEQ, 40 * B)
    return root


@pytest.mark.slow
def test_sigterm_then_restart_is_bit_identical_two_ranks(world):
    check_sigterm_then_restart(world, gpus=2)
