"""The first design of DiffCBED and SS Finite on a few environments: targets and values.

Backs the figure-4 finding that DiffCBED shifts 8-10 of the 10 variables at once on
the shift-intervention set (experiments/README.md). About 1 min on 2 cores.

    python experiments/first_designs.py --env linear-ood-shift-d10 --n-envs 4
"""

import argparse

import jax
import numpy as np

from caasl_jax.baselines import diffcbed, ss_finite
from caasl_jax.baselines.posterior import (
    fit_posterior,
    history_rows,
    particles_from_numpy,
    use_fast_gies,
)
from caasl_jax.baselines.runner import check_supported
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.envs import make_env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    p.add_argument("--env", default="linear-ood-shift-d10")
    p.add_argument("--n-envs", type=positive_int, default=4)
    args = p.parse_args(argv)
    env = make_env(args.env)
    check_supported(env)
    use_fast_gies()
    for i in range(args.n_envs):
        key = jax.random.key(i)
        history, _ = env.reset(jax.random.fold_in(key, 1), env.sample_params(key))
        x, targets = history_rows(history)
        particles = particles_from_numpy(fit_posterior(x, targets, 30, i))
        for method in (diffcbed, ss_finite):
            action, _ = method.design(env, particles, jax.random.key(7 + i))
            chosen, values = (np.asarray(a) for a in env.design(action))
            on = chosen > 0.5
            name = method.__name__.rsplit(".", 1)[-1]
            targets_on, values_on = np.flatnonzero(on).tolist(), np.round(values[on], 2).tolist()
            print(f"{args.env} env {i} {name}: targets {targets_on} values {values_on}")


if __name__ == "__main__":
    main()
