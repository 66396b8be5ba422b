#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the main job on the small default:
# a short CAASL training run that writes a checkpoint, metrics (JSONL, TensorBoard)
# and a plot of the training curves under runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
CAASL_SKIP_REFERENCE=1 bash scripts/setup.sh
. .venv/bin/activate
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
caasl train --config small --run-dir "${RUN_DIR:-runs/quickstart}" --overwrite "$@"
