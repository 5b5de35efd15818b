"""Running this checkout's Snakefile from tests, and reading its dry-run job table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]


def snakemake(*args: str, workdir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Snakemake on this checkout's Snakefile in ``workdir``, with this checkout's package importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run([*SNAKEMAKE, "-d", str(workdir), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def job_counts(output: str) -> dict[str, int]:
    """Rule → jobs, from the 'job count' table of a dry run (the first one printed)."""
    counts, table = {}, False
    for line in output.splitlines():
        if re.match(r"^job\s+count$", line):
            table = True
            continue
        if table and not line.startswith("-"):
            m = re.match(r"^(\w+)\s+(\d+)$", line)
            if not m or m.group(1) == "total":
                break
            counts[m.group(1)] = int(m.group(2))
    return counts


def spec_of(shell: str) -> dict:
    """The cell spec (``retrace train|neox-run --spec JSON``) in a rendered shell command."""
    import json
    import shlex

    return json.loads(shlex.split(shell[shell.index("--spec ") + len("--spec "):])[0])
