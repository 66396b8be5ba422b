"""Tests never write to the user's compilation cache: scripts/test.sh gives the run a
temporary one (JAX_COMPILATION_CACHE_DIR); a bare `pytest` runs without one."""

import os

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ.setdefault("CAASL_COMPILE_CACHE", "off")
