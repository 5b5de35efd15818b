"""Builtin ZeRO-1 with 2 and 4 real gloo ranks: bitwise the replicated engine, 12·N/dp optimizer bytes per
rank, and a shard state that saves, reloads into a rebuilt engine and continues bitwise (tests/zero1_worker.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from retrace.train.distributed import launch_local

WORKER = Path(__file__).with_name("zero1_worker.py")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"zero1_{request.param}")
    assert launch_local([str(WORKER), str(out)], request.param) == 0
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zero1_is_bitwise_the_replicated_engine_after_20_steps(ranks, precision):
    for rep in ranks:
        r = rep[precision]
        assert r["same"] == {"log": True, "weights": True, "master": True, "exp_avg": True, "exp_avg_sq": True}
        assert r["moved"] > 1e-3 and r["skipped"] == 0  # it trained


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zero1_shard_state_saves_reloads_and_continues_bitwise(ranks, precision):
    assert all(rep[precision]["resumed"] for rep in ranks)


def test_zero1_optimizer_bytes_per_rank(ranks):
    dp = len(ranks)
    n = ranks[0]["fp16"]["n_params"]
    for rep in ranks:
        full, part = rep["fp16"]["bytes_replicated"], rep["fp16"]["bytes_zero1"]
        assert full["master"] + full["moments"] == 12 * n  # fp32 master + two moments, whole model
        shard = part["master"] + part["moments"]
        assert 12 * n / dp <= shard <= 12 * (n / dp + 2 * dp)  # 12·N/dp plus at most the padding
        fp32 = rep["fp32"]["bytes_zero1"]
        assert fp32["master"] == 0 and fp32["moments"] == part["moments"]  # fp32: the weights are the master
    print(f"\nZeRO-1 optimizer bytes/rank, dp={dp}, N={n}: replicated {12 * n}, "
          f"zero1 {ranks[0]['fp16']['bytes_zero1']['master'] + ranks[0]['fp16']['bytes_zero1']['moments']} "
          f"({(ranks[0]['fp16']['bytes_zero1']['master'] + ranks[0]['fp16']['bytes_zero1']['moments']) / n:.3f} B/param)",
          file=sys.stderr)
