"""Tests never write to the user's compilation cache: scripts/test.sh gives the run a
temporary one (JAX_COMPILATION_CACHE_DIR, which wins); a bare `pytest` runs without."""

import os

os.environ["CAASL_COMPILE_CACHE"] = "off"
