"""DAG cost of large studies: `snakemake -n` of this workflow against a per-step design and a bare floor.

    .venv/bin/python benchmarks/dag.py [--cells 500] [--baseline-cells 20] [--control-seeds 80]
    .venv/bin/python benchmarks/dag.py --smoke      # tiny sizes, seconds: what the test suite runs

Per-cell against per-step (the default): pythia-70m-deduped (a Hub repo; a dry run fetches nothing)
trained to step 143000, so every cell compares 154 checkpoints (0, 1, 2, 4 … 512, 1000 … 143000). This
workflow runs ONE compare job per cell over all its checkpoints. The baseline is the design it replaced:
one compare job per (cell, step) plus a per-cell merge, built from the same rule files with only the
per-cell compare rule swapped. The baseline is measured in the same run on a smaller slice
(--baseline-cells; 0 leaves it out) and extrapolated linearly to the full size — DAG cost grows about
linearly with jobs — and printed as such. Goal: < 5 s and < 300 MB at 500 cells.

Against the bare floor (--control-seeds N): the axes of studies/pythia-70m-control.yaml, factorial, × N
seeds (N = 80: 5,120 cells, issue 14 §4). The workflow's job graph is read from its own `--dag`, and a
bare Snakefile is written with exactly those jobs and edges (one rule per rule name, one file per job,
inputs from a dict): the cost of a DAG this size with no input functions, study or grid behind it.
Both dry runs in the same run; printed as a ratio. Goal: ≤ 1.5×.

Time is wall-clock of the whole `snakemake -n -q rules reason host` process (start-up, parsing, DAG);
peak RSS is that process's (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
include: "rules/compare_other.smk"  # compare.smk without its per-cell compare rule
include: "workflow/rules/report.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/provenance.smk"


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
        "retrace compare-step --run results/runs/{wildcards.cell} --step {wildcards.step} --out {output} > {log} 2>&1"


rule compare:
    input:
        cell_steps,
    output:
        table="results/runs/{cell}/similarity.parquet",
        tensors="results/runs/{cell}/similarity_tensors.parquet",
    log:
        "results/logs/compare/{cell}.log",
    shell:
        "retrace merge-steps {input} --out {output.table} --tensors-out {output.tensors} > {log} 2>&1"


rule all:
    input:
        final_outputs(),
    default_target: True
'''


def without_rule(text: str, name: str) -> str:
    """A rule file's text with the top-level ``rule name:`` block (and nothing else) removed."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if re.match(rf"rule {re.escape(name)}\s*:", line):
            skipping = True
            continue
        if skipping and line.strip() and not line[0].isspace():
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


def study(n_cells: int, steps: int = 143000) -> dict:
    """A factorial study of exactly n_cells cells: 2 data variants × 5 layouts × 2 attention × seeds."""
    if n_cells < 20 or n_cells % 20:
        raise SystemExit(f"cells must be a positive multiple of 20, got {n_cells}")
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
            "steps": [steps],
        },
    }


def control_factorial(seeds: int) -> dict:
    """studies/pythia-70m-control.yaml with every combination of its axes, × ``seeds`` seeds."""
    s = yaml.safe_load((ROOT / "studies" / "pythia-70m-control.yaml").read_text())
    s["study"] = f"{s['study']}-factorial-{seeds}"
    s["design"] = "factorial"
    s.pop("cross", None)  # one_at_a_time only
    s.pop("baseline", None)
    s["axes"]["seed"] = list(range(1, seeds + 1))
    return s


def n_cells_of(s: dict) -> int:
    n = 1
    for values in s["axes"].values():
        n *= len(values)
    return n


def run_snakemake(snakefile: Path, config: Path | None, workdir: Path, *extra: str) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MB, stdout) of one snakemake process (stderr goes with stdout on failure)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *extra]
    if config is not None:
        cmd += ["--configfile", str(config)]  # last: it takes every word after it
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"snakemake failed: {' '.join(cmd)}\n{(text + errors)[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text + errors


