"""CAASL's reward: the expected number of correct adjacency entries (paper eq. 3).

For a history h and the true graph A (f32[d, d], A[i, j] = 1 for i -> j) the AVICI
posterior gives independent edge probabilities p_ij = q(A_ij = 1 | h). The paper
estimates E_{G ~ q}[sum_ij 1{G_ij = A_ij}] with Monte-Carlo graph samples; by
linearity of expectation it is exactly

    R(h) = sum_ij [A_ij p_ij + (1 - A_ij)(1 - p_ij)],

over all d^2 entries, diagonal included (with p_ii = 0 and A_ii = 0 every diagonal
entry is correct, so R ranges over [d, d^2]). No sampling, no variance. The step
reward is the improvement r_t = R(h_t) - R(h_{t-1}), so an episode's undiscounted
return telescopes to R(h_T) - R(h_0). The environments compute that difference
themselves once a score is plugged in:

    score_fn = make_score_fn(params, config)
    env = make_env("linear-d10").with_score(score_fn)

The exact posterior of a linear env's prior (reward/exact.py) plugs in the same way,
as an oracle reward without a reward model's errors:

    env = make_env("linear-d10")
    env = env.with_score(make_score_fn({}, ExactPrior.of_env(env)))
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from caasl_jax.metrics import expected_correct_entries
from caasl_jax.microbatch import vmap_in_chunks
from caasl_jax.reward.exact import ExactPrior, exact_edge_probs
from caasl_jax.reward.model import AviciConfig, Params, edge_probs

__all__ = [
    "expected_correct_entries",
    "make_score_fn",
    "posterior_edge_probs",
    "reward_from_probs",
    "step_reward",
]

RewardConfig = AviciConfig | ExactPrior


def posterior_edge_probs(params: Params, data, mask, config: RewardConfig) -> jax.Array:
    """Edge probabilities f32[d, d] of one padded history (data f32[N, d, 2], mask
    bool[N]) under a reward model: the AVICI network (an AviciConfig and its params)
    or the exact posterior of a linear prior (an ExactPrior; params unused, {})."""
    if isinstance(config, ExactPrior):
        return exact_edge_probs(data[..., 0], data[..., 1] > 0.5, mask, config)
    return edge_probs(params, data, mask, config)


def reward_from_probs(probs: jax.Array, graph: jax.Array) -> jax.Array:
    """R for edge probabilities and true graphs f32[..., d, d] -> f32[...]."""
    chex.assert_equal_shape([probs, graph])
    if probs.ndim == 2:
        return expected_correct_entries(probs, graph)
    flat_p = probs.reshape(-1, *probs.shape[-2:])
    flat_a = graph.reshape(-1, *graph.shape[-2:])
    return jax.vmap(expected_correct_entries)(flat_p, flat_a).reshape(probs.shape[:-2])


def step_reward(probs_before: jax.Array, probs_after: jax.Array, graph: jax.Array) -> jax.Array:
    """r_t = R(h_t) - R(h_{t-1}) from the posteriors before and after a design step."""
    return reward_from_probs(probs_after, graph) - reward_from_probs(probs_before, graph)


def make_score_fn(params: Params, config: RewardConfig, microbatch: int | None = None) -> Callable:
    """score_fn(history, graph) -> f32[] = R(history) under the reward model (params,
    config): the AVICI network, or with an ExactPrior the exact posterior ({} params).

    `history` is a caasl_jax.envs.core.History (data f32[N, d, 2], length i32[]);
    its padding rows are masked. Jittable and vmappable (a vmap over environments runs
    in chunks of `microbatch` histories, see caasl_jax.microbatch); forward only.
    """

    def score(p, data, mask, graph):
        return expected_correct_entries(posterior_edge_probs(p, data, mask, config), graph)

    chunked_score = vmap_in_chunks(score, microbatch)

    def score_fn(history, graph: jax.Array) -> jax.Array:
        chex.assert_rank(history.data, 3)
        d = history.data.shape[-2]
        chex.assert_shape(graph, (d, d))
        graph = jnp.asarray(graph, jnp.float32)
        return chunked_score(params, history.data, history.mask, graph)

    return score_fn
