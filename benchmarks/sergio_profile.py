"""Where a SERGIO design step's time goes: a `jax.profiler` trace, summed per XLA kernel.

    python -m benchmarks.sergio_profile [--batch 1000] [--calls 10] [--top 15]

Traces the same jitted scan as `benchmarks.sergio_throughput` (B environments taking
the budget's design steps together) and prints JSON: milliseconds per call of the
scan, and the `--top` kernels by time per design step (microseconds), with how many
times each runs per step. These are the figures behind "Status" in RESULTS_SERGIO.md.
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks.common import emit, machine_info, profile_kernels
from benchmarks.sergio_throughput import design_steps_fn
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.envs.registry import make_env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=positive_int, default=1000)
    parser.add_argument("--calls", type=positive_int, default=10)
    parser.add_argument("--top", type=positive_int, default=15)
    args = parser.parse_args(argv)
    env = make_env("sergio-d10")
    steps, states, _ = design_steps_fn(env, args.batch)
    key = jax.random.key(2)
    for _ in range(3):
        jax.block_until_ready(steps(key, states))
    start = time.perf_counter()
    for _ in range(args.calls):
        jax.block_until_ready(steps(key, states))
    call_ms = 1000 * (time.perf_counter() - start) / args.calls
    kernels = profile_kernels(steps, key, states, calls=args.calls, per_call=env.budget,
                              top=args.top)
    emit({
        "benchmark": "sergio_profile",
        "batch": args.batch,
        "design_steps_per_call": env.budget,
        "ms_per_call": call_ms,
        "ms_per_design_step": call_ms / env.budget,
        "top_kernels": kernels,
        "machine": machine_info(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
