"""Episode replay: exact rebuild of played transitions, ring overwrite, compactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.envs.core import append_rows, empty_history
from caasl_jax.replay import (
    Episode,
    add_episodes,
    bytes_per_transition,
    init_replay,
    num_transitions,
    pack_indicators,
    sample_transitions,
    unpack_indicators,
)

N0, T, K, D = 3, 4, 2, 10  # d = 10 exercises two packed bytes per row
A = 2 * D


def play_episode(seed):
    """A hand-made episode: returns (Episode, list of histories h_0..h_T)."""
    rng = np.random.default_rng(seed)
    h = append_rows(
        empty_history(N0 + T * K, D),
        jnp.asarray(rng.normal(size=(N0, D)), jnp.float32),
        jnp.zeros((N0, D)),
    )
    histories, actions = [h], []
    for _ in range(T):
        action = jnp.asarray(rng.uniform(-1, 1, size=A), jnp.float32)
        targets = jnp.broadcast_to((action[:D] > 0).astype(jnp.float32), (K, D))
        values = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
        h = append_rows(h, values, targets)
        histories.append(h)
        actions.append(action)
    rewards = jnp.asarray(rng.normal(size=T), jnp.float32)
    dones = jnp.arange(T) == T - 1
    return Episode(h, jnp.stack(actions), rewards, dones), histories


def stack(episodes):
    return jax.tree.map(lambda *x: jnp.stack(x), *episodes)


def test_pack_roundtrip():
    bits = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(5, 13)), jnp.float32)
    packed = pack_indicators(bits)
    assert packed.shape == (5, 2) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_indicators(packed, 13), bits)


def test_rebuilds_exactly_the_played_transitions():
    played = [play_episode(s) for s in range(3)]
    state = init_replay(8, n0=N0, budget=T, d=D, action_dim=A, samples_per_step=K)
    state = add_episodes(state, stack([e for e, _ in played]))
    assert int(num_transitions(state)) == 3 * T
    batch = jax.jit(sample_transitions, static_argnums=2)(state, jax.random.key(0), (4, 16))
    assert batch.obs.data.shape == (4, 16, N0 + T * K, D, 2)
    assert batch.action.shape == (4, 16, A)
    seen = 0
    for g in range(4):
        for b in range(16):
            tr = jax.tree.map(lambda x, g=g, b=b: x[g, b], batch)
            # identify the episode by its action, the step by the obs length
            t = (int(tr.obs.length) - N0) // K
            matches = [
                i for i, (e, _) in enumerate(played) if np.array_equal(e.actions[t], tr.action)
            ]
            assert len(matches) == 1
            ep, hist = played[matches[0]]
            np.testing.assert_array_equal(tr.obs.data, hist[t].data)
            np.testing.assert_array_equal(tr.obs.length, hist[t].length)
            np.testing.assert_array_equal(tr.next_obs.data, hist[t + 1].data)
            np.testing.assert_array_equal(tr.next_obs.length, hist[t + 1].length)
            np.testing.assert_array_equal(tr.obs.mask, hist[t].mask)
            assert float(tr.reward) == float(ep.rewards[t])
            assert bool(tr.done) == (t == T - 1)
            seen += 1
    assert seen == 64


def test_ring_buffer_overwrites_oldest():
    episodes = [play_episode(s)[0] for s in range(5)]
    state = init_replay(3, n0=N0, budget=T, d=D, action_dim=A, samples_per_step=K)
    state = add_episodes(state, stack(episodes[:2]))
    assert int(state.size) == 2 and int(state.position) == 2
    state = add_episodes(state, stack(episodes[2:4]))  # wraps: slot 0 <- episode 3
    assert int(state.size) == 3 and int(state.position) == 1
    np.testing.assert_array_equal(state.actions[0], episodes[3].actions)
    np.testing.assert_array_equal(state.actions[1], episodes[1].actions)
    np.testing.assert_array_equal(state.actions[2], episodes[2].actions)
    state = add_episodes(state, stack(episodes[4:5]))
    np.testing.assert_array_equal(state.actions[1], episodes[4].actions)
    # every sampled transition comes from a stored episode (0 is gone)
    batch = sample_transitions(state, jax.random.key(1), (64,))
    stored = np.asarray(state.actions)
    for a in np.asarray(batch.action):
        assert any((a == stored[i]).all(axis=-1).any() for i in range(3))
    assert not (np.asarray(batch.action)[:, None] == np.asarray(episodes[0].actions)).all(-1).any()


def test_sampling_covers_steps_and_episodes():
    state = init_replay(4, n0=N0, budget=T, d=D, action_dim=A, samples_per_step=K)
    state = add_episodes(state, stack([play_episode(s)[0] for s in range(2)]))
    batch = sample_transitions(state, jax.random.key(2), (400,))
    lengths = set(np.asarray(batch.obs.length).tolist())
    assert lengths == {N0 + t * K for t in range(T)}
    np.testing.assert_array_equal(batch.next_obs.length, batch.obs.length + K)


def test_compact_memory_target():
    state = init_replay(16, n0=50, budget=10, d=10, action_dim=20)
    release = 2 * 60 * 10 * 2 * 4
    assert bytes_per_transition(state) <= release / 10


def test_bad_config_and_overflow():
    with pytest.raises(ValueError, match="capacity"):
        init_replay(0, n0=1, budget=1, d=2, action_dim=4)
    state = init_replay(1, n0=N0, budget=T, d=D, action_dim=A, samples_per_step=K)
    with pytest.raises(ValueError, match="do not fit"):
        add_episodes(state, stack([play_episode(s)[0] for s in range(2)]))