def measure(snakefile: Path, config: Path | None, workdir: Path, *extra: str) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MB, jobs) of one `snakemake -n` process."""
    wall, cpu, rss, text = run_snakemake(snakefile, config, workdir, "-n", *extra)
    jobs = 0
    for line in text.splitlines():
        if line.startswith("total"):
            jobs = int(line.split()[1])
    if not jobs:
        raise SystemExit(f"no job-count table in the output of {snakefile}:\n{text[-2000:]}")
    return wall, cpu, rss, jobs


def job_graph(snakefile: Path, config: Path, workdir: Path) -> tuple[dict[int, str], dict[int, list[int]]]:
    """The jobs (id → rule name) and edges (id → the ids it depends on) of a workflow, from its ``--dag``."""
    dot = run_snakemake(snakefile, config, workdir, "--dag")[3]
    rules: dict[int, str] = {}
    deps: dict[int, list[int]] = {}
    for line in dot.splitlines():
        node = re.match(r'\s*(\d+)\[label = "([^"\\]+)', line)
        edge = re.match(r"\s*(\d+) -> (\d+)\s*$", line)
        if node:
            rules[int(node[1])] = node[2]
            deps.setdefault(int(node[1]), [])
        elif edge:
            deps.setdefault(int(edge[2]), []).append(int(edge[1]))
    if not rules:
        raise SystemExit(f"no jobs in the --dag output of {snakefile}:\n{dot[-2000:]}")
    return rules, deps


def bare_snakefile(rules: dict[int, str], deps: dict[int, list[int]], graph_file: Path) -> str:
    """A Snakefile with exactly these jobs and edges: per rule name one rule making ``bare/<rule>/<job id>``
    from its dependencies' files (looked up in a dict), and the sink job(s) as the default target."""
    graph_file.write_text(json.dumps({"rules": {str(k): v for k, v in rules.items()},
                                      "deps": {str(k): [str(d) for d in v] for k, v in deps.items()}}))
    has_dependents = {d for ds in deps.values() for d in ds}
    sinks = [j for j in rules if j not in has_dependents]
    # one sink (the workflow's `all`, which has no output): the default target stands for it
    target_rule, target_inputs = (rules[sinks[0]], deps[sinks[0]]) if len(sinks) == 1 else ("bare_target", sinks)
    pattern_rules = sorted({name for j, name in rules.items() if len(sinks) != 1 or j != sinks[0]})
    if target_rule in pattern_rules:
        raise SystemExit(f"rule {target_rule} has jobs besides the sink: a bare Snakefile cannot stand for it")
    lines = [
        "import json",
        f"_G = json.load(open({str(graph_file)!r}))",
        "_RULE, _DEPS = _G['rules'], _G['deps']",
        "",
        "",
        "def _inputs(wildcards):",
        "    return [f'bare/{_RULE[d]}/{d}' for d in _DEPS[wildcards.job]]",
        "",
        "",
        "wildcard_constraints:",
        r"    job=r'\d+',",
        "",
        "",
        f"rule {target_rule}:",
        "    default_target: True",
        f"    input: [f'bare/{{_RULE[j]}}/{{j}}' for j in {[str(j) for j in target_inputs]!r}]",
        "",
    ]
    for name in pattern_rules:
        lines += ["", f"rule {name}:", "    input: _inputs", f"    output: 'bare/{name}/{{job}}'",
                  "    shell: 'touch {output}'", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=500, help="cells of the per-cell study (a multiple of 20)")
    ap.add_argument("--baseline-cells", type=int, default=20, help="cells of the per-step slice (0: leave it out)")
    ap.add_argument("--steps", type=int, default=143000, help="steps of every cell (143000: 154 checkpoints)")
    ap.add_argument("--control-seeds", type=int, default=0,
                    help="also time the 70m control's axes, factorial, x this many seeds against a bare "
                         "Snakefile with the same jobs and edges (80: 5,120 cells; 0: leave it out)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is printed")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (20 cells to step 16, 64 control cells, one run each): checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.cells, args.baseline_cells, args.steps, args.control_seeds, args.repeat = 20, 20, 16, 1, 1
    if args.baseline_cells < 0 or args.control_seeds < 0:
        raise SystemExit("--baseline-cells and --control-seeds must be >= 0")
    study(args.cells)  # checks --cells
    if args.baseline_cells:
        study(args.baseline_cells)

    with tempfile.TemporaryDirectory(prefix="retrace-dag-") as tmp:
        tmp = Path(tmp)
        # the per-step Snakefile sits in a directory shaped like the checkout (workflow/, envs/ linked)
        for name in ("workflow", "envs"):
            (tmp / name).symlink_to(ROOT / name)
        # its rules/ folder beside workflow/report, so compare.smk's relative report captions resolve
        (tmp / "rules").mkdir()
        (tmp / "report").symlink_to(ROOT / "workflow" / "report")
        compare_smk = (ROOT / "workflow" / "rules" / "compare.smk").read_text()
        (tmp / "rules" / "compare_other.smk").write_text(without_rule(compare_smk, "compare"))
        per_step = tmp / "Snakefile.per-step"
        per_step.write_text(PER_STEP_SNAKEFILE)

        def config_file(name: str, content: dict) -> Path:
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(content, sort_keys=False))
            return path

        def best(snakefile: Path, config: Path | None, tag: str, *extra: str) -> tuple[float, float, float, int]:
            runs = [measure(snakefile, config, tmp / f"wd-{tag}", *extra) for _ in range(args.repeat)]
            return min(runs)

        full_cfg = config_file(f"study-{args.cells}", study(args.cells, args.steps))
        full = best(ROOT / "Snakefile", full_cfg, "full", *QUIET)
        full_print = None if args.smoke else best(ROOT / "Snakefile", full_cfg, "full")
        small = base = None
        if args.baseline_cells:
            small_cfg = config_file(f"study-{args.baseline_cells}", study(args.baseline_cells, args.steps))
            small = full if args.baseline_cells == args.cells else best(ROOT / "Snakefile", small_cfg, "small", *QUIET)
            base = best(per_step, small_cfg, "per-step", *QUIET)

        control = bare = None
        if args.control_seeds:
            control_cfg = config_file("control", control_factorial(args.control_seeds))
            rules, deps = job_graph(ROOT / "Snakefile", control_cfg, tmp / "wd-control-dag")
            bare_file = tmp / "Snakefile.bare"
            bare_file.write_text(bare_snakefile(rules, deps, tmp / "bare-graph.json"))
            control = best(ROOT / "Snakefile", control_cfg, "control", *QUIET)
            bare = best(bare_file, None, "bare", *QUIET)
            n_edges = sum(len(v) for v in deps.values())
            if bare[3] != control[3] or bare[3] != len(rules):
                raise SystemExit(f"the bare Snakefile has {bare[3]} jobs, the workflow {control[3]} "
                                 f"(its --dag: {len(rules)})")

    checkpoints = len([1, *[2**k for k in range(10)], *range(1000, args.steps + 1, 1000)]) if args.steps >= 1000 \
        else len({0, *[2**k for k in range(10) if 2**k <= args.steps]})
    print(f"study: {args.cells} cells x {checkpoints} checkpoints (pythia-70m-deduped to step {args.steps}), "
          f"best of {args.repeat}")
    print(f"{'design':<44} {'cells':>6} {'jobs':>7} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12}")
    rows = [("one compare per cell (this workflow), -n -q", args.cells, full)]
    if full_print:
        rows.append(("one compare per cell, -n (jobs printed)", args.cells, full_print))
    if base:
        rows += [("one compare per cell, -n -q", args.baseline_cells, small),
                 ("one compare per (cell, step), -n -q", args.baseline_cells, base)]
    for name, n, (wall, cpu, rss, jobs) in rows:
        print(f"{name:<44} {n:>6} {jobs:>7} {wall:>8.2f} {cpu:>7.2f} {rss:>12.0f}")
    if base:
        scale = args.cells / args.baseline_cells
        # extrapolate the per-step design: the fixed start-up (the per-cell design's small run) stays, the rest scales
        fixed_t, fixed_m = small[0], small[2]
        base_t = fixed_t + (base[0] - fixed_t) * scale
        base_m = fixed_m + (base[2] - fixed_m) * scale
        base_jobs = round(base[3] * scale)
        print(f"{'one compare per (cell, step), extrapolated':<44} {args.cells:>6} {base_jobs:>7} {base_t:>8.2f} "
              f"{'':>7} {base_m:>12.0f}   (linear from {args.baseline_cells} cells, start-up kept fixed)")
        print(f"ratio per-step / per-cell at {args.cells} cells: time {base_t / full[0]:.1f}x, "
              f"memory {base_m / full[2]:.1f}x, jobs {base_jobs / full[3]:.0f}x (per-step extrapolated)")
        print(f"ratio per-step / per-cell at {args.baseline_cells} cells (both measured): "
              f"time {base[0] / small[0]:.1f}x, memory {base[2] / small[2]:.1f}x, jobs {base[3] / small[3]:.0f}x")
    ok = full[0] < 5 and full[2] < 300
    print(f"goal < 5 s and < 300 MB at {args.cells} cells: {'met' if ok else 'NOT met'} "
          f"({full[0]:.2f} s, {full[2]:.0f} MB)")
    if control:
        cells = n_cells_of(control_factorial(args.control_seeds))
        print()
        print(f"70m control's axes, factorial, x {args.control_seeds} seeds: {cells} cells, "
              f"{control[3]} jobs, {n_edges} edges, best of {args.repeat}")
        print(f"{'':<44} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12}")
        for name, (wall, cpu, rss, _) in (("this workflow, -n -q", control), ("bare Snakefile, same jobs and edges", bare)):
            print(f"{name:<44} {wall:>8.2f} {cpu:>7.2f} {rss:>12.0f}")
        ratio = control[0] / bare[0]
        met = ratio <= 1.5
        print(f"ratio workflow / bare: {ratio:.2f}x wall, {control[1] / bare[1]:.2f}x CPU (goal <= 1.5x wall: "
              f"{'met' if met else 'NOT met'})")
        ok = ok and met
    if args.smoke:
        return 0  # the figures mean nothing at these sizes; the script ran
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
