"""Tests never write to the user's caches: scripts/test.sh gives the run a temporary
XLA compilation cache (JAX_COMPILATION_CACHE_DIR, which wins; a bare `pytest` runs
without) and a temporary folder for the compiled CPU kernels (CAASL_KERNEL_CACHE; a
bare `pytest` gets one per worker)."""

import atexit
import os
import shutil
import tempfile

os.environ["CAASL_COMPILE_CACHE"] = "off"
if not os.environ.get("CAASL_KERNEL_CACHE"):
    os.environ["CAASL_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="caasl-kernels-")
    atexit.register(shutil.rmtree, os.environ["CAASL_KERNEL_CACHE"], True)
