"""How far can any posterior get on the reward model's held-out histories?

Scores, on the exact held-out set of `caasl pretrain-reward --evaluate-only` (n0
observational rows + T random single-target do-interventions per system, same seed):

- the reward model (a shipped name or a .msgpack file),
- the bootstrapped-GIES posterior of the likelihood baselines, which knows the true model
  class (linear Gaussian): edge probability = fraction of particles with the edge,
- the exact posterior of the env's prior (`reward.exact`): what a reward
  model trained to convergence with BCE on this prior predicts; also on the observational
  rows alone (left out, with the reason recorded as exact_posterior_skipped, for an env
  outside the prior it is exact for: scale-free graphs, shift interventions, d > 14, ...),
- each thresholded at 0.5 (the point estimate that the expected-correct metric rewards),
- the empty graph.

Expected correct. For edge probabilities P and the true graph G the score is
sum_ij [G_ij P_ij + (1 - G_ij)(1 - P_ij)]. Averaged over the prior, G given the history
is distributed as the exact posterior Q, so any predictor's expected score is
sum_ij [Q_ij P_ij + (1 - Q_ij)(1 - P_ij)], which P = [Q > 0.5] maximises: the exact
posterior thresholded at 0.5 is the best any predictor can score on these histories
(up to the sampling noise of n_envs systems).

Prints the table as JSON and writes it to results/reward_reference/<env>.json (an
existing file is kept unless --overwrite). About 1 s per system per 30 particles on
one core.

    python experiments/reward_reference.py --env linear-d10 --weights linear-d10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from caasl_jax.baselines.posterior import fit_posterior, history_rows, use_fast_gies
from caasl_jax.baselines.runner import check_supported
from caasl_jax.checks import file_path_problem
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.envs.core import History
from caasl_jax.envs.registry import make_env
from caasl_jax.reward import load_reward_model
from caasl_jax.reward.exact import (
    ExactPrior,
    exact_edge_posterior,
    exact_prior_problem,
)
from caasl_jax.reward.pretrain import heldout_set, make_heldout_probs, mean_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "reward_reference"


def gies_edge_probs(data: jax.Array, mask: jax.Array, n_particles: int, seed: int):
    """Particle-average edge probabilities f32[B, d, d] of histories data f32[B, N, d, 2]
    whose valid rows (mask bool[B, N]) come first."""
    probs = []
    for b in range(data.shape[0]):
        x, targets = history_rows(History(data[b], mask[b].sum()))
        probs.append(fit_posterior(x, targets, n_particles, seed + b)["dag"].mean(axis=0))
    return jnp.asarray(np.stack(probs))


def exact_edge_probs(data: jax.Array, mask: jax.Array, prior: ExactPrior, rows: int | None = None):
    """Exact posterior edge probabilities f32[B, d, d] of histories data f32[B, N, d, 2]
    (valid rows first, mask bool[B, N]); `rows`: use only the first that many rows."""
    probs = []
    for b in range(data.shape[0]):
        x, targets = history_rows(History(data[b], mask[b].sum()))
        probs.append(exact_edge_posterior(x[:rows], targets[:rows], prior))
    return jnp.asarray(np.stack(probs), jnp.float32)


def exact_predictors(env, data: jax.Array, mask: jax.Array) -> dict:
    """{name: f32[B, d, d]} of the exact posterior, with and without the design rows, and
    thresholded; empty where the env's prior is not one it is exact for."""
    prior = ExactPrior.of_env(env)
    exact = exact_edge_probs(data, mask, prior)
    observational = exact_edge_probs(data, mask, prior, rows=env.n0)
    off_diagonal = 1.0 - jnp.eye(env.d)
    return {
        "exact posterior": exact,
        "exact posterior, thresholded at 0.5 (the best any predictor can do)": (exact > 0.5)
        * off_diagonal,
        f"exact posterior, the {env.n0} observational rows only": observational,
        f"exact posterior, the {env.n0} observational rows only, thresholded at 0.5": (
            observational > 0.5
        )
        * off_diagonal,
    }


def reference_table(env_name: str, weights: str, n_envs: int, seed: int, n_particles: int):
    """{predictor name: mean metrics} on the held-out set of `env_name`."""
    env = make_env(env_name)
    check_supported(env, "the GIES posterior")
    params, config = load_reward_model(weights)
    data, mask, graph = heldout_set(env, jax.random.key(seed), n_envs)
    model = make_heldout_probs(config, data, mask)(params)
    use_fast_gies()
    start = time.perf_counter()
    gies = gies_edge_probs(data, mask, n_particles, seed)
    gies_seconds = time.perf_counter() - start
    off_diagonal = 1.0 - jnp.eye(env.d)
    predictors = {
        f"reward model {weights}": model,
        f"reward model {weights}, thresholded at 0.5": (model > 0.5) * off_diagonal,
        f"bootstrapped GIES, {n_particles} particles": gies,
        "bootstrapped GIES, thresholded at 0.5": (gies > 0.5) * off_diagonal,
    }
    start = time.perf_counter()
    exact_skipped = exact_prior_problem(env)
    if exact_skipped is None:
        predictors |= exact_predictors(env, data, mask)
    exact_seconds = time.perf_counter() - start
    predictors["empty graph"] = jnp.zeros_like(graph)
    timing = {"gies_fit_seconds": round(gies_seconds, 1)}
    if exact_skipped is None:
        timing["exact_posterior_seconds"] = round(exact_seconds, 1)
    else:
        timing["exact_posterior_skipped"] = exact_skipped
    return {
        "env": env_name,
        "weights": weights,
        "eval_envs": n_envs,
        "eval_seed": seed,
        "history": f"{env.n0} observational rows + {env.budget} random single-target do rows",
        **timing,
        "predictors": {name: mean_metrics(p, graph) for name, p in predictors.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    p.add_argument("--env", default="linear-d10", help="a linear-Gaussian env (GIES needs one)")
    p.add_argument("--weights", default="linear-d10", help="a shipped name or a weights file")
    p.add_argument("--n-envs", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=12345, help="the model card's --eval-seed")
    p.add_argument("--particles", type=int, default=30)
    p.add_argument(
        "--out", type=Path, help="default: experiments/results/reward_reference/ENV.json"
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.n_envs < 1 or args.particles < 1:
        p.error("--n-envs and --particles must be at least 1")
    out = args.out or RESULTS / f"{args.env}.json"
    problem = file_path_problem(out, create_folders=True)
    if problem:
        p.error(f"--out {out} {problem}")
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    try:
        table = reference_table(args.env, args.weights, args.n_envs, args.seed, args.particles)
    except ValueError as error:  # unknown env or weights, an env without a likelihood
        p.error(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    json.dump(table, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
