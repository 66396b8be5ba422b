"""Shared timing helpers for the benchmarks (each benchmark prints one JSON object)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable

import jax


def machine_info() -> dict:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def time_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and min wall time (s) of `fn(*args)`, blocking on its outputs; compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
