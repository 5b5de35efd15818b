#!/usr/bin/env bash
# Set up and run retrace's checks from a clean clone: ruff, snakefmt and snakemake --lint, then the whole
# pytest suite.
# As root on Debian it also installs slurm-wlm (and iproute2, for the two-node cluster) so that the
# real-SLURM tests run (else they skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v slurmctld || ! command -v ip || ! command -v chromium; } >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge iproute2 chromium >/dev/null) || echo "warning: slurm-wlm or chromium not installed; SLURM and browser tests will skip"
fi
.venv/bin/ruff check .
.venv/bin/snakefmt --check Snakefile workflow/rules/
lint_dir="$(mktemp -d)"
.venv/bin/python -m snakemake -s Snakefile --directory "$lint_dir" --lint
rm -rf "$lint_dir"
.venv/bin/python -m pytest "$@"
