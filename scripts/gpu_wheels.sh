#!/usr/bin/env bash
# Download into .whl/ the wheels that the lent GPU machine's image lacks, for its
# Python 3.12 on x86-64 (the device tool's notes; run here, where pip can reach an
# index, from the repository root):
#     bash scripts/gpu_wheels.sh
# The GPU scripts (benchmarks/gpu.sh, scripts/gpu_pretrain.sh) install them into
# /tmp/site when .whl/ holds any; name ".whl" in the run's carry. The image has jax,
# flax, optax, chex, orbax-checkpoint, numpy, scipy, pyyaml, tqdm and matplotlib; it
# lacks distrax and its tfp-nightly (with decorator, gast, dm-tree) and tensorboardX.
# Versions are those this checkout's .venv runs (what CI tests), about 7 MB in all.
set -euo pipefail
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[[ $PY == /* ]] || PY=$PWD/$PY  # the interpreter as given (a venv's link stays a link)
cd "$(dirname "$0")/.."
PACKAGES=(distrax tfp-nightly decorator gast dm-tree tensorboardX)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
    || { echo "gpu_wheels: $name is not installed in $PY (run scripts/setup.sh first)" >&2; exit 2; }
  pins+=("$name==$version")
done
fresh=$(mktemp -d)  # .whl is replaced only after every download succeeded
trap 'rm -rf "$fresh"' EXIT
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$fresh" "${pins[@]}"
rm -rf .whl && mv "$fresh" .whl && chmod 755 .whl
ls -l .whl
du -sh .whl
