"""Every benchmark runs in its smoke mode (tiny sizes), so a benchmark that no longer runs fails the suite.

The figures printed at these sizes mean nothing; what is checked is that the script runs to the end
and prints its summary lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

#: script → (lines its smoke output must contain); scripts smoke-tested elsewhere are in ELSEWHERE.
SMOKE = {
    "dag.py": ["one compare per (cell, step), -n -q", "ratio workflow / bare:"],
    "data_order.py": ["loop rows == vectorised rows: True", "save (np.save"],
    "similarity.py": ["retrace / read (mmap)", "retrace / cat (CLI)", "verified step:", "naive:   1 - cos"],
    "train_step.py": ["ratio retrace / transformers"],
}
ELSEWHERE = {
    "gpu_check.py": "tests/test_gpu_check.py (through gpu_check.sh --smoke)",
    "tokenize_throughput.py": "tests/test_tokenize.py::test_benchmark_smoke",
    "fingerprints.py": "tests/test_provenance_fingerprints.py::test_benchmark_smoke_runs",
}
#: the slow ones (> ~10 s on a shared 2-core machine: several snakemake processes, transformers' import)
SLOW = {"dag.py", "train_step.py"}


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(SMOKE) | set(ELSEWHERE), "a benchmark without a smoke test (add it to SMOKE)"
    for name in scripts:
        assert "--smoke" in (BENCHMARKS / name).read_text(), f"{name} has no --smoke mode"


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(SMOKE)]
)
def test_benchmark_smoke(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for expected in SMOKE[script]:
        assert expected in r.stdout, f"{script} --smoke did not print {expected!r}:\n{r.stdout[-3000:]}"
