"""Run a likelihood-based design baseline over a batch of held-out environments.

Each design step of each environment refits the bootstrapped-GIES posterior on that
environment's history (L GIES runs, spread over worker processes) and asks the
method for one design; then every environment steps the real env once. Keys follow
`Environment.rollout` exactly (reset key, then per step an action key and an env
key), so with the same key the observational rows and the simulation noise match
those of `evaluate.rollout_episodes` for every other policy.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caasl_jax.baselines.posterior import (
    Particles,
    fit_posterior,
    history_rows,
    particles_from_numpy,
)
from caasl_jax.envs.core import Environment, History
from caasl_jax.envs.linear import LinearSCMEnv

# (env, particles, key) -> (action f32[2d], score)
DesignFn = Callable[[Environment, Particles, jax.Array], tuple[jax.Array, Any]]


def check_supported(env: Environment, name: str = "likelihood baseline") -> None:
    """Raise ValueError unless the env has a linear-Gaussian likelihood to design with.

    Gumbel noise is allowed (the paper runs the baselines there with their Gaussian
    model, misspecified); heteroskedastic noise is not (its scale function is hidden
    and the paper omits these baselines there); SERGIO has no likelihood at all.
    """
    if not isinstance(env, LinearSCMEnv):
        raise ValueError(
            f"{name}: needs a likelihood, which {type(env).__name__} does not have; "
            "only the linear SCM environments (linear-*) are supported"
        )
    if env.heteroskedastic:
        raise ValueError(
            f"{name}: the heteroskedastic linear env (linear-ood-hetero) has no likelihood "
            "that a linear-Gaussian posterior can use; the paper omits these baselines there"
        )


def _split_keys(key: jax.Array, batch: int, budget: int):
    """(reset keys [B], action keys [T, B], env keys [T, B]) as Environment.rollout uses them."""
    env_keys = jax.random.split(key, batch)
    reset_loop = jax.vmap(jax.random.split)(env_keys)  # [B, 2]
    step_keys = jax.vmap(lambda k: jax.random.split(k, budget))(reset_loop[:, 1])  # [B, T]
    act_env = jax.vmap(jax.vmap(jax.random.split))(step_keys)  # [B, T, 2]
    return (
        reset_loop[:, 0],
        jnp.swapaxes(act_env[:, :, 0], 0, 1),
        jnp.swapaxes(act_env[:, :, 1], 0, 1),
    )


@functools.lru_cache(maxsize=32)
def _batched_env(env: Environment):
    """Jitted, vmapped (reset, step) of one env."""
    reset = jax.jit(jax.vmap(env.reset))
    step = jax.jit(jax.vmap(lambda k, s, a, p: env.step(k, s, a, p)[:2]))
    return reset, step


def _seed(key: jax.Array) -> int:
    """A numpy seed from a JAX key (for the bootstrap)."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def _fit_job(x: np.ndarray, targets: np.ndarray, n_particles: int, seed: int) -> dict:
    return fit_posterior(x, targets, n_particles, seed)


class _Serial:
    """In-process stand-in for an executor (n_workers <= 1)."""

    def submit(self, fn, *args):
        future: futures.Future = futures.Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _executor(n_workers: int):
    if n_workers <= 1:
        return _Serial()
    # spawn, not fork: forking a process that has started JAX's threads can deadlock
    context = multiprocessing.get_context("spawn")
    return futures.ProcessPoolExecutor(max_workers=n_workers, mp_context=context)


def run_design_loop(
    env: Environment,
    env_params: Any,
    key: jax.Array,
    design_fn: DesignFn,
    *,
    name: str,
    n_workers: int | None = None,
    progress: bool = True,
    n_particles: int = 30,
) -> History:
    """Final histories [B] of `design_fn` designing every step on its own posterior.

    env_params: hidden parameters with a leading axis [B]. Each step fits the posterior
    of all B histories (B jobs of n_particles GIES runs on n_workers processes), designs
    each environment as soon as its posterior arrives, then steps all B envs at once.
    """
    check_supported(env, name)
    n_workers = (os.cpu_count() or 1) if n_workers is None else n_workers
    batch = jax.tree.leaves(env_params)[0].shape[0]
    reset_keys, act_keys, env_keys = _split_keys(key, batch, env.budget)
    reset, step = _batched_env(env)
    histories, states = reset(reset_keys, env_params)

    from tqdm.auto import tqdm

    bar = tqdm(total=batch * env.budget, desc=name, unit="design", disable=not progress)
    with bar, _executor(n_workers) as pool:
        for t in range(env.budget):
            boot_keys, design_keys = jnp.swapaxes(jax.vmap(jax.random.split)(act_keys[t]), 0, 1)
            jobs = {}
            for b in range(batch):
                x, targets = history_rows(jax.tree.map(lambda a, b=b: a[b], histories))
                job = pool.submit(_fit_job, x, targets, n_particles, _seed(boot_keys[b]))
                jobs[job] = b
            actions = [None] * batch
            for job in futures.as_completed(jobs):
                b = jobs[job]
                action, _ = design_fn(env, particles_from_numpy(job.result()), design_keys[b])
                actions[b] = jnp.asarray(action, jnp.float32)
                bar.update(1)
            histories, states = step(env_keys[t], states, jnp.stack(actions), env_params)
    return histories
