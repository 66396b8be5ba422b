#!/usr/bin/env bash
# Creates .venv (if missing) and installs caasl-jax with its test extras, plus the
# avici reference package (no dependencies; only tests import it) into .ref/.
# Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
if [ "${CAASL_SKIP_REFERENCE:-0}" != "1" ] && [ ! -d .ref/avici ]; then
  # The real avici is the reference our model and SERGIO are checked against. It pins
  # numpy<2 and no longer imports on current JAX, so it goes into its own folder with
  # --no-deps; the model tests stub its two broken imports (the SERGIO tests load only
  # its NumPy simulator file). Failure only skips those tests.
  python -m pip install -q --no-deps --target .ref avici==1.0.7 dm-haiku==0.0.17 jmp==0.0.4 tabulate \
    || echo "warning: could not install the avici reference; reference tests will skip"
fi
