"""When a SLURM job must stop: its end time, read once, so that the run saves before the time limit.

SLURM sends the ranks SIGUSR2 ahead of the limit where the job asked for it (``--signal``, see
retrace.placement) — but a one-GPU cell cannot be an srun-task job, and a signal can be lost on its way
through the job's processes. The trainer therefore also watches the clock: ``job_end_time`` is
``SLURM_JOB_END_TIME`` (epoch seconds, set by SLURM ≥ 23.02), else ``squeue -h -j $SLURM_JOB_ID -o %e``;
the main rank stops (as on SIGUSR2) once ``end − lead`` has passed, and the ranks agree on it at the end
of the step like on a signal.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Mapping


def job_end_time(environ: Mapping[str, str] | None = None) -> float | None:
    """The job's end time in epoch seconds, or None (no SLURM job, no time limit, or unknown)."""
    env = os.environ if environ is None else environ
    text = (env.get("SLURM_JOB_END_TIME") or "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        return value if value > 0 else None
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"retrace train: warning: cannot ask squeue for job {job}'s end time ({exc}); relying on SIGUSR2",
              file=sys.stderr)
        return None
    return parse_squeue_time(out.stdout.strip().splitlines()[0] if out.stdout.strip() else "")


def parse_squeue_time(text: str) -> float | None:
    """``2026-12-01T12:00:00`` (squeue's %e, local time) → epoch seconds; N/A, NONE, Unknown → None."""
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def stop_deadline(lead_s: int, environ: Mapping[str, str] | None = None) -> float | None:
    """The epoch time from which the run stops (``lead_s`` before the job's end), or None."""
    if lead_s <= 0:
        return None
    end = job_end_time(environ)
    return None if end is None else end - lead_s
