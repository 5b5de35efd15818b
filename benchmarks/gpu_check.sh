#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): speed and MFU against transformers, bitwise determinism,
# kill-and-resume, replicated vs ZeRO-1 memory, on one GPU in under 8 minutes; figures to one JSON file.
#   bash benchmarks/gpu_check.sh [OUT.json]           on a GPU machine (default benchmarks/gpu_check.json)
#   bash benchmarks/gpu_check.sh --smoke OUT.json     CPU, tiny shapes, seconds (what the tests run)
# Uses the Python on PATH (or $PYTHON) with this checkout's package; exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
out="${1:-benchmarks/gpu_check.json}"
export PYTHONPATH="$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py "${smoke[@]}" --out "$out"
