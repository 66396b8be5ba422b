# Sourced by the GPU scripts (benchmarks/gpu.sh, scripts/gpu_pretrain.sh), from the
# repository root. Puts the wheels carried in .whl/ (made here by
# scripts/gpu_wheels.sh; the GPU image lacks distrax and its needs) and this checkout
# on PYTHONPATH (the GPU machine does not pip-install the project), installing the
# wheels into /tmp/site once per machine. Unless QUICK=1 (the CPU smoke test), stops
# when JAX sees no GPU, so that a failed CUDA start never records CPU figures as GPU.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if ! python3 -c "import distrax" 2> /dev/null; then
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  if ! python3 -c "import distrax" 2> /dev/null; then
    if ! compgen -G ".whl/*.whl" > /dev/null; then
      echo "distrax is missing and .whl/ holds no wheels: run scripts/gpu_wheels.sh" \
        "here and carry .whl" >&2
      exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  fi
fi
python3 - "${QUICK:-0}" <<'PY' || exit 2
import sys
import jax
import caasl_jax.train  # every import the scripts need, before any long work

print(jax.devices(), flush=True)
if sys.argv[1] != "1" and jax.default_backend() != "gpu":
    sys.exit(f"no GPU: JAX runs on {jax.default_backend()} (set QUICK=1 for a CPU smoke test)")
PY
