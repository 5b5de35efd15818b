"""DAG cost of a large study: `snakemake -n` of 500 cells × 154 checkpoints, against a per-step design.

    .venv/bin/python benchmarks/dag.py [--cells 500] [--baseline-cells 20]

The study: pythia-70m-deduped (a Hub repo; a dry run fetches nothing) trained to step 143000, so every
cell compares 154 checkpoints (0, 1, 2, 4 … 512, 1000 … 143000). This workflow runs ONE compare job per
cell over all its checkpoints. The baseline is the design it replaced: one compare job per (cell, step)
plus a per-cell merge, built from the same rules (common.smk, data, references, train, report) with only
the compare rule swapped. The baseline is measured in the same run on a smaller slice (--baseline-cells)
and extrapolated linearly to the full size — DAG cost grows about linearly with jobs — and printed as
such. Time is wall-clock of the whole `snakemake -n -q rules reason host` process (start-up, parsing, DAG); peak RSS
is that process's (os.wait4). Goal: < 5 s and < 300 MB at 500 cells.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: `-n -q`: no job blocks printed, the job-count table kept (it gives the number of jobs)
QUIET = ("--quiet", "rules", "reason", "host")

PER_STEP_SNAKEFILE = '''\
# The per-step compare design (the baseline): one compare job per (cell, step), merged per cell.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/references.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


def step_inputs(wildcards):
    cell = cell_of(wildcards)
    return {
        "manifest": layout.manifest(cell.id),
        "reference": layout.reference_file(cell.model.reference_key, int(wildcards.step)),
    }


def cell_steps(wildcards):
    steps = cell_of(wildcards).checkpoint_steps()
    return [f"results/runs/{wildcards.cell}/similarity/step{s}.parquet" for s in steps]


rule compare_step:
    input:
        unpack(step_inputs),
    output:
        "results/runs/{cell}/similarity/step{step}.parquet",
    log:
        "results/logs/compare_step/{cell}/step{step}.log",
    shell:
        "{RETRACE} compare-step --run results/runs/{wildcards.cell} --step {wildcards.step} --out {output} > {log} 2>&1"


rule compare:
    input:
        cell_steps,
    output:
        table="results/runs/{cell}/similarity.parquet",
        tensors="results/runs/{cell}/similarity_tensors.parquet",
    log:
        "results/logs/compare/{cell}.log",
    shell:
        "{RETRACE} merge-steps {input} --out {output.table} --tensors-out {output.tensors} > {log} 2>&1"


rule all:
    input:
        final_outputs(),
    default_target: True
'''


def study(n_cells: int) -> dict:
    """A factorial study of exactly n_cells cells: 2 data variants × 5 layouts × 2 attention × seeds."""
    if n_cells % 20:
        raise SystemExit(f"--cells must be a multiple of 20, got {n_cells}")
    layouts = [{"gpus": g, "pdbs": 1024 // (g * a), "gas": a} for g, a in ((256, 1), (128, 2), (64, 4), (32, 8), (64, 1))]
    return {
        "study": f"bench-{n_cells}",
        "models": {"pythia-70m-deduped": {"reference": "EleutherAI/pythia-70m-deduped", "documented": "deduped-raw"}},
        "data": {
            "deduped-raw": {"source": "synthetic", "corpus": "deduped", "format": "raw"},
            "standard-raw": {"source": "synthetic", "corpus": "standard", "format": "raw"},
        },
        "axes": {
            "model": ["pythia-70m-deduped"],
            "data": ["deduped-raw", "standard-raw"],
            "parallel": layouts,
            "gpu_type": ["a100"],
            "attention": ["flash", "global"],
            "seed": list(range(1, n_cells // 20 + 1)),
            "steps": [143000],
        },
    }


def measure(snakefile: Path, config: Path, workdir: Path, *extra: str) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MB, jobs) of one `snakemake -n` process."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--configfile", str(config),
           "-n", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"snakemake failed:\n{text[-3000:]}")
    jobs = 0
    for line in text.splitlines():
        if line.startswith("total"):
            jobs = int(line.split()[1])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=500)
    ap.add_argument("--baseline-cells", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is printed")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="retrace-dag-") as tmp:
        tmp = Path(tmp)
        # the per-step Snakefile sits in a directory shaped like the checkout (workflow/, envs/ linked)
        for name in ("workflow", "envs"):
            (tmp / name).symlink_to(ROOT / name)
        per_step = tmp / "Snakefile.per-step"
        per_step.write_text(PER_STEP_SNAKEFILE)

        def best(snakefile: Path, n: int, *extra: str) -> tuple[float, float, float, int]:
            config = tmp / f"study-{n}.yaml"
            config.write_text(yaml.safe_dump(study(n), sort_keys=False))
            runs = [measure(snakefile, config, tmp / f"wd-{snakefile.name}-{n}", *extra) for _ in range(args.repeat)]
            return min(runs)

        full = best(ROOT / "Snakefile", args.cells, *QUIET)
        full_print = best(ROOT / "Snakefile", args.cells)
        small = best(ROOT / "Snakefile", args.baseline_cells, *QUIET)
        base = best(per_step, args.baseline_cells, *QUIET)

    scale = args.cells / args.baseline_cells
    # extrapolate the per-step design: the fixed start-up (the per-cell design's small run) stays, the rest scales
    fixed_t, fixed_m = small[0], small[2]
    base_t = fixed_t + (base[0] - fixed_t) * scale
    base_m = fixed_m + (base[2] - fixed_m) * scale
    base_jobs = round(base[3] * scale)

    print(f"study: {args.cells} cells x 154 checkpoints (pythia-70m-deduped to step 143000), best of {args.repeat}")
    print(f"{'design':<44} {'cells':>6} {'jobs':>7} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12}")
    rows = [
        ("one compare per cell (this workflow), -n -q", args.cells, full),
        ("one compare per cell, -n (jobs printed)", args.cells, full_print),
        ("one compare per cell, -n -q", args.baseline_cells, small),
        ("one compare per (cell, step), -n -q", args.baseline_cells, base),
    ]
    for name, n, (wall, cpu, rss, jobs) in rows:
        print(f"{name:<44} {n:>6} {jobs:>7} {wall:>8.2f} {cpu:>7.2f} {rss:>12.0f}")
    print(f"{'one compare per (cell, step), extrapolated':<44} {args.cells:>6} {base_jobs:>7} {base_t:>8.2f} "
          f"{'':>7} {base_m:>12.0f}   (linear from {args.baseline_cells} cells, start-up kept fixed)")
    print(f"ratio per-step / per-cell at {args.cells} cells: time {base_t / full[0]:.1f}x, "
          f"memory {base_m / full[2]:.1f}x, jobs {base_jobs / full[3]:.0f}x (per-step extrapolated)")
    print(f"ratio per-step / per-cell at {args.baseline_cells} cells (both measured): time {base[0] / small[0]:.1f}x, "
          f"memory {base[2] / small[2]:.1f}x, jobs {base[3] / small[3]:.0f}x")
    ok = full[0] < 5 and full[2] < 300
    print(f"goal < 5 s and < 300 MB at {args.cells} cells: {'met' if ok else 'NOT met'} "
          f"({full[0]:.2f} s, {full[2]:.0f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
