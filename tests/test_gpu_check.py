"""The GPU check's CPU smoke mode: every section runs (tiny shapes, CPU), so the script stays runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["smoke"] and rep["pass"]
    assert [(s["shape"], s["attention"]) for s in rep["speed"]] == [("tiny", "flash"), ("tiny", "global")]
    assert all({"retrace", "transformers"} == set(s["sides"]) and s["ratio"] > 0 for s in rep["speed"])
    det = rep["determinism"]
    assert det["deterministic"]["checkpoints_equal"] and det["deterministic"]["state_equal"]
    assert det["deterministic"]["checkpoints"] == [f"step{n}.safetensors" for n in (0, 2, 4, 6, 8)]
    assert det["tokens_per_s"]["deterministic"] > 0 and det["environment"]["numerics"]["deterministic_mode"]
    assert rep["resume"]["pass"] and 0 < rep["resume"]["stopped_at"] < 8
    assert rep["memory"]["pass"] and 5.5 < rep["memory"]["optimizer_bytes_saved_per_param"] < 6.5
