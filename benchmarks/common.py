"""Shared timing helpers for the benchmarks (each benchmark prints one JSON object)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
        "attention": attention_path(),
    }


def attention_path() -> str:
    """Which attention the agents' networks trace here (caasl_jax/kernels)."""
    from caasl_jax.kernels import cpu_attention

    return "fused CPU kernel" if cpu_attention.use_for_current_backend() else "pure JAX"


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


def profile_kernels(
    fn: Callable, *args, calls: int, per_call: int = 1, top: int = 15
) -> list[dict]:
    """The `top` XLA kernels of jitted `fn(*args)` by time, from a `jax.profiler` trace of
    `calls` calls: microseconds per unit (a call holds `per_call` units, e.g. the design
    steps of a scan), how many times each runs per unit, and its output shape from the
    compiled HLO. Run `fn` once before (compile and warm-up are not excluded here)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        path = sorted(Path(trace_dir).glob("**/*.json.gz"))[-1]
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name \
                and not name.startswith(("Pjit", "while")):  # fmt: skip
            total[name] += event["dur"]
            count[name] += 1
    hlo = fn.lower(*args).compile().as_text()
    shapes = dict(re.findall(r"^\s*%([\w.\-]+) = (\S+\[[\d,]*\])", hlo, re.MULTILINE))
    units = calls * per_call
    return [
        {"kernel": name, "us_per_step": us / units, "per_step": count[name] / units,
         "shape": shapes.get(name, "")}
        for name, us in total.most_common(top)
    ]  # fmt: skip
