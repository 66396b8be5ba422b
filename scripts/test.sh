#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite (pytest, 2 workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export JAX_PLATFORMS=cpu
python -m pytest -n 2 --dist loadfile -q "$@"
