#!/usr/bin/env bash
# Set up retrace in ./.venv on a CPU machine: Python >= 3.10 and pip are all it needs.
#   bash scripts/setup.sh            runtime + workflow (snakemake, SLURM plugin)
#   bash scripts/setup.sh test       ... plus the test tools (pytest, transformers, ruff)
# The CPU torch wheel is pinned through constraints/cpu.txt; on a GPU cluster install instead with
#   pip install -e '.[workflow]'     (keeps the CUDA torch you already have)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="workflow"
[ "${1:-}" = "test" ] && extras="test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[$extras]"
echo "retrace installed in $(pwd)/.venv ($extras)"
