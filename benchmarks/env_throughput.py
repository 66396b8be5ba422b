"""Environment transitions per second for B environments stepping together.

    python -m benchmarks.env_throughput [--env linear-d10] [--batch 1 100 1000 10000]

Prints JSON with two figures per batch size, reward model excluded (score_fn=None):
- steps: T design steps of B reset environments, one jitted scan of the vmapped
  step (transitions = B * T);
- episodes: sampling fresh hidden parameters + reset (n0 rows) + the T steps, i.e.
  the whole episode cost divided over its B * T transitions.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.common import emit, machine_info, time_call
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.envs import make_env


def steps_fn(env, batch: int):
    param_keys, reset_keys = jax.random.split(jax.random.key(0), (2, batch))
    params = jax.vmap(env.sample_params)(param_keys)
    _, states = jax.vmap(env.reset)(reset_keys, params)
    actions = jax.random.uniform(jax.random.key(1), (batch, env.action_dim), minval=-1, maxval=1)

    def run(key):
        def body(states, step_key):
            step_keys = jax.random.split(step_key, batch)
            _, states, reward, _, _ = jax.vmap(env.step)(step_keys, states, actions, params)
            return states, reward

        states_out, rewards = jax.lax.scan(body, states, jax.random.split(key, env.budget))
        return states_out.history.data.sum() + rewards.sum()

    return jax.jit(run)


def episode_fn(env, batch: int):
    def one(key):
        params_key, rollout_key = jax.random.split(key)
        params = env.sample_params(params_key)
        policy = lambda k, _: jax.random.uniform(k, (env.action_dim,), minval=-1, maxval=1)
        history, _, rewards = env.rollout(rollout_key, params, policy)
        return history.data.sum() + rewards.sum()

    return jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, batch)).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--env", default="linear-d10")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 100, 1000, 10000])
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args(argv)
    env = make_env(args.env)
    rows = []
    for batch in args.batch:
        key = jax.random.key(2)
        steps, episodes = steps_fn(env, batch), episode_fn(env, batch)
        steps_s = time_call(steps, key, repeats=args.repeats)["median_s"]
        episode_s = time_call(episodes, key, repeats=args.repeats)["median_s"]
        transitions = batch * env.budget
        rows.append(
            {
                "batch": batch,
                "steps_s": steps_s,
                "transitions_per_s": transitions / steps_s,
                "episode_s": episode_s,
                "episode_transitions_per_s": transitions / episode_s,
                "episode_samples_per_s": batch * env.n_rows / episode_s,
            }
        )
    emit(
        {
            "benchmark": "env_throughput",
            "env": args.env,
            "budget": env.budget,
            "n0": env.n0,
            "results": rows,
            "machine": machine_info(),
        }
    )


if __name__ == "__main__":
    main()
