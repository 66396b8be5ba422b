"""Throughput of the fused training step, by stage, for a packaged config.

    python -m benchmarks.train_throughput [--config small] [--set key=value ...]
        [--devices 1 2 4] [--calls 2] [--reward-size shipped|official|tiny]

Prints JSON with, per device count:
- env transitions/s of the rollout stage (policy + env + AVICI reward, B envs x T steps),
- gradient steps/s of the learn stage (one REDQ update = utd critic steps + 1 policy step),
- the whole fused call (K iterations of rollout + replay + learn) and its transitions/s,
- replay bytes per transition, and the projected time of a paper-scale run
  (1e8 transitions, 640k gradient steps of batch 4096) at the measured speeds.
Fake CPU devices come from `jax_num_cpu_devices` (set before JAX starts, so each
device count runs in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import machine_info, time_call
from caasl_jax.cli import DefaultsHelpFormatter, positive_int

PAPER_TRANSITIONS = 1e8
PAPER_GRAD_STEPS = 640_000
PAPER_BATCH = 4096


def measure(args) -> dict:
    import jax

    if args.devices_here > 1:
        jax.config.update("jax_num_cpu_devices", args.devices_here)
    from caasl_jax import replay as replay_lib
    from caasl_jax.config import load_config
    from caasl_jax.train import RewardModelScore, make_trainer

    overrides = list(args.set)
    config = load_config(args.config, overrides)
    score_builder = None
    if args.reward_size != "shipped":
        from caasl_jax.reward.model import AviciConfig

        size = {
            "official": dict(dim=128, layers=8, heads=8, key_size=32),
            "tiny": dict(dim=16, layers=1, heads=2, key_size=8),
        }[args.reward_size]
        score_builder = RewardModelScore(AviciConfig(**size))
    devices = jax.devices()[: args.devices_here]
    trainer, reward_params = make_trainer(config, devices, score_builder)
    if score_builder is not None:
        from caasl_jax.reward.model import init_params

        reward_params = init_params(jax.random.key(0), score_builder.config, trainer.env.d)
    state = trainer.init_state()
    env = trainer.env

    # stage 1: rollout (+ reward) on one device's share, jitted alone
    mesh_free = make_trainer(config, devices[:1], score_builder)[0]
    roll = jax.jit(mesh_free._rollout)
    policy_params = jax.device_put(state.agent.policy_params, devices[0])
    rp = jax.device_put(reward_params, devices[0])
    roll_t = time_call(roll, policy_params, rp, jax.random.key(1), repeats=args.repeats)["median_s"]

    # stage 2: one REDQ update at the global minibatch, single device
    st1 = mesh_free.init_state()
    episodes = roll(policy_params, rp, jax.random.key(2))
    replay = replay_lib.add_episodes(st1.replay, episodes)
    batch = replay_lib.sample_transitions(
        replay, jax.random.key(3), (config.redq.utd, config.batch_size)
    )
    update = jax.jit(mesh_free.agent.update)
    update_t = time_call(update, st1.agent, batch, jax.random.key(4), repeats=args.repeats)[
        "median_s"
    ]

    # whole fused call on all requested devices (warmup so that updates run)
    chunk = trainer.compile_chunk(state)
    state, _ = chunk(state, reward_params, trainer.chunk_key(0))  # compile + warm replay
    jax.block_until_ready(state)
    times = []
    for call in range(1, args.calls + 1):
        start = time.perf_counter()
        state, metrics = chunk(state, reward_params, trainer.chunk_key(call))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    call_t = sorted(times)[len(times) // 2]
    k = config.iterations_per_call
    transitions = config.num_envs * env.budget * k
    grad_steps = config.updates_per_iteration * k
    fused = {
        "call_s": call_t,
        "transitions_per_s": transitions / call_t,
        "grad_steps_per_s": grad_steps / call_t,
        "updates_ran": bool(jax.device_get(metrics["updated"]).all()),
    }
    per_grad = update_t  # batch = config.batch_size
    scale = PAPER_BATCH / config.batch_size
    projected_h = (
        PAPER_TRANSITIONS / (config.num_envs * env.budget / roll_t)
        + PAPER_GRAD_STEPS * per_grad * scale
    ) / 3600
    return {
        "config": args.config,
        "overrides": overrides,
        "reward_size": args.reward_size,
        "devices": len(devices),
        "env": config.env,
        "num_envs": config.num_envs,
        "batch_size": config.batch_size,
        "rollout": {"seconds": roll_t, "transitions_per_s": config.num_envs * env.budget / roll_t},
        "update": {
            "seconds": update_t,
            "grad_steps_per_s": 1 / update_t,
            "histories_per_s": config.batch_size * (config.redq.utd + 1) / update_t,
        },
        "fused": fused,
        "replay_bytes_per_transition": replay_lib.bytes_per_transition(state.replay),
        "projected_paper_run_hours_single_device": projected_h,
        "machine": machine_info(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", default="small")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--devices", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--calls", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--reward-size", choices=["shipped", "official", "tiny"], default="shipped")
    parser.add_argument("--devices-here", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices_here:
        print(json.dumps(measure(args)))
        return
    results = []
    for n in args.devices:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_throughput",
            "--devices-here",
            str(n),
            "--config",
            args.config,
            "--calls",
            str(args.calls),
            "--repeats",
            str(args.repeats),
            "--reward-size",
            args.reward_size,
        ]
        for item in args.set:
            cmd += ["--set", item]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if out.returncode:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"benchmark with {n} device(s) failed")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "train_throughput", "results": results}, indent=2))


if __name__ == "__main__":
    main()
