"""Runtime per design step per environment: DiffCBED and SS Finite vs CAASL's forward pass.

    python -m benchmarks.baseline_runtime [--env linear-d10 ...] [--repeats 3]
        [--e2e-envs 2] [--workers 2]

Prints JSON. For each environment, on histories after t = 0 and t = T-1 random
design steps (the posterior refit gets slower as target sets accumulate):
- posterior: one bootstrapped-GIES refit (L = 30 GIES runs, one process), also with
  the gies package's own search code (path search and forward step) instead of the
  faster versions `posterior.use_fast_gies` installs;
- diffcbed / ss_finite: the design given that posterior (jitted; compile excluded,
  reported separately);
- caasl_forward: one forward pass of the paper-sized CAASL policy (random weights:
  the cost does not depend on them) on one history, and per env on a batch of 100;
- e2e: `LIKELIHOOD_BASELINES[name]` on `--e2e-envs` held-out envs for the whole budget
  with `--workers` processes (wall seconds per design step per env).
The paper's point: these methods need one posterior inference per step per env
(1,000 for 100 envs x 10 steps); CAASL needs one forward pass per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from unittest import mock

import gies.main
import gies.utils
import jax
import jax.numpy as jnp

from benchmarks.common import emit, machine_info, time_call
from caasl_jax import evaluate as ev
from caasl_jax.agents import Policy, paper_configs, sample_action
from caasl_jax.baselines import LIKELIHOOD_BASELINES, diffcbed, posterior, ss_finite
from caasl_jax.baselines.posterior import fit_posterior, history_rows, particles_from_numpy
from caasl_jax.baselines.runner import check_supported
from caasl_jax.cli import DefaultsHelpFormatter, int_at_least, positive_int
from caasl_jax.envs import make_env
from caasl_jax.envs.core import History

#: gies's own search functions, kept before any fit replaces them (`refit_with_package_search`)
GIES_OWN_PATHS = gies.utils.semi_directed_paths
GIES_OWN_FORWARD_STEP = gies.main.forward_step


def load() -> str:
    """The `uptime` load averages (1, 5, 15 min) as a string."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def histories_at(env, n_envs: int, seed: int, step: int) -> History:
    """Held-out histories [B] after `step` random design steps (later rows masked off)."""
    params = ev.heldout_params(env, n_envs, seed)
    final = ev.rollout_episodes(env, ev.random_policy(env), params, jax.random.key(seed))[0]
    length = jnp.full_like(final.length, env.n0 + step * env.samples_per_step)
    return History(data=final.data, length=length)


def wall(fn, repeats: int) -> dict:
    """Median / min wall seconds of a host-side call (blocks on JAX outputs)."""
    return time_call(fn, repeats=repeats, warmup=0)


def refit_with_package_search(x, targets, n_particles: int, repeats: int) -> dict:
    """The posterior refit with the `gies` package's own semi_directed_paths and
    forward_step, i.e. without the faster ones that `posterior.fit_gies` installs."""
    with mock.patch.object(posterior, "use_fast_gies", lambda: None), \
            mock.patch.object(gies.utils, "semi_directed_paths", GIES_OWN_PATHS), \
            mock.patch.object(gies.main, "forward_step", GIES_OWN_FORWARD_STEP):  # fmt: skip
        return wall(lambda: fit_posterior(x, targets, n_particles, 0), repeats)


def caasl_forward(env, repeats: int) -> dict:
    """Forward pass (sample an action) of the paper-sized linear policy, batch 1 and 100."""
    config, _ = paper_configs("linear")
    policy = Policy(config)
    history = histories_at(env, 100, 0, env.budget - 1)
    params = policy.init(jax.random.key(0), history.data[0], history.mask[0])
    act = jax.jit(lambda k, data, mask: sample_action(policy, params, k, data, mask)[0])
    one = time_call(act, jax.random.key(1), history.data[0], history.mask[0], repeats=repeats)
    batch = time_call(act, jax.random.key(1), history.data, history.mask, repeats=repeats)
    batch["per_env_s"] = batch["median_s"] / 100
    return {"batch_1": one, "batch_100": batch}


def per_step_figures(env, step: int, repeats: int, n_particles: int) -> dict:
    """Posterior refit and the two designs on one history after `step` design steps."""
    history = jax.tree.map(lambda a: a[0], histories_at(env, 1, 0, step))
    x, targets = history_rows(history)
    fit = wall(lambda: fit_posterior(x, targets, n_particles, 0), repeats)
    particles = particles_from_numpy(fit_posterior(x, targets, n_particles, 0))
    out = {
        "rows": int(x.shape[0]),
        "posterior_refit": fit,
        "posterior_refit_package_search": refit_with_package_search(x, targets, n_particles,
                                                                    repeats),
    }  # fmt: skip
    for name, design in [("diffcbed", diffcbed.design), ("ss_finite", ss_finite.design)]:
        start = time.perf_counter()
        jax.block_until_ready(design(env, particles, jax.random.key(99))[0])
        first = time.perf_counter() - start
        keys = iter(jax.random.split(jax.random.key(step), repeats))
        timing = wall(
            lambda design=design, keys=keys: design(env, particles, next(keys))[0], repeats
        )
        timing["first_call_s"] = first  # compile + one run
        out[name] = timing
    return out


def end_to_end(env, n_envs: int, workers: int, n_particles: int) -> dict:
    """Wall seconds of each baseline over the whole budget, per design step per env."""
    params = ev.heldout_params(env, n_envs, 0)
    out = {}
    for name, run in LIKELIHOOD_BASELINES.items():
        start = time.perf_counter()
        run(
            env,
            params,
            jax.random.key(1),
            n_workers=workers,
            progress=False,
            n_particles=n_particles,
        )
        seconds = time.perf_counter() - start
        out[name] = {
            "wall_s": seconds,
            "per_step_per_env_s": seconds / (n_envs * env.budget),
            "n_envs": n_envs,
            "workers": workers,
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--env", nargs="+", default=["linear-d10"])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--n-particles", type=positive_int, default=30)
    parser.add_argument(
        "--e2e-envs", type=int_at_least(0), default=2, help="0 skips the end-to-end run"
    )
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    envs = {}
    for name in args.env:  # every env checked before the first (minutes-long) measurement
        try:
            envs[name] = make_env(name)
            check_supported(envs[name])
        except ValueError as error:
            parser.error(str(error))
    result = {"machine": machine_info(), "load_before": load(), "envs": {}}
    for name, env in envs.items():
        figures = {
            "caasl_forward": caasl_forward(env, args.repeats),
            "after_step_0": per_step_figures(env, 0, args.repeats, args.n_particles),
            f"after_step_{env.budget - 1}": per_step_figures(
                env, env.budget - 1, args.repeats, args.n_particles
            ),
        }
        if args.e2e_envs > 0:
            figures["end_to_end"] = end_to_end(env, args.e2e_envs, args.workers, args.n_particles)
        result["envs"][name] = figures
    result["load_after"] = load()
    emit(result)


if __name__ == "__main__":
    main()
