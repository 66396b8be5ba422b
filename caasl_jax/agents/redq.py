"""REDQ (Chen et al. 2021) on SAC for the CAASL design policy.

    N critics with their own encoders; the TD target takes the min over a random
    subset of M of the N target critics; G critic updates per policy update; a learned
    entropy temperature alpha = exp(log_alpha) (log_alpha initialised at 0) driven
    towards a target entropy (default -(action dims)); polyak-averaged target critics.

The losses are small pure functions over arrays with shape checks (rlax style). The
agent (`REDQ`, a frozen dataclass holding only static configuration) exposes

    state = agent.init(key, obs, action)                    # typed REDQState
    action, log_prob = agent.act(state.policy_params, key, obs)
    state, metrics = agent.update(state, batch, key, axis_name=None)

`update` takes a `Transition` batch whose leaves have a leading [G, B] axis and runs
G critic updates (one per minibatch, `lax.scan`), then one policy and one temperature
update on the last minibatch -- jittable, no Python loop over jitted calls.

Multi-device: call `update` inside `jax.shard_map` over a mesh axis and pass that axis
name; gradients (and metrics) are then averaged with `lax.pmean`. The randomness of
example j is drawn from `fold_in(key, global index of j)`, with global index
`axis_index * B + j`: when every device receives the SAME key and its shard of a global
batch (shards in device order), one sharded update equals the unsharded update of the
global batch up to float reduction order.

Where the public release differs (do better): the critic's next-state value uses the
NEXT state's own mask (the release used the current state's mask); see networks.py for
the masking and the Q pairing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from caasl_jax import microbatch as microbatch_lib
from caasl_jax.agents.networks import (
    CriticConfig,
    CriticEnsemble,
    Policy,
    PolicyConfig,
    policy_distribution,
    to_env_action,
)
from caasl_jax.checks import check_positive_int
from caasl_jax.envs.core import History

# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------


@struct.dataclass
class Transition:
    """One (h_t, a_t, r_t, h_{t+1}, done_t), any leading batch dims [...].

    obs, next_obs: History (data f32[..., N, d, 2], length i32[...]); the mask of each
                   is its own `length` (rows >= length are padding).
    action:        f32[..., A] env layout in [-1, 1].
    reward:        f32[...].
    done:          bool/f32[...]: 1 when h_{t+1} is terminal (no bootstrap).
    """

    obs: History
    action: jax.Array
    reward: jax.Array
    next_obs: History
    done: jax.Array


@dataclasses.dataclass(frozen=True)
class REDQConfig:
    """REDQ / SAC hyper-parameters (defaults: public release, linear SCM).

    num_critics: N; num_target_critics: M (subset size of the min in the target);
    utd: G, critic updates per policy update (= leading axis of the update batch);
    gamma: discount; tau: polyak rate of the target critics; policy_lr / critic_lr /
    alpha_lr: Adam learning rates; init_log_alpha: initial log temperature;
    target_entropy: None -> -(action dims), else this number; max_grad_norm: global
    gradient-norm clip for every optimiser (None: no clipping); microbatch: examples
    evaluated at a time in acting, targets and gradients (None: 4 on CPU, 256 on
    accelerators; 0: whole batch; see `caasl_jax.microbatch`).
    """

    num_critics: int = 2
    num_target_critics: int = 2
    utd: int = 1
    gamma: float = 0.9
    tau: float = 1e-3
    policy_lr: float = 1e-3
    critic_lr: float = 3e-5
    alpha_lr: float = 1e-3
    init_log_alpha: float = 0.0
    target_entropy: float | None = None
    max_grad_norm: float | None = None
    microbatch: int | None = None

    def __post_init__(self):
        for name in ("num_critics", "num_target_critics", "utd"):
            check_positive_int("REDQConfig", name, getattr(self, name))
        if self.num_target_critics > self.num_critics:
            raise ValueError(
                f"REDQConfig: num_target_critics (M={self.num_target_critics}) must be <= "
                f"num_critics (N={self.num_critics})"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"REDQConfig: gamma must be in [0, 1], got {self.gamma!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"REDQConfig: tau must be in (0, 1], got {self.tau!r}")
        for name in ("policy_lr", "critic_lr", "alpha_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(
                    f"REDQConfig: {name} must be a finite number > 0, got {getattr(self, name)!r}"
                )
        for name in ("init_log_alpha", "target_entropy"):  # NaN would only surface as NaN losses
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"REDQConfig: {name} must be a finite number, got {value!r}")
        if self.microbatch is not None:  # resolve(None) would start the JAX backend
            microbatch_lib.resolve(self.microbatch)  # raises on a bad value
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(
                f"REDQConfig: max_grad_norm must be a finite number > 0 or None, got "
                f"{self.max_grad_norm!r}"
            )


@struct.dataclass
class REDQState:
    """Everything that changes during training (a pytree; replicate it across devices).

    critic_params / target_critic_params: ensemble parameters, leading axis N.
    log_alpha: f32[]; step: i32[] number of policy updates done.
    """

    policy_params: Any
    critic_params: Any
    target_critic_params: Any
    policy_opt_state: Any
    critic_opt_state: Any
    alpha_opt_state: Any
    log_alpha: jax.Array
    step: jax.Array


# ----------------------------------------------------------------------------------
# pure losses
# ----------------------------------------------------------------------------------


def sample_subset(key: jax.Array, num_critics: int, num_target_critics: int) -> jax.Array:
    """i32[M]: M distinct critic indices out of N, uniformly at random."""
    return jax.random.permutation(key, num_critics)[:num_target_critics]


def redq_target(
    next_q: jax.Array,
    subset: jax.Array,
    reward: jax.Array,
    done: jax.Array,
    next_log_prob: jax.Array,
    alpha: jax.Array,
    gamma: float,
) -> jax.Array:
    """TD target y = r + gamma (1 - done) (min_{i in subset} Q'_i(h', a') - alpha log pi(a'|h')).

    next_q f32[N, B]; subset i32[M]; reward, done, next_log_prob f32[B]; alpha f32[].
    Returns f32[B] (no gradient stopped here; the caller does it).
    """
    chex.assert_rank([next_q, subset, reward, done, next_log_prob, alpha], [2, 1, 1, 1, 1, 0])
    chex.assert_equal_shape([reward, done, next_log_prob])
    chex.assert_axis_dimension(next_q, 1, reward.shape[0])
    min_q = jnp.min(next_q[subset], axis=0)
    soft_value = min_q - alpha * next_log_prob
    return reward + gamma * (1.0 - done.astype(reward.dtype)) * soft_value


def critic_loss(q: jax.Array, target: jax.Array) -> jax.Array:
    """Sum over the N critics of each critic's mean squared TD error.

    q f32[N, B]; target f32[B] (treated as a constant). Returns f32[].
    """
    chex.assert_rank([q, target], [2, 1])
    chex.assert_axis_dimension(q, 1, target.shape[0])
    err = q - jax.lax.stop_gradient(target)[None, :]
    return jnp.sum(jnp.mean(err**2, axis=1))


def actor_loss(q: jax.Array, log_prob: jax.Array, alpha: jax.Array) -> jax.Array:
    """SAC/REDQ actor loss mean_B[alpha log pi(a|h) - mean_N Q_i(h, a)], a ~ pi(.|h).

    q f32[N, B] (all N critics, as in REDQ); log_prob f32[B]; alpha f32[] (a constant).
    """
    chex.assert_rank([q, log_prob, alpha], [2, 1, 0])
    chex.assert_axis_dimension(q, 1, log_prob.shape[0])
    alpha = jax.lax.stop_gradient(alpha)
    return jnp.mean(alpha * log_prob - jnp.mean(q, axis=0))


def alpha_loss(log_alpha: jax.Array, log_prob: jax.Array, target_entropy: float) -> jax.Array:
    """Temperature loss -mean_B[log_alpha (log pi(a|h) + target_entropy)].

    Its gradient raises alpha while the policy entropy (-log pi) is below the target
    and lowers it above. log_alpha f32[]; log_prob f32[B] (treated as a constant).
    """
    chex.assert_rank([log_alpha, log_prob], [0, 1])
    return -jnp.mean(log_alpha * (jax.lax.stop_gradient(log_prob) + target_entropy))


def polyak_update(target, online, tau: float):
    """target <- tau * online + (1 - tau) * target, leaf by leaf."""
    return jax.tree.map(lambda t, o: tau * o + (1.0 - tau) * t, target, online)


def _pmean(tree, axis_name: str | None):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def example_keys(key: jax.Array, batch_size: int, axis_name: str | None = None) -> jax.Array:
    """One key per example, fold_in(key, global example index); key[B].

    Inside shard_map over `axis_name` the global index is axis_index * B + j, so the
    same key on every device gives every example of the global batch its own stream.
    """
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    idx = offset + jnp.arange(batch_size)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


# ----------------------------------------------------------------------------------
# the agent
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class REDQ:
    """REDQ agent: static configuration plus pure init / act / update functions."""

    policy_config: PolicyConfig = PolicyConfig()
    critic_config: CriticConfig = CriticConfig()
    config: REDQConfig = REDQConfig()

    def __post_init__(self):
        if self.critic_config.num_critics != self.config.num_critics:
            raise ValueError(
                f"REDQ: critic_config.num_critics ({self.critic_config.num_critics}) must "
                f"equal config.num_critics ({self.config.num_critics})"
            )
        if self.policy_config.action_kind != self.critic_config.action_kind:
            raise ValueError(
                f"REDQ: policy action_kind {self.policy_config.action_kind!r} differs from "
                f"critic action_kind {self.critic_config.action_kind!r}"
            )

    # --- modules and optimisers -----------------------------------------------------
    @property
    def policy(self) -> Policy:
        return Policy(self.policy_config)

    @property
    def critic(self) -> CriticEnsemble:
        return CriticEnsemble(self.critic_config)

    def _optimizer(self, lr: float) -> optax.GradientTransformation:
        adam = optax.adam(lr)
        if self.config.max_grad_norm is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(self.config.max_grad_norm), adam)

    @property
    def policy_optimizer(self) -> optax.GradientTransformation:
        return self._optimizer(self.config.policy_lr)

    @property
    def critic_optimizer(self) -> optax.GradientTransformation:
        return self._optimizer(self.config.critic_lr)

    @property
    def alpha_optimizer(self) -> optax.GradientTransformation:
        return self._optimizer(self.config.alpha_lr)

    def target_entropy(self, action_dim: int) -> float:
        """The configured target entropy, or -(action dims) by default."""
        if self.config.target_entropy is None:
            return -float(action_dim)
        return float(self.config.target_entropy)

    # --- init / act ---------------------------------------------------------------------
    def init(self, key: jax.Array, obs: History, action: jax.Array) -> REDQState:
        """Fresh state for histories shaped like obs (data f32[N, d, 2]) and actions
        shaped like action (f32[A]); any d works. Only their shapes are read."""
        specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (obs.data, obs.mask, action))
        return self._fresh_state(key, specs)

    # One compiled program (per agent and shapes) that runs only the initialisers:
    # lazy_init drops the forward pass Flax's init would compute. Op by op, the paper
    # networks took 14-18 s to initialise on the 2-core VM. Same values as eager init.
    @functools.partial(jax.jit, static_argnums=(0, 2))
    def _fresh_state(self, key, specs) -> REDQState:
        data, mask, action = specs
        policy_key, critic_key = jax.random.split(key)
        policy_params = self.policy.lazy_init(policy_key, data, mask)
        critic_params = self.critic.lazy_init(critic_key, data, mask, action)
        log_alpha = jnp.asarray(self.config.init_log_alpha, jnp.float32)
        return REDQState(
            policy_params=policy_params,
            critic_params=critic_params,
            target_critic_params=jax.tree.map(jnp.copy, critic_params),
            policy_opt_state=self.policy_optimizer.init(policy_params),
            critic_opt_state=self.critic_optimizer.init(critic_params),
            alpha_opt_state=self.alpha_optimizer.init(log_alpha),
            log_alpha=log_alpha,
            step=jnp.zeros((), jnp.int32),
        )

    def _sample(self, params, key, data, mask, deterministic: bool):
        """One example: data f32[N, d, 2], mask bool[N] -> (action f32[A], log_prob f32[])."""
        sample_key, dropout_key = jax.random.split(key)
        mean, log_std = self.policy.apply(
            params, data, mask, deterministic=deterministic, rngs={"dropout": dropout_key}
        )
        per_var, log_prob = policy_distribution(mean, log_std).sample_and_log_prob(seed=sample_key)
        return to_env_action(per_var), log_prob

    def _acting_deterministic(self, deterministic: bool | None = None) -> bool:
        """Dropout off when acting, unless asked for or the config sets act_with_dropout."""
        if deterministic is None:
            return not self.policy_config.act_with_dropout
        return deterministic

    def act(
        self, policy_params, key: jax.Array, obs: History, deterministic: bool | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Sample actions for a batch of histories (leading dims [...]) or one history.

        Returns (action f32[..., A] in (-1, 1), log_prob f32[...]). Dropout is off unless
        `deterministic=False` or the policy config sets act_with_dropout.
        """
        deterministic = self._acting_deterministic(deterministic)
        batch_shape = obs.data.shape[:-3]
        flat_data = obs.data.reshape(-1, *obs.data.shape[-3:])
        flat_mask = obs.mask.reshape(-1, obs.data.shape[-3])
        keys = jax.random.split(key, flat_data.shape[0])
        action, log_prob = microbatch_lib.map_examples(
            lambda x: self._sample(policy_params, *x, deterministic),
            (keys, flat_data, flat_mask),
            self.config.microbatch,
        )
        return action.reshape(*batch_shape, -1), log_prob.reshape(batch_shape)

    def acting_fn(self, deterministic: bool | None = None):
        """(policy_params, key, data f32[N, d, 2], mask bool[N]) -> (action, log_prob) for
        ONE history, whose `jax.vmap` over environments runs in micro-batches."""
        deterministic = self._acting_deterministic(deterministic)
        return microbatch_lib.vmap_in_chunks(
            lambda params, key, data, mask: self._sample(params, key, data, mask, deterministic),
            self.config.microbatch,
        )

    # --- update -------------------------------------------------------------------------
    def td_target(
        self,
        state: REDQState,
        batch: Transition,
        key: jax.Array,
        axis_name: str | None = None,
    ) -> jax.Array:
        """REDQ TD targets f32[B] for a minibatch [B, ...] (no gradient).

        a' ~ pi(.|h') is drawn with dropout as when acting; h' is read with the NEXT
        state's own mask (the release used the current state's mask).
        """
        cfg = self.config
        subset_key, next_key = jax.random.split(key)
        next_keys = example_keys(next_key, batch.reward.shape[0], axis_name)
        acting_deterministic = self._acting_deterministic()

        def one(example):
            k, data, mask = example
            action, log_prob = self._sample(
                state.policy_params, k, data, mask, acting_deterministic
            )
            return self.critic.apply(state.target_critic_params, data, mask, action), log_prob

        next_q, next_log_prob = microbatch_lib.map_examples(
            one, (next_keys, batch.next_obs.data, batch.next_obs.mask), cfg.microbatch
        )
        next_q = next_q.T  # [N, B]
        subset = sample_subset(subset_key, cfg.num_critics, cfg.num_target_critics)
        alpha = jnp.exp(state.log_alpha)
        return jax.lax.stop_gradient(
            redq_target(next_q, subset, batch.reward, batch.done, next_log_prob, alpha, cfg.gamma)
        )

    def _critic_step(self, state: REDQState, batch: Transition, key, axis_name):
        """One critic update on a minibatch [B, ...]; returns (new state, metrics)."""
        cfg = self.config
        batch_size = batch.reward.shape[0]
        target_key, dropout_key = jax.random.split(key)
        target = self.td_target(state, batch, target_key, axis_name)

        use_dropout = self.critic_config.encoder.dropout > 0
        dropout_keys = example_keys(dropout_key, batch_size, axis_name)

        def example_loss(params, example):
            k, data, mask, action, y = example
            q = self.critic.apply(
                params, data, mask, action, deterministic=not use_dropout, rngs={"dropout": k}
            )  # [N]
            return critic_loss(q[:, None], y[None]), q

        examples = (dropout_keys, batch.obs.data, batch.obs.mask, batch.action, target)
        (loss, q), grads = microbatch_lib.mean_value_and_grad(
            example_loss, state.critic_params, examples, cfg.microbatch, axis_name
        )
        grads = _pmean(grads, axis_name)
        updates, opt_state = self.critic_optimizer.update(
            grads, state.critic_opt_state, state.critic_params
        )
        critic_params = optax.apply_updates(state.critic_params, updates)
        target_params = polyak_update(state.target_critic_params, critic_params, cfg.tau)
        metrics = {
            "critic_loss": loss,
            "q_mean": jnp.mean(q),
            "target_mean": jnp.mean(target),
            "critic_grad_norm": optax.global_norm(grads),
        }
        state = state.replace(
            critic_params=critic_params,
            target_critic_params=target_params,
            critic_opt_state=opt_state,
        )
        return state, metrics

    def _policy_step(self, state: REDQState, batch: Transition, key, axis_name):
        """One policy update and one temperature update on a minibatch [B, ...]."""
        batch_size = batch.reward.shape[0]
        alpha = jnp.exp(state.log_alpha)
        keys = example_keys(key, batch_size, axis_name)

        def example_loss(params, example):
            k, data, mask = example
            # policy dropout (if configured) is on while training the policy
            action, log_prob = self._sample(params, k, data, mask, False)
            q = self.critic.apply(state.critic_params, data, mask, action)  # [N]
            return actor_loss(q[:, None], log_prob[None], alpha), log_prob

        (loss, log_prob), grads = microbatch_lib.mean_value_and_grad(
            example_loss,
            state.policy_params,
            (keys, batch.obs.data, batch.obs.mask),
            self.config.microbatch,
            axis_name,
        )
        grads = _pmean(grads, axis_name)
        updates, policy_opt_state = self.policy_optimizer.update(
            grads, state.policy_opt_state, state.policy_params
        )
        policy_params = optax.apply_updates(state.policy_params, updates)

        target_entropy = self.target_entropy(batch.action.shape[-1])
        a_loss, a_grad = jax.value_and_grad(alpha_loss)(state.log_alpha, log_prob, target_entropy)
        a_grad = _pmean(a_grad, axis_name)
        a_updates, alpha_opt_state = self.alpha_optimizer.update(
            a_grad, state.alpha_opt_state, state.log_alpha
        )
        log_alpha = optax.apply_updates(state.log_alpha, a_updates)
        metrics = {
            "actor_loss": loss,
            "alpha_loss": a_loss,
            "alpha": jnp.exp(log_alpha),
            "entropy": -jnp.mean(log_prob),
            "policy_grad_norm": optax.global_norm(grads),
        }
        state = state.replace(
            policy_params=policy_params,
            policy_opt_state=policy_opt_state,
            log_alpha=log_alpha,
            alpha_opt_state=alpha_opt_state,
            step=state.step + 1,
        )
        return state, metrics

    def update(
        self, state: REDQState, batch: Transition, key: jax.Array, axis_name: str | None = None
    ) -> tuple[REDQState, dict[str, jax.Array]]:
        """G critic updates (lax.scan over the minibatches) + one policy and alpha update.

        batch: Transition with leaves [G, B, ...] (G = config.utd): obs/next_obs data
        f32[G, B, N, d, 2] and length i32[G, B]; action f32[G, B, A]; reward, done
        [G, B]. The policy and temperature use the last minibatch batch[G - 1].
        axis_name: inside shard_map, the mesh axis over which gradients and metrics
        are averaged (pass the same key on every device, see the module docstring).
        Returns (new state, metrics: scalars; critic metrics averaged over G).
        """
        g = self.config.utd
        chex.assert_rank(batch.reward, 2)
        if batch.reward.shape[0] != g:
            raise ValueError(
                f"REDQ.update: batch leading axis must be utd G={g}, got shape "
                f"{batch.reward.shape} for reward (expected [G, B])"
            )
        chex.assert_shape(batch.done, batch.reward.shape)
        chex.assert_rank([batch.obs.data, batch.next_obs.data, batch.action], [5, 5, 3])
        critic_key, policy_key = jax.random.split(key)

        def body(carry, xs):
            minibatch, k = xs
            return self._critic_step(carry, minibatch, k, axis_name)

        state, critic_metrics = jax.lax.scan(body, state, (batch, jax.random.split(critic_key, g)))
        last = jax.tree.map(lambda x: x[-1], batch)
        state, policy_metrics = self._policy_step(state, last, policy_key, axis_name)
        metrics = {k: jnp.mean(v) for k, v in critic_metrics.items()}
        metrics.update(policy_metrics)
        return state, _pmean(metrics, axis_name)
