"""How far can any posterior get on the reward model's held-out histories?

Scores, on the exact held-out set of `caasl pretrain-reward --evaluate-only` (n0
observational rows + T random single-target do-interventions per system, same seed):

- the reward model (a shipped name or a .msgpack file),
- the bootstrapped-GIES posterior of the likelihood baselines, which knows the true model
  class (linear Gaussian): edge probability = fraction of particles with the edge,
- both thresholded at 0.5 (the point estimate that the expected-correct metric rewards),
- the empty graph.

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

from caasl_jax.baselines.posterior import fit_posterior, use_fast_gies
from caasl_jax.envs.registry import make_env
from caasl_jax.metrics import batch_metrics
from caasl_jax.reward import edge_probs, load_reward_model
from caasl_jax.reward.pretrain import heldout_set

RESULTS = Path(__file__).resolve().parent / "results" / "reward_reference"


def gies_edge_probs(data: np.ndarray, mask: np.ndarray, n_particles: int, seed: int):
    """Particle-average edge probabilities f32[B, d, d] of histories data f32[B, N, d, 2]."""
    probs = []
    for b in range(data.shape[0]):
        rows = data[b][mask[b]]
        fits = fit_posterior(rows[..., 0], rows[..., 1] > 0.5, n_particles, seed + b)
        probs.append(fits["dag"].mean(axis=0))
    return np.stack(probs).astype(np.float32)


def mean_metrics(probs, graph) -> dict[str, float]:
    """Means over systems of every project metric (probs, graph f32[B, d, d])."""
    return {k: float(jnp.mean(v)) for k, v in jax.jit(batch_metrics)(probs, graph).items()}


def reference_table(env_name: str, weights: str, n_envs: int, seed: int, n_particles: int):
    """{predictor name: mean metrics} on the held-out set of `env_name`."""
    params, config = load_reward_model(weights)
    env = make_env(env_name)
    data, mask, graph = heldout_set(env, jax.random.key(seed), n_envs)
    model_probs = jax.jit(lambda x, m: edge_probs(params, x, m, config))
    model = jnp.concatenate(
        [model_probs(data[i : i + 50], mask[i : i + 50]) for i in range(0, n_envs, 50)]
    )
    use_fast_gies()
    start = time.perf_counter()
    gies = jnp.asarray(gies_edge_probs(np.asarray(data), np.asarray(mask), n_particles, seed))
    gies_seconds = time.perf_counter() - start
    off_diagonal = 1.0 - jnp.eye(env.d)
    predictors = {
        f"reward model {weights}": model,
        f"reward model {weights}, thresholded at 0.5": (model > 0.5) * off_diagonal,
        f"bootstrapped GIES, {n_particles} particles": gies,
        "bootstrapped GIES, thresholded at 0.5": (gies > 0.5) * off_diagonal,
        "empty graph": jnp.zeros_like(graph),
    }
    return {
        "env": env_name,
        "weights": weights,
        "eval_envs": n_envs,
        "eval_seed": seed,
        "history": f"{env.n0} observational rows + {env.budget} random single-target do rows",
        "gies_fit_seconds": round(gies_seconds, 1),
        "predictors": {name: mean_metrics(p, graph) for name, p in predictors.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="linear-d10", help="a linear env (GIES needs a likelihood)")
    p.add_argument("--weights", default="linear-d10", help="a shipped name or a weights file")
    p.add_argument("--n-envs", type=int, default=100)
    p.add_argument("--seed", type=int, default=12345, help="the model card's --eval-seed")
    p.add_argument("--particles", type=int, default=30)
    p.add_argument("--out", type=Path, help="default: results/reward_reference/ENV.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if not args.env.startswith("linear"):
        p.error(f"--env {args.env!r}: the GIES posterior needs a linear-Gaussian env")
    if args.n_envs < 1 or args.particles < 1:
        p.error("--n-envs and --particles must be at least 1")
    out = args.out or RESULTS / f"{args.env}.json"
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    table = reference_table(args.env, args.weights, args.n_envs, args.seed, args.particles)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    json.dump(table, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
