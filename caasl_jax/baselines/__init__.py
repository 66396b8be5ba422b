"""Likelihood-based design baselines on a bootstrapped-GIES posterior (REFERENCE.md §6).

    from caasl_jax.baselines import LIKELIHOOD_BASELINES
    histories = LIKELIHOOD_BASELINES["diffcbed"](env, env_params, key)   # History [B]

Each entry is `run(env, env_params, key, *, n_workers=os.cpu_count(), progress=True,
checkpoint=None)` (checkpoint: a file to save progress to after each design step and
resume from; see `runner.run_design_loop`):
it takes held-out hidden parameters with a leading axis [B] and returns the final
histories [B] (the structure `evaluate.rollout_episodes(...)[0]` returns), built by
stepping the real env once per design step with the method's design. Only the linear
SCM environments (not linear-ood-hetero) are supported; others raise ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from caasl_jax.baselines import diffcbed, ss_finite
from caasl_jax.baselines.posterior import Particles, fit_posterior, log_likelihood
from caasl_jax.baselines.runner import check_supported, run_design_loop
from caasl_jax.envs.core import Environment, History


def _design_runner(name: str, design: Callable, default_config: Callable):
    """`run(env, env_params, key, *, n_workers, progress, n_particles, config)` for one
    method: its designs for every env of the batch, returning final histories [B]."""

    def run(
        env: Environment,
        env_params: Any,
        key: jax.Array,
        *,
        n_workers: int | None = os.cpu_count(),
        progress: bool = True,
        n_particles: int = 30,
        config=None,
        checkpoint=None,
    ) -> History:
        config = config or default_config()
        return run_design_loop(
            env,
            env_params,
            key,
            design,
            name=name,
            n_workers=n_workers,
            progress=progress,
            n_particles=n_particles,
            checkpoint=checkpoint,
            settings=config,
        )

    run.__doc__ = f"{name} designs for every env of the batch; final histories [B]."
    return run


run_diffcbed = _design_runner("diffcbed", diffcbed.design, diffcbed.DiffCBEDConfig)
run_ss_finite = _design_runner("ss-finite", ss_finite.design, ss_finite.SSFiniteConfig)


LIKELIHOOD_BASELINES: dict[str, Callable[..., History]] = {
    "diffcbed": run_diffcbed,
    "ss-finite": run_ss_finite,
}

__all__ = [
    "LIKELIHOOD_BASELINES",
    "Particles",
    "check_supported",
    "fit_posterior",
    "log_likelihood",
    "run_diffcbed",
    "run_ss_finite",
]
