"""The design-environment protocol shared by every CAASL environment.

An environment is a frozen (hashable) description of a prior over causal systems.
All randomness over systems lives in explicit hidden parameters, so batching is a
`jax.vmap` over keys and params and resampling never recompiles:

    params = env.sample_params(param_key)                   # hidden system θ
    obs, state = env.reset(reset_key, params)               # n0 observational rows
    obs, state, reward, done, info = env.step(step_key, state, action, params)

(a fresh key for each call: a step drawn with the reset's key repeats its noise).

The observation is a `History`: a preallocated [N, d, 2] array (channel 0 the
measured values, channel 1 the 0/1 intervention indicator) with N = n0 + T·k rows,
a length counter and the derived validity mask. Shapes never change, so nothing
retraces over an episode.

Environments know nothing of reward models. A caller plugs one in with
`env.with_score(score_fn)`, where `score_fn(history, graph) -> scalar` scores a
history against the true graph; the step reward is then the score's improvement
r_t = score(h_t) - score(h_{t-1}). Without a score function the reward is 0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from caasl_jax.checks import check_positive_int

ScoreFn = Callable[["History", jax.Array], jax.Array]


@struct.dataclass
class History:
    """Preallocated interventional history.

    data:   f32[N, d, 2]  channel 0 values, channel 1 intervention indicator (0/1).
    length: i32[]         number of valid rows; rows >= length are zero padding.
    """

    data: jax.Array
    length: jax.Array

    @property
    def mask(self) -> jax.Array:
        """bool[N]: True for the rows that hold samples."""
        return jnp.arange(self.data.shape[-3]) < self.length[..., None]

    @property
    def values(self) -> jax.Array:
        return self.data[..., 0]

    @property
    def targets(self) -> jax.Array:
        return self.data[..., 1]


def empty_history(n_rows: int, d: int) -> History:
    return History(data=jnp.zeros((n_rows, d, 2), jnp.float32), length=jnp.zeros((), jnp.int32))


def append_rows(
    history: History, values: jax.Array, targets: jax.Array, enabled: jax.Array | bool = True
) -> History:
    """Write k new rows at position `length`. values, targets: f32[k, d].

    With `enabled` False, or when the k rows do not fit (length + k > N), the history
    comes back unchanged. Only the k rows are rewritten either way (no copy of the
    whole buffer), so inside a scan the update happens in place.
    """
    k = values.shape[0]
    n_rows = history.data.shape[0]
    if k > n_rows:  # no room for k rows at all (budget 0): never enabled
        return history
    enabled = jnp.logical_and(enabled, history.length + k <= n_rows)
    rows = jnp.stack([values, targets.astype(values.dtype)], axis=-1)
    start = jnp.minimum(history.length, n_rows - k)
    current = jax.lax.dynamic_slice_in_dim(history.data, start, k, axis=0)
    rows = jnp.where(enabled, rows, current)
    data = jax.lax.dynamic_update_slice_in_dim(history.data, rows, start, axis=0)
    return History(data=data, length=history.length + k * enabled.astype(jnp.int32))


@struct.dataclass
class EnvState:
    """history: the data so far; step: design steps taken; score: score(history)."""

    history: History
    step: jax.Array
    score: jax.Array


class Environment:
    """Base class of the design environments (frozen dataclasses in subclasses).

    Subclasses provide `d`, `n0`, `budget`, `samples_per_step`, `action_dim`,
    `sample_params(key)`, `_initial_rows(key, params) -> f32[n0, d]` and
    `_design_rows(key, action, params) -> (values f32[k, d], targets f32[k, d])`.
    `score_fn` is an optional `(history, graph) -> scalar`.
    """

    score_fn: ScoreFn | None

    # --- sizes -----------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """N = n0 + T·k, the preallocated history length."""
        return self.n0 + self.budget * self.samples_per_step

    @property
    def action_dim(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def with_score(self, score_fn: ScoreFn | None) -> Environment:
        """The same environment with a reward: r_t = score(h_t) - score(h_{t-1})."""
        return dataclasses.replace(self, score_fn=score_fn)

    # --- protocol ----------------------------------------------------------------
    def sample_params(self, key: jax.Array) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _score(self, history: History, params: Any) -> jax.Array:
        if self.score_fn is None:
            return jnp.zeros((), jnp.float32)
        return jnp.asarray(self.score_fn(history, params.graph), jnp.float32)

    def reset(self, key: jax.Array, params: Any) -> tuple[History, EnvState]:
        """Draw n0 observational rows. Returns (history, state)."""
        self.check_params(params)
        values = self._initial_rows(key, params)
        history = append_rows(empty_history(self.n_rows, self.d), values, jnp.zeros_like(values))
        state = EnvState(
            history=history, step=jnp.zeros((), jnp.int32), score=self._score(history, params)
        )
        return history, state

    def step(self, key: jax.Array, state: EnvState, action: jax.Array, params: Any):
        """Perform the design `action` (f32[action_dim] in [-1, 1]) and record k rows.

        Returns (history, state, reward, done, info). Stepping past the budget is a
        no-op on the history (the rows would not fit) and gives reward 0. Actions are
        used as given, not clipped: a value outside [-1, 1] leaves the prior's range of
        intervention values (a tanh-squashed policy, as CAASL's, stays inside it).
        """
        action = jnp.asarray(action)
        self.check_action(action)
        self.check_params(params)
        self.check_state(state)
        values, targets = self._design_rows(key, action, params)
        in_budget = state.step < self.budget
        history = append_rows(state.history, values, targets, enabled=in_budget)
        score = self._score(history, params)
        reward = score - state.score
        new_state = EnvState(history=history, step=state.step + in_budget, score=score)
        done = new_state.step >= self.budget
        info = {"targets": targets[0]}
        return history, new_state, reward, done, info

    def check_action(self, action: jax.Array) -> None:
        if action.shape != (self.action_dim,):
            raise ValueError(
                f"{type(self).__name__}: action must have shape ({self.action_dim},) for "
                f"d={self.d}, got {tuple(action.shape)}; vmap the step over a batch"
            )

    def check_state(self, state: EnvState) -> None:
        """The state of ONE episode of this environment: history f32[n_rows, d, 2]."""
        shape = tuple(jnp.shape(state.history.data))
        if shape != (self.n_rows, self.d, 2):
            raise ValueError(
                f"{type(self).__name__}: state.history must have shape ({self.n_rows}, "
                f"{self.d}, 2) (n0 + budget * samples_per_step rows), got {shape}; a state "
                "of another environment, or a batch (vmap over it)"
            )

    def check_params(self, params: Any) -> None:
        """Hidden parameters of ONE system of this d: graph f32[d, d]."""
        shape = tuple(jnp.shape(params.graph))
        if shape != (self.d, self.d):
            raise ValueError(
                f"{type(self).__name__}: params.graph must have shape ({self.d}, {self.d}) "
                f"for d={self.d}, got {shape}; params of another d, or a batch (vmap over it)"
            )

    def rollout(
        self, key: jax.Array, params: Any, policy: Callable[[jax.Array, History], jax.Array]
    ) -> tuple[History, jax.Array, jax.Array]:
        """Run a whole episode with `policy(key, history) -> action f32[action_dim]`.

        Returns (final history, actions f32[T, action_dim], rewards f32[T]);
        jittable and vmappable over (key, params).
        """
        reset_key, loop_key = jax.random.split(key)
        history, state = self.reset(reset_key, params)

        def body(carry, step_key):
            history, state = carry
            act_key, env_key = jax.random.split(step_key)
            action = policy(act_key, history)
            history, state, reward, _, _ = self.step(env_key, state, action, params)
            return (history, state), (action, reward)

        (history, _), (actions, rewards) = jax.lax.scan(
            body, (history, state), jax.random.split(loop_key, self.budget)
        )
        return history, actions, rewards


def settings_as_python_numbers(env: Environment, traceable: tuple[str, ...] = ()) -> None:
    """Replace NumPy scalars (np.float32(2), np.int64(5), 0-d arrays) and concrete JAX
    scalars among env's settings by Python numbers, so that values from a NumPy sweep
    work and the environment stays a plain, hashable value (a static jit argument).

    JAX arrays in the `traceable` fields are left as they are: those settings may be
    traced (vmap or jit over a prior setting). Anywhere else a traced value raises a
    ValueError that names the field.
    """
    name = type(env).__name__
    for field in dataclasses.fields(env):
        value = getattr(env, field.name)
        if isinstance(value, jax.Array) and field.name in traceable:
            continue
        if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
            try:
                value = value.item()
            except jax.errors.ConcretizationTypeError:
                raise ValueError(
                    f"{name}: {field.name} is a static setting and cannot be traced (vmap or "
                    f"jit over it); settings that can: {', '.join(traceable) or 'none'}"
                ) from None
            object.__setattr__(env, field.name, value)  # frozen: set once, while being built


def check_finite_numbers(env: Environment, fields: tuple[str, ...]) -> None:
    """Raise ValueError naming the first of `fields` that is not a finite real number
    (a string from a config file, a bool, NaN or inf would only fail later, unnamed).
    JAX arrays (the traceable settings of `settings_as_python_numbers`) pass unchecked."""
    for field in fields:
        value = getattr(env, field)
        if isinstance(value, jax.Array):
            continue
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (real and math.isfinite(value)):
            raise ValueError(
                f"{type(env).__name__}: {field} must be a finite number, got {value!r}"
            )


def validate_common(
    env: Environment, real_fields: tuple[str, ...], traceable: tuple[str, ...] = ()
) -> None:
    """Raise ValueError naming the first bad size (d, n0, budget, samples_per_step), the
    first of `real_fields` that is not a finite number, or a score_fn that is not
    callable. NumPy and concrete JAX scalars become Python numbers first (see
    `settings_as_python_numbers`; `traceable` fields may hold traced values)."""
    name = type(env).__name__
    settings_as_python_numbers(env, traceable)
    for field, minimum in (("d", 2), ("n0", 1), ("budget", 0), ("samples_per_step", 1)):
        check_positive_int(name, field, getattr(env, field), minimum)
    check_finite_numbers(env, real_fields)
    if env.score_fn is not None and not callable(env.score_fn):
        raise ValueError(
            f"{name}: score_fn must be None or a callable (history, graph) -> scalar, "
            f"got {env.score_fn!r}"
        )


def action_targets(action: jax.Array, d: int) -> jax.Array:
    """f32[d] 0/1 intervention targets from an action: variable i is a target when a_i > 0."""
    chex.assert_axis_dimension_gteq(action, 0, d)
    return (action[..., :d] > 0).astype(jnp.float32)
