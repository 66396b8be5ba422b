"""Where the time of one paper-size REDQ gradient step goes, by XLA kernel category.

    taskset -c 0 python -m benchmarks.step_profile [--batch 32] [--calls 3] [--top 25]

Profiles `jax.jit(REDQ.update)` at the paper's network sizes (the step of
`benchmarks.grad_step`) with `jax.profiler` and sums kernel time by (forward or
backward, variable or sample axis, kernel kind, output shape). XLA's CPU runtime runs
independent kernels side by side on the cores, which overlaps their durations; on one
core (`taskset -c 0`) the kernel times add up to the step. Prints JSON (milliseconds per
step); this is the profile behind "Backward attention products" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import jax

from benchmarks.common import emit, machine_info, profile_kernels
from benchmarks.grad_step import update_step
from caasl_jax.cli import DefaultsHelpFormatter, positive_int


def kernel_category(op_name: str, kernel: str, shape: str) -> str:
    """'<fwd|bwd> <variables|samples|other> <kernel kind> <shape>' of one kernel."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    axis = next((a for a in ("variables", "samples") if f"_{a}/" in op_name), "other")
    kind = re.sub(r"\.\d+$", "", kernel)
    return f"{direction} {axis} {kind} {shape}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--calls", type=positive_int, default=3)
    parser.add_argument("--top", type=positive_int, default=25, help="categories to print")
    args = parser.parse_args(argv)
    step, inputs = update_step(batch=args.batch)
    jax.block_until_ready(step(*inputs))
    start = time.perf_counter()
    jax.block_until_ready(step(*inputs))
    seconds = time.perf_counter() - start
    kernels = profile_kernels(step, *inputs, calls=args.calls, top=100_000)
    hlo = step.lower(*inputs).compile().as_text()
    op_names = dict(re.findall(r'^\s*%([\w.\-]+) = .*?op_name="([^"]+)"', hlo, re.MULTILINE))
    ms, count = collections.Counter(), collections.Counter()
    for k in kernels:
        category = kernel_category(op_names.get(k["kernel"], ""), k["kernel"], k["shape"])
        ms[category] += k["us_per_step"] / 1000
        count[category] += k["per_step"]
    emit(
        {
            "benchmark": "step_profile",
            "batch": args.batch,
            "step_s": seconds,
            "kernel_ms_total": sum(ms.values()),
            "top": [
                {"category": c, "ms": t, "kernels_per_step": count[c]}
                for c, t in ms.most_common(args.top)
            ],
            "machine": machine_info(),
        }
    )


if __name__ == "__main__":
    main()
