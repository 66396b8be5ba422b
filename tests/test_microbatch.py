"""Micro-batched evaluation gives the whole-batch results (caasl_jax.microbatch)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax import microbatch as mb
from caasl_jax.agents.networks import CriticConfig, EncoderConfig, PolicyConfig
from caasl_jax.agents.redq import REDQ, REDQConfig, Transition
from caasl_jax.envs.core import History

N, D = 6, 3


def _agent(microbatch):
    enc = EncoderConfig(dim=8, num_layers=1, num_heads=2, ffn_multiplier=2, dropout=0.1)
    return REDQ(
        PolicyConfig(encoder=enc, hidden=(8,)),
        CriticConfig(encoder=dataclasses.replace(enc, dropout=0.0), hidden=(8,)),
        REDQConfig(microbatch=microbatch),
    )


def _history(key, shape):
    data = jax.random.normal(key, (*shape, N, D, 2))
    length = jax.random.randint(key, shape, 2, N + 1)
    return History(data=data, length=length)


def _batch(batch_size):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    return Transition(
        obs=_history(k1, (1, batch_size)),
        action=jax.random.uniform(k2, (1, batch_size, 2 * D), minval=-1, maxval=1),
        reward=jax.random.normal(k3, (1, batch_size)),
        next_obs=_history(k2, (1, batch_size)),
        done=jnp.zeros((1, batch_size)),
    )


def test_resolve_defaults_and_rejects_bad_values():
    assert mb.resolve(None) == mb.CPU_MICROBATCH  # tests run on CPU
    assert mb.resolve(0) == 0 and mb.resolve(3) == 3
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="microbatch"):
            mb.resolve(bad)
    with pytest.raises(ValueError, match="microbatch"):
        REDQConfig(microbatch=-2)


def test_mean_value_and_grad_matches_whole_batch_with_padding():
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    xs = jax.random.normal(jax.random.key(0), (7, 3))  # 7 = 2 chunks of 3 + 1 padded

    def loss(p, x):
        value = jnp.sum(jnp.tanh(x * p["w"])) + p["b"] ** 2
        return value, value * 2

    (whole, aux_whole), g_whole = mb.mean_value_and_grad(loss, params, xs, 0)
    (chunked, aux_chunked), g_chunked = mb.mean_value_and_grad(loss, params, xs, 3)
    np.testing.assert_allclose(whole, chunked, rtol=1e-6)
    assert aux_chunked.shape == (7,)
    np.testing.assert_allclose(aux_whole, aux_chunked, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_vmap_in_chunks_equals_vmap_and_shares_unbatched_args():
    w = jnp.array([1.0, -2.0, 0.5])
    fn = lambda w, x, s: (jnp.sin(x @ w) * s, x.sum())  # noqa: E731
    xs = jax.random.normal(jax.random.key(0), (10, 3))
    chunked = mb.vmap_in_chunks(fn, 4)
    expected = jax.vmap(fn, in_axes=(None, 0, None))(w, xs, 3.0)
    got = jax.jit(jax.vmap(chunked, in_axes=(None, 0, None)))(w, xs, 3.0)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(chunked(w, xs[0], 3.0)[0], fn(w, xs[0], 3.0)[0])


def test_redq_update_and_act_do_not_depend_on_microbatch():
    batch = _batch(7)
    results = {}
    for size in (0, 3):
        agent = _agent(size)
        state = agent.init(
            jax.random.key(0), jax.tree.map(lambda x: x[0, 0], batch.obs), batch.action[0, 0]
        )
        new_state, metrics = jax.jit(agent.update)(state, batch, jax.random.key(2))
        action, log_prob = jax.jit(agent.act)(
            new_state.policy_params, jax.random.key(3), batch.obs
        )
        results[size] = (new_state, metrics, action, log_prob)
    (s0, m0, a0, l0), (s3, m3, a3, l3) = results[0], results[3]
    for key in m0:
        np.testing.assert_allclose(m0[key], m3[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s3)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(a0, a3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l0, l3, rtol=1e-5, atol=1e-5)
