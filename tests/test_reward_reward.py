"""The CAASL reward: closed form, telescoping step rewards, env integration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.envs.registry import make_env
from caasl_jax.reward.model import AviciConfig, edge_probs, init_params
from caasl_jax.reward.reward import make_score_fn, reward_from_probs, step_reward

CFG = AviciConfig(dim=16, layers=1, heads=2, key_size=4, widening=2)


def test_closed_form_equals_monte_carlo_of_the_paper():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(5, 5)).astype(np.float32)
    np.fill_diagonal(p, 0.0)
    a = (rng.uniform(size=(5, 5)) < 0.4).astype(np.float32)
    np.fill_diagonal(a, 0.0)
    samples = rng.uniform(size=(200_000, 5, 5)) < p
    mc = (samples == (a > 0.5)).sum((1, 2)).mean()  # diagonal included
    assert float(reward_from_probs(jnp.asarray(p), jnp.asarray(a))) == pytest.approx(mc, abs=0.02)


def test_batched_reward_and_step_reward():
    rng = np.random.default_rng(1)
    p0 = rng.uniform(size=(2, 3, 4, 4)).astype(np.float32)
    p1 = rng.uniform(size=(2, 3, 4, 4)).astype(np.float32)
    a = (rng.uniform(size=(2, 3, 4, 4)) < 0.5).astype(np.float32)
    r = reward_from_probs(p1, a)
    assert r.shape == (2, 3)
    expected = (a * p1 + (1 - a) * (1 - p1)).sum((-1, -2))
    np.testing.assert_allclose(r, expected, rtol=1e-6)
    np.testing.assert_allclose(step_reward(p0, p1, a), r - reward_from_probs(p0, a), rtol=1e-6)


@pytest.fixture(scope="module")
def env_and_score():
    params = init_params(jax.random.key(0), CFG, 4)
    env = make_env("linear-d4", n0=6, budget=3)
    return env, params, make_score_fn(params, CFG)


def test_score_fn_matches_model_on_valid_rows(env_and_score):
    env, params, score_fn = env_and_score
    theta = env.sample_params(jax.random.key(1))
    history, _ = env.reset(jax.random.key(2), theta)
    score = jax.jit(score_fn)(history, theta.graph)
    probs = edge_probs(params, history.data[: env.n0], None, CFG)
    expected = reward_from_probs(probs, theta.graph)
    assert float(score) == pytest.approx(float(expected), abs=1e-4)


def test_env_rewards_telescope_to_final_minus_initial_score(env_and_score):
    env, params, score_fn = env_and_score
    scored = env.with_score(score_fn)
    theta = scored.sample_params(jax.random.key(3))

    def policy(key, history):
        return jax.random.uniform(key, (scored.action_dim,), minval=-1.0, maxval=1.0)

    out = jax.jit(lambda k: scored.rollout(k, theta, policy))(jax.random.key(4))
    history, rewards = out[0], out[-1]  # (history, [actions,] rewards)
    assert rewards.shape == (env.budget,)
    assert np.all(np.isfinite(rewards)) and np.any(rewards != 0.0)
    initial = score_fn(
        type(history)(data=history.data, length=jnp.asarray(env.n0, jnp.int32)), theta.graph
    )
    final = score_fn(history, theta.graph)
    assert float(rewards.sum()) == pytest.approx(float(final - initial), abs=1e-4)
