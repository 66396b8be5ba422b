# Sourced by the GPU scripts (benchmarks/gpu.sh, scripts/gpu_pretrain.sh), from the
# repository root: where python3 lacks distrax (the GPU image), installs the carried
# wheels in .whl/ (made here by scripts/gpu_wheels.sh) into /tmp/site; puts them and
# this checkout on PYTHONPATH (the GPU machine does not pip-install the project).
if ! python3 -c "import distrax" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import jax; print(jax.devices())"
