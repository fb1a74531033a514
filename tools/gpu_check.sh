#!/usr/bin/env bash
# One command for every GPU figure and GPU test (tools/gpu_check.py says what it runs):
#   bash tools/gpu_check.sh OUT_DIR             on a GPU machine (DALI and PyAV importable)
#   bash tools/gpu_check.sh [OUT_DIR] --dry-run on any machine: the plumbing at toy sizes
# On a GPU machine without a package registry, install DALI and PyAV from wheels into a
# target folder first and put it on PYTHONPATH (README: "Running on GPUs").
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then
  out=$(mktemp -d /tmp/gpu_check.XXXX)  # a dry run needs no place of its own
elif [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]" >&2
  exit 2
else
  out=$1; shift
fi
mkdir -p "$out"
missing=$(python3 -c "
import importlib
for m in ('torch', 'nvidia.dali', 'av', 'yaml', 'pytest'):
    try:
        importlib.import_module(m)
    except ImportError:
        print(m)" 2>&1)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (see README, 'Running on GPUs')" | tee -a "$out/gpu_check.log" >&2
  [[ " $* " == *" --dry-run "* ]] || echo "gpu_check: steps that need them will fail and be recorded" >&2
fi
exec python3 tools/gpu_check.py "$out" "$@"
