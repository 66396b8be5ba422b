"""Run a likelihood-based design baseline over a batch of held-out environments.

Each design step of each environment refits the bootstrapped-GIES posterior on that
environment's history (L GIES runs) and asks the method for one design, both in one
job of a pool of worker processes (environments in parallel: the refit and, for
DiffCBED, the design optimisation each cost seconds); then every environment steps
the real env once. Keys follow
`Environment.rollout` exactly (reset key, then per step an action key and an env
key), so with the same key the observational rows and the simulation noise match
those of `evaluate.rollout_episodes` for every other policy.

These runs are slow (about 1,000 posterior fits per 100 environments), so with a
`checkpoint` path the loop saves its progress after every design step and resumes
from it: a resumed run gives exactly the histories of an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import hashlib
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from caasl_jax.baselines.posterior import (
    Particles,
    fit_posterior,
    history_rows,
    particles_from_numpy,
)
from caasl_jax.envs.core import Environment, History
from caasl_jax.envs.linear import LinearSCMEnv

# (env, particles, key, settings) -> (action f32[2d], score); a module-level function,
# so that it can be sent to the worker processes
DesignFn = Callable[[Environment, Particles, jax.Array, Any], tuple[jax.Array, Any]]


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


def _design_job(env, design_fn: DesignFn, settings, x, targets, n_particles: int, seed: int, key):
    """One environment's design step (in a worker): refit its posterior on the history
    rows x f64[n, d], targets bool[n, d], then design. Returns the action f32[2d].

    The design runs on the CPU, in a worker or not, so that `n_workers` never changes
    the designs (a run resumed with another worker count continues the same way)."""
    with jax.default_device(jax.devices("cpu")[0]):
        particles = particles_from_numpy(fit_posterior(x, targets, n_particles, seed))
        action, _ = design_fn(env, particles, key, settings)
    return np.asarray(action, np.float32)


def _worker_init() -> None:
    """Workers run JAX on the CPU: an accelerator, if any, is not theirs to share out."""
    jax.config.update("jax_platforms", "cpu")


class _Serial:
    """In-process stand-in for an executor (n_workers <= 1)."""

    def submit(self, fn, *args):
        future: futures.Future = futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _executor(n_workers: int):
    if n_workers <= 1:
        return _Serial()
    # spawn, not fork: forking a process that has started JAX's threads can deadlock
    context = multiprocessing.get_context("spawn")
    return futures.ProcessPoolExecutor(
        max_workers=n_workers, mp_context=context, initializer=_worker_init
    )


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
    checkpoint: str | Path | None = None,
    settings: Any = None,
) -> History:
    """Final histories [B] of `design_fn` designing every step on its own posterior.

    env_params: hidden parameters with a leading axis [B]. Each step runs B jobs on
    n_workers processes (refit the posterior with n_particles GIES runs, then
    `design_fn(env, particles, key, settings)`), then steps all B envs at once.
    checkpoint: a file for the progress after each step; an existing one written by the
    same run (method and its `settings`, environments, key, particles) is resumed, any
    other is refused.
    """
    check_supported(env, name)
    if not isinstance(n_particles, int) or n_particles < 2:
        # DiffCBED's leave-one-out EIG needs another particle; one particle is no posterior
        raise ValueError(f"{name}: n_particles must be an integer >= 2, got {n_particles!r}")
    n_workers = (os.cpu_count() or 1) if n_workers is None else n_workers
    batch = jax.tree.leaves(env_params)[0].shape[0]
    reset_keys, act_keys, env_keys = _split_keys(key, batch, env.budget)
    reset, step = _batched_env(env)
    histories, states = reset(reset_keys, env_params)
    first_step = 0
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        description = f"{name}|{settings!r}|{n_particles}|{env.with_score(None)!r}"
        run_id = _run_fingerprint(description, env_params, key)
        if checkpoint.exists():
            first_step, histories, states = load_progress(checkpoint, run_id, histories, states)

    from tqdm.auto import tqdm

    bar = tqdm(total=batch * env.budget, desc=name, unit="design", disable=not progress,
               initial=batch * first_step)  # fmt: skip
    with bar, _executor(n_workers) as pool:
        for t in range(first_step, env.budget):
            boot_keys, design_keys = jnp.swapaxes(jax.vmap(jax.random.split)(act_keys[t]), 0, 1)
            jobs = {}
            for b in range(batch):
                x, targets = history_rows(jax.tree.map(lambda a, b=b: a[b], histories))
                job = pool.submit(_design_job, env, design_fn, settings, x, targets,
                                  n_particles, _seed(boot_keys[b]), design_keys[b])  # fmt: skip
                jobs[job] = b
            actions = [None] * batch
            try:
                for job in futures.as_completed(jobs):
                    actions[jobs[job]] = jnp.asarray(job.result())
                    bar.update(1)
            except BaseException:  # a failed job or Ctrl-C: drop the queued jobs (seconds each)
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            histories, states = step(env_keys[t], states, jnp.stack(actions), env_params)
            if checkpoint is not None:
                save_progress(checkpoint, run_id, t + 1, histories, states)
    return histories


_PROGRESS_FORMAT = "caasl-jax design-loop progress v2"


def _run_fingerprint(description: str, env_params: Any, key: jax.Array) -> str:
    """A digest of what decides a design loop's histories: the method, its settings,
    the particle count and the env with all its settings (`description`), the hidden
    parameters of the environments and the key."""
    digest = hashlib.sha256(description.encode())
    for leaf in [jax.random.key_data(key), *jax.tree.leaves(env_params)]:
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def save_progress(path: Path, run_id: str, steps_done: int, histories: History, states) -> None:
    """Write the loop's state after `steps_done` design steps (atomically: a crash
    while writing leaves the previous checkpoint intact)."""
    tree = {
        "format": _PROGRESS_FORMAT,
        "run": run_id,
        "steps_done": steps_done,
        "histories": serialization.to_state_dict(jax.device_get(histories)),
        "states": serialization.to_state_dict(jax.device_get(states)),
    }
    from caasl_jax.reward.checkpoint import write_tagged_msgpack

    path.parent.mkdir(parents=True, exist_ok=True)
    write_tagged_msgpack(path, tree)


def read_progress(path: Path) -> dict:
    """The saved tree of a design-loop progress file, whichever run wrote it;
    ValueError naming the problem for anything else (garbage, another format)."""
    from caasl_jax.reward.checkpoint import read_tagged_msgpack

    return read_tagged_msgpack(path, _PROGRESS_FORMAT, "design-loop progress")


def load_progress(path: Path, run_id: str, histories: History, states):
    """(steps_done, histories, states) saved by `save_progress` for the run `run_id`;
    `histories`/`states` are templates. ValueError naming the problem otherwise."""
    tree = read_progress(path)
    if tree.get("run") != run_id:
        raise ValueError(
            f"{path}: progress of another run (method, settings, environments, key or "
            "particle count differ); delete it, choose another checkpoint location, or "
            "(experiments/) rerun with --restart"
        )
    try:
        steps_done = int(tree["steps_done"])
        restored = (serialization.from_state_dict(histories, tree["histories"]),
                    serialization.from_state_dict(states, tree["states"]))  # fmt: skip
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves((histories, states))):
            if np.shape(got) != np.shape(want) or np.asarray(got).dtype != want.dtype:
                raise ValueError(f"an array of shape {np.shape(got)}, expected {want.shape}")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: damaged design-loop progress ({err})") from None
    return steps_done, *restored
