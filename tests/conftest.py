"""Shared test settings: small thread counts so tests are fast and bit-reproducible on 2 cores."""

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny reference (``world/ref``) and 40 batches of data (``world/data/tiny``), once per test module."""
    from test_train_helpers import SEQ, B, make_data, make_reference

    root = tmp_path_factory.mktemp("world")
    make_reference(root / "ref")
    make_data(root / "data" / "tiny", SEQ, 40 * B)
    return root
