"""On-device episode replay: every episode is stored once, transitions are rebuilt.

A CAASL episode's histories are nested: h_t is the first n0 + t*k rows of the final
history h_T (k samples per design step). So instead of storing (h_t, h_{t+1}) per
transition -- the public release kept two f32[60, 10, 2] arrays per transition, 9,600
bytes -- the buffer keeps, per EPISODE,

    values      f32[N, d]            channel 0 of the final history
    indicators  u8[N, ceil(d / 8)]   channel 1 (0/1), bit-packed along the variables
    actions     f32[T, A]
    rewards     f32[T]
    dones       bool[T]

and `sample_transitions` rebuilds (h_t, a_t, r_t, h_{t+1}, done_t) by masking rows:
the rebuilt histories are exactly what the environment produced (rows past the
length are zero, as in a fresh env history). For linear-d10 (N = 60, T = 10, A = 20)
that is 337 bytes per transition, 28x less (see benchmarks/replay_memory.py).
The hidden graph is not stored: SAC does not need it.

Pure functions over a pytree state (a ring buffer of `capacity` episodes):

    state = init_replay(capacity, n0=50, budget=10, d=10, action_dim=20)
    state = add_episodes(state, episodes)        # Episode with a leading [B] axis
    batch = sample_transitions(state, key, (G, B))

Under shard_map every device holds its own buffer: shard the episode arrays on their
leading (capacity) axis and keep `position` / `size` replicated -- every device adds
the same number of episodes per call, so the counters stay equal everywhere. Nothing
in here is global or communicates.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import struct

from caasl_jax.agents.redq import Transition
from caasl_jax.envs.core import History


@struct.dataclass
class Episode:
    """A played episode (optionally with leading batch dims [...]).

    history: the FINAL history (data f32[..., N, d, 2], length i32[...]).
    actions: f32[..., T, A] the actions a_0..a_{T-1} (env layout).
    rewards: f32[..., T]; dones: bool[..., T] (done_t: h_{t+1} is terminal).
    """

    history: History
    actions: jax.Array
    rewards: jax.Array
    dones: jax.Array


@struct.dataclass
class ReplayState:
    """Ring buffer of C episodes.

    values f32[C, N, d]; indicators u8[C, N, ceil(d/8)]; actions f32[C, T, A];
    rewards f32[C, T]; dones bool[C, T]; position i32[] next slot to write;
    size i32[] number of stored episodes (<= C). Static: n0, samples_per_step, d.
    """

    values: jax.Array
    indicators: jax.Array
    actions: jax.Array
    rewards: jax.Array
    dones: jax.Array
    position: jax.Array
    size: jax.Array
    n0: int = struct.field(pytree_node=False)
    samples_per_step: int = struct.field(pytree_node=False)
    d: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.values.shape[-3]

    @property
    def budget(self) -> int:
        return self.rewards.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.values.shape[-2]


def init_replay(
    capacity: int,
    *,
    n0: int,
    budget: int,
    d: int,
    action_dim: int,
    samples_per_step: int = 1,
) -> ReplayState:
    """An empty buffer for `capacity` episodes of n0 + budget * samples_per_step rows."""
    for name, value, low in (
        ("capacity", capacity, 1),
        ("n0", n0, 0),
        ("budget", budget, 1),
        ("d", d, 1),
        ("action_dim", action_dim, 1),
        ("samples_per_step", samples_per_step, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"init_replay: {name} must be an integer >= {low}, got {value!r}")
    n_rows = n0 + budget * samples_per_step
    return ReplayState(
        values=jnp.zeros((capacity, n_rows, d), jnp.float32),
        indicators=jnp.zeros((capacity, n_rows, math.ceil(d / 8)), jnp.uint8),
        actions=jnp.zeros((capacity, budget, action_dim), jnp.float32),
        rewards=jnp.zeros((capacity, budget), jnp.float32),
        dones=jnp.zeros((capacity, budget), bool),
        position=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
        n0=n0,
        samples_per_step=samples_per_step,
        d=d,
    )


def pack_indicators(indicators: jax.Array) -> jax.Array:
    """f32/bool[..., d] 0/1 -> u8[..., ceil(d/8)] (little-endian bits along d)."""
    return jnp.packbits(indicators > 0.5, axis=-1, bitorder="little")


def unpack_indicators(packed: jax.Array, d: int) -> jax.Array:
    """u8[..., ceil(d/8)] -> f32[..., d] 0/1."""
    bits = jnp.unpackbits(packed, axis=-1, count=d, bitorder="little")
    return bits.astype(jnp.float32)


def add_episodes(state: ReplayState, episodes: Episode) -> ReplayState:
    """Write B episodes (leading axis [B], B <= capacity) at the ring position."""
    batch = episodes.rewards.shape[0]
    chex.assert_shape(episodes.history.data, (batch, state.n_rows, state.d, 2))
    chex.assert_shape(episodes.actions, (batch, state.budget, state.actions.shape[-1]))
    chex.assert_shape([episodes.rewards, episodes.dones], (batch, state.budget))
    if batch > state.capacity:
        raise ValueError(
            f"add_episodes: {batch} episodes do not fit a buffer of capacity {state.capacity}"
        )
    slots = (state.position + jnp.arange(batch)) % state.capacity
    data = episodes.history.data
    return state.replace(
        values=state.values.at[slots].set(data[..., 0].astype(jnp.float32)),
        indicators=state.indicators.at[slots].set(pack_indicators(data[..., 1])),
        actions=state.actions.at[slots].set(episodes.actions.astype(jnp.float32)),
        rewards=state.rewards.at[slots].set(episodes.rewards.astype(jnp.float32)),
        dones=state.dones.at[slots].set(episodes.dones.astype(bool)),
        position=(state.position + batch) % state.capacity,
        size=jnp.minimum(state.size + batch, state.capacity),
    )


def num_transitions(state: ReplayState) -> jax.Array:
    """i32[]: stored transitions (episodes x budget)."""
    return state.size * state.budget


def rebuild_history(state: ReplayState, episode: jax.Array, length: jax.Array) -> History:
    """The history of stored episode `episode` (i32[]) truncated to `length` rows (i32[])."""
    values = state.values[episode]
    targets = unpack_indicators(state.indicators[episode], state.d)
    data = jnp.stack([values, targets], axis=-1)  # [N, d, 2]
    keep = (jnp.arange(state.n_rows) < length)[:, None, None]
    return History(data=jnp.where(keep, data, 0.0), length=length.astype(jnp.int32))


def sample_transitions(state: ReplayState, key: jax.Array, batch_shape) -> Transition:
    """Uniform transitions (with replacement) from the stored episodes.

    Returns a Transition with leaves of leading shape `batch_shape`: obs = h_t
    (length n0 + t k), next_obs = h_{t+1} (length n0 + (t+1) k), action a_t, reward
    r_t, done done_t. Call only after at least one episode was added (with an empty
    buffer it returns the zero slot 0).
    """
    batch_shape = tuple(batch_shape)
    count = math.prod(batch_shape)
    episode_key, step_key = jax.random.split(key)
    episode = jax.random.randint(episode_key, (count,), 0, jnp.maximum(state.size, 1))
    step = jax.random.randint(step_key, (count,), 0, state.budget)

    def one(i, t):
        length = state.n0 + t * state.samples_per_step
        return Transition(
            obs=rebuild_history(state, i, length),
            action=state.actions[i, t],
            reward=state.rewards[i, t],
            next_obs=rebuild_history(state, i, length + state.samples_per_step),
            done=state.dones[i, t],
        )

    flat = jax.vmap(one)(episode, step)
    return jax.tree.map(lambda x: x.reshape(*batch_shape, *x.shape[1:]), flat)


def bytes_per_transition(state: ReplayState) -> float:
    """Bytes of buffer memory per stored transition (at capacity)."""
    total = sum(
        x.size * x.dtype.itemsize
        for x in (state.values, state.indicators, state.actions, state.rewards, state.dones)
    )
    return total / (state.capacity * state.budget)
