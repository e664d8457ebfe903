#!/usr/bin/env bash
# Every GPU-only check in one go, one JSON (see benchmarks/gpu_check.py): run it first on any GPU this project
# gets, and commit what it writes under docs/results/gpu_check/. `--cpu` runs the same parts at CPU shapes (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
