"""Rollouts of design policies and baselines over batches of environments.

A *design policy* here is any `policy(key, history) -> action f32[action_dim]`; the
trained CAASL policy and the baselines share this interface, so one compiled rollout
function serves all of them:

    policy = agent_policy(agent, policy_params)            # stochastic CAASL policy
    rewards = rollout_rewards(env, policy, params, key)    # f32[B, T]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from caasl_jax.envs.core import Environment, History

Policy = Callable[[jax.Array, History], jax.Array]
POLICY_MODES = ("stochastic", "deterministic")


def agent_policy(agent, policy_params, mode: str = "stochastic") -> Policy:
    """The CAASL policy of a REDQ agent as a design policy (dropout off)."""
    if mode not in POLICY_MODES:
        raise ValueError(f"unknown policy mode {mode!r}; choose one of {POLICY_MODES}")
    if mode == "stochastic":
        return lambda key, history: agent.act(policy_params, key, history, deterministic=True)[0]
    from caasl_jax.agents.networks import mode_action

    return lambda key, history: mode_action(agent.policy, policy_params, history.data, history.mask)


def random_policy(env: Environment) -> Policy:
    """Random designs: each variable is a target w.p. 1/2, values uniform in range."""
    return lambda key, history: jax.random.uniform(key, (env.action_dim,), minval=-1.0, maxval=1.0)


def random_single_target_policy(env: Environment) -> Policy:
    """One uniformly chosen target per step, with a uniform value."""

    def policy(key, history):
        target_key, value_key = jax.random.split(key)
        target = jax.random.randint(target_key, (), 0, env.d)
        targets = jnp.where(jnp.arange(env.d) == target, 1.0, -1.0)
        values = jax.random.uniform(value_key, (env.action_dim - env.d,), minval=-1.0, maxval=1.0)
        return jnp.concatenate([targets, values])

    return policy


def observational_policy(env: Environment) -> Policy:
    """No intervention at any step (every a_i <= 0)."""
    return lambda key, history: -jnp.ones((env.action_dim,), jnp.float32)


BASELINES: dict[str, Callable[[Environment], Policy]] = {
    "random": random_policy,
    "random-single": random_single_target_policy,
    "observational": observational_policy,
}


def rollout_episodes(env: Environment, policy: Policy, env_params: Any, key: jax.Array):
    """Roll out one episode per hidden-parameter set (leading axis [B] of env_params).

    Returns (final histories [B], actions f32[B, T, A], rewards f32[B, T]).
    """
    batch = jax.tree.leaves(env_params)[0].shape[0]
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k, p: env.rollout(k, p, policy))(keys, env_params)


def rollout_rewards(env: Environment, policy: Policy, env_params: Any, key: jax.Array):
    """Per-step rewards f32[B, T] of `policy` on the environments `env_params`."""
    return rollout_episodes(env, policy, env_params, key)[2]


def heldout_params(env: Environment, n_envs: int, seed: int) -> Any:
    """Fixed held-out hidden parameters (leading axis [n_envs]) for evaluation."""
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x5EED), n_envs)
    return jax.vmap(env.sample_params)(keys)


# ----------------------------------------------------------------------------------
# step-wise evaluation: the posterior after every acquisition
# ----------------------------------------------------------------------------------


def stepwise_metrics(env: Environment, histories: History, graphs, reward_params, reward_config):
    """Metrics of the reward model's posterior after 0..T design steps.

    histories: final histories [B]; graphs f32[B, d, d]. The posterior after step t
    reads the first n0 + t·k rows (the rest masked). Returns {metric: f32[B, T + 1]}.
    """
    from caasl_jax.metrics import all_metrics
    from caasl_jax.reward.model import edge_probs

    lengths = env.n0 + jnp.arange(env.budget + 1) * env.samples_per_step
    rows = jnp.arange(env.n_rows)

    def one(history, graph):
        def at(length):
            probs = edge_probs(reward_params, history.data, rows < length, reward_config)
            return all_metrics(probs, graph)

        return jax.vmap(at)(lengths)

    return jax.vmap(one)(histories, graphs)


def summarize_stepwise(metrics: dict) -> dict[str, dict[str, list[float]]]:
    """{metric: f32[B, T+1]} -> {metric: {"mean": [...], "stderr": [...]}} per step.

    Adds "return": expected correct entries minus its value before any design.
    """
    metrics = dict(metrics)
    metrics["return"] = metrics["expected_correct"] - metrics["expected_correct"][:, :1]
    out = {}
    for name, values in metrics.items():
        values = jnp.asarray(values, jnp.float32)
        n = values.shape[0]
        stderr = values.std(0, ddof=1) / jnp.sqrt(n) if n > 1 else jnp.zeros(values.shape[1])
        out[name] = {
            "mean": [float(v) for v in values.mean(0)],
            "stderr": [float(v) for v in stderr],
        }
    return out


def evaluate_policy(
    env: Environment, policy: Policy, reward_params, reward_config, n_envs: int, seed: int
) -> dict:
    """Roll `policy` out on n_envs fixed held-out environments (by seed) and score every step.

    The environments and the rollout randomness depend only on (env, n_envs, seed), so
    every policy and baseline is judged on the same systems.
    """
    params = heldout_params(env, n_envs, seed)
    key = jax.random.fold_in(jax.random.key(seed), 11)
    rollout = jax.jit(lambda params, key: rollout_episodes(env, policy, params, key)[0])
    histories = rollout(params, key)
    metrics = _stepwise_jit(env, reward_config)(histories, params.graph, reward_params)
    return summarize_stepwise(jax.device_get(metrics))


@functools.lru_cache(maxsize=32)
def _stepwise_jit(env: Environment, reward_config):
    """One compiled step-wise scorer per (env, reward model config), shared by all policies."""
    return jax.jit(lambda h, g, rp: stepwise_metrics(env, h, g, rp, reward_config))
