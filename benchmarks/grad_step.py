"""The two network hot paths at the paper's sizes, against the authors' release.

    python -m benchmarks.grad_step [--batch-sizes 32 64 128 256] [--devices 1 2 4]
        [--act-histories 1000] [--env linear|sergio] [--matmul-precision float32|bfloat16]
        [--microbatch N]

- one REDQ gradient step (policy + N critics + targets + temperature; utd = 1) on a
  minibatch of B histories of shape [60, 10, 2] (n0 = 50 + T = 10 rows), paper
  network sizes (`paper_configs`): median seconds, histories/s, the time to trace and
  compile it, XLA's temporary buffer size and the peak resident memory of a process
  that does only this;
- the same step sharded over 1, 2, 4 (fake CPU) devices with shard_map, gradients
  averaged across devices as in the trainer;
- sampling actions for `--act-histories` histories (inference path: dropout off).
Each measurement runs in its own process (clean peak memory; device count is fixed at
JAX start-up). Prints one JSON object; `benchmarks/report.py` turns it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import machine_info, time_call
from caasl_jax.checks import file_path_problem
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.jsonl import to_line

# the authors' PyTorch release on this machine class (REFERENCE.md section 5)
RELEASE = {"grad_step_s": 48.3, "grad_step_peak_gb": 14.4, "act_1000_s": 45.7}
N_ROWS, D = 60, 10


def _histories(key, shape):
    """Random histories [*shape] of [60, 10, 2] with 50..60 valid rows."""
    import jax

    from caasl_jax.envs.core import History

    data = jax.random.normal(key, (*shape, N_ROWS, D, 2))
    return History(data=data, length=jax.random.randint(key, shape, 50, N_ROWS + 1))


def paper_agent(env: str = "linear", microbatch: int | None = None):
    """(REDQ agent at the paper's network sizes, its initial state, action size)."""
    import jax
    import jax.numpy as jnp

    from caasl_jax.agents.networks import paper_configs
    from caasl_jax.agents.redq import REDQ, REDQConfig

    policy, critic = paper_configs(env)
    agent = REDQ(policy, critic, REDQConfig(microbatch=microbatch))
    action_dim = D * policy.per_variable
    key = jax.random.key(0)
    state = agent.init(key, _histories(key, ()), jnp.zeros((action_dim,)))
    return agent, state, action_dim


def update_step(batch: int, devices: int = 1, env: str = "linear", microbatch: int | None = None):
    """(jitted REDQ update, its inputs (state, minibatch [1, B], key)) at paper sizes;
    with devices > 1 the batch is split over them with shard_map as in the trainer."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from caasl_jax.agents.redq import Transition

    agent, state, action_dim = paper_agent(env, microbatch)
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    minibatch = Transition(
        obs=_histories(k1, (1, batch)),
        action=jax.random.uniform(k2, (1, batch, action_dim), minval=-1, maxval=1),
        reward=jax.random.normal(k3, (1, batch)),
        next_obs=_histories(k2, (1, batch)),
        done=jnp.zeros((1, batch)),
    )
    if devices == 1:
        return jax.jit(agent.update), (state, minibatch, jax.random.key(0))
    mesh = Mesh(jax.devices()[:devices], ("data",))
    batch_spec = jax.tree.map(lambda _: P(None, "data"), minibatch)
    step = jax.jit(
        jax.shard_map(
            lambda s, bt, k: agent.update(s, bt, k, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), batch_spec, P()),
            out_specs=(P(), P()),
        )
    )
    minibatch = jax.device_put(
        minibatch, jax.tree.map(lambda s: NamedSharding(mesh, s), batch_spec)
    )
    return step, (state, minibatch, jax.random.key(0))


def _measure(spec: dict) -> dict:
    import jax

    if spec["devices"] > 1:
        jax.config.update("jax_num_cpu_devices", spec["devices"])

    result = dict(spec)
    with jax.default_matmul_precision(spec["matmul_precision"]):
        if spec["what"] == "act":
            agent, state, _ = paper_agent(spec["env"], spec["microbatch"])
            obs = _histories(jax.random.key(1), (spec["batch"],))
            act = jax.jit(lambda p, k, o: agent.act(p, k, o)[0])
            timing = time_call(
                act, state.policy_params, jax.random.key(0), obs, repeats=spec["repeats"]
            )
            result.update(
                seconds=timing["median_s"], histories_per_s=spec["batch"] / timing["median_s"]
            )
        else:
            b = spec["batch"]
            step, inputs = update_step(b, spec["devices"], spec["env"], spec["microbatch"])
            start = time.perf_counter()
            memory = step.lower(*inputs).compile().memory_analysis()
            compile_s = time.perf_counter() - start
            timing = time_call(step, *inputs, repeats=spec["repeats"])
            result.update(
                compile_s=compile_s,
                seconds=timing["median_s"],
                histories_per_s=b / timing["median_s"],
                xla_temp_gb=(memory.temp_size_in_bytes / 1e9) if memory is not None else None,
            )
    # ru_maxrss is in KiB on Linux
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return result


def _run(spec: dict, rows_path: str | None = None) -> dict:
    """One measurement in a fresh process; its row is also appended to `rows_path`
    (JSON lines) at once, so a run cut short by a time limit keeps what it measured."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.grad_step", "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"benchmark {spec} failed")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if rows_path:
        with open(rows_path, "a") as f:
            f.write(to_line(row))
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--devices", type=positive_int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--device-batch", type=positive_int, default=256, help="batch of the device sweep"
    )
    parser.add_argument("--act-histories", type=positive_int, default=1000)
    parser.add_argument("--env", choices=["linear", "sergio"], default="linear")
    parser.add_argument("--matmul-precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--microbatch", type=int, default=None, help="default: automatic")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--rows", help="also append each measurement to this JSON-lines file")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = args.rows and file_path_problem(args.rows)
    if problem:  # before the first measurement
        parser.error(f"--rows {args.rows} {problem}")
    uneven = [n for n in args.devices if args.device_batch % n]
    if uneven:
        parser.error(f"--device-batch {args.device_batch} does not split over {uneven} devices")
    if args.spec:
        print(json.dumps(_measure(json.loads(args.spec))))
        return {}
    base = dict(
        env=args.env,
        microbatch=args.microbatch,
        matmul_precision=args.matmul_precision,
        repeats=args.repeats,
        devices=1,
    )
    results = {
        "benchmark": "grad_step",
        "release": RELEASE,
        "history_shape": [N_ROWS, D, 2],
        "act": _run({**base, "what": "act", "batch": args.act_histories}, args.rows),
        "batch_sweep": [
            _run({**base, "what": "update", "batch": b}, args.rows) for b in args.batch_sizes
        ],
    }
    measured = {r["batch"]: r for r in results["batch_sweep"]}
    results["device_sweep"] = [
        measured[args.device_batch]
        if n == 1 and args.device_batch in measured
        else _run({**base, "what": "update", "batch": args.device_batch, "devices": n}, args.rows)
        for n in args.devices
    ]
    results["machine"] = machine_info()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
