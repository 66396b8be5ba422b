"""SERGIO cells per second: caasl_jax's simulator beside avici's NumPy SERGIO.

    python -m benchmarks.sergio_throughput [--batch 1000] [--repeats 5] [--avici-repeats 5]
        [--langevin-steps 5 (0: full 150-step trajectories)] [--poisson-rounds 3]

Prints one JSON object (compile time excluded, medians over repeats):
- step: B environments stepping together, T = budget design steps in one jitted scan
  of the vmapped `env.step` (one knocked-out cell per environment and step, technical
  noise included); cells = B * T * samples_per_step;
- initial_dataset: the n0 = 50-cell wild-type data set of B environments, `reset`
  alone (hidden params given) and `sample_params` + `reset` (graph, mechanisms and the
  level-by-level calibration of the half-responses included, i.e. a data set from
  scratch, which is what one avici call does);
- avici (when /work/main/.ref or $AVICI_REF holds avici 1.0.7): its `Sergio` class
  on one core with the same settings (d, 5 cell types, hill 1, decay 0.8, noise 1,
  dt 0.01, sampling_state 15, safety steps 10, 10X Chromium noise): a 50-cell
  wild-type data set, and a one-cell knockout experiment (number_sc = 1, as avici's
  own GRNSergio makes interventional data, keeping one of the cells);
- ratios of our per-cell throughput to avici's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import emit, machine_info, time_call
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.envs.sergio import SergioEnv

DEFAULT_REF = Path(__file__).resolve().parents[1] / ".ref"


def load_avici_sergio(ref_dir: Path):
    """avici's `Sergio` class, loaded from its file (NumPy only; the avici package's
    __init__ pulls in Haiku and broken JAX imports, which this file does not need)."""
    path = ref_dir / "avici" / "synthetic" / "sergio" / "sim.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_avici_sergio_sim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Sergio


def design_steps_fn(env: SergioEnv, batch: int):
    """(steps, states, params): `steps(key, states)` jitted, B = batch environments
    taking env.budget design steps together (one scan of the vmapped `env.step`, fixed
    random actions); states and params of B held-out systems after `reset`."""
    keys = jax.random.split(jax.random.key(0), batch)
    params = jax.jit(jax.vmap(env.sample_params))(keys)
    _, states = jax.jit(jax.vmap(env.reset))(keys, params)
    actions = jax.random.uniform(jax.random.key(1), (batch, env.action_dim), minval=-1, maxval=1)

    @jax.jit
    def steps(key, states):
        def body(states, step_key):
            step_keys = jax.random.split(step_key, batch)
            history, states, _, _, _ = jax.vmap(env.step)(step_keys, states, actions, params)
            return states, None

        states, _ = jax.lax.scan(body, states, jax.random.split(key, env.budget))
        return states.history.data

    return steps, states, params


def jax_figures(env: SergioEnv, batch: int, repeats: int) -> dict:
    steps, states, params = design_steps_fn(env, batch)

    @jax.jit
    def reset(key):
        return jax.vmap(env.reset)(jax.random.split(key, batch), params)[0].data

    @jax.jit
    def from_scratch(key):
        def one(k):
            p_key, r_key = jax.random.split(k)
            return env.reset(r_key, env.sample_params(p_key))[0].data

        return jax.vmap(one)(jax.random.split(key, batch))

    key = jax.random.key(2)
    step_s = time_call(lambda: steps(key, states), repeats=repeats)["median_s"]
    reset_s = time_call(lambda: reset(key), repeats=repeats)["median_s"]
    scratch_s = time_call(lambda: from_scratch(key), repeats=repeats)["median_s"]
    step_cells = batch * env.budget * env.samples_per_step
    return {
        "step": {"batch": batch, "design_steps": env.budget, "seconds": step_s,
                 "cells_per_s": step_cells / step_s},
        "initial_dataset": {
            "batch": batch,
            "cells_per_env": env.n0,
            "reset_seconds": reset_s,
            "reset_cells_per_s": batch * env.n0 / reset_s,
            "with_sample_params_seconds": scratch_s,
            "with_sample_params_cells_per_s": batch * env.n0 / scratch_s,
        },
    }


def avici_figures(sergio_cls, env: SergioEnv, repeats: int) -> dict:
    """Seconds per avici data set, on graphs and mechanisms drawn by our prior."""
    d, c = env.d, env.n_cell_types
    noise = env.noise
    rng = np.random.default_rng(0)
    params = jax.vmap(env.sample_params)(jax.random.split(jax.random.key(3), repeats))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def run(i: int, number_sc: int, knockout: int | None) -> np.ndarray:
        kout = np.zeros(d, bool)
        if knockout is not None:
            kout[knockout] = True
        sim = sergio_cls(rng=rng, number_genes=d, number_bins=c, number_sc=number_sc,
                         noise_params=env.noise_scale, noise_type="dpd", decays=env.decay,
                         sampling_state=env.sampling_state, kout=kout, dt=env.dt,
                         safety_steps=10)
        sim.custom_graph(g=params.graph[i], k=params.interactions[i], b=params.basal[i].T,
                         hill=env.hill * np.ones((d, d)))
        sim.simulate()
        expr = sim.getExpressions()
        expr = sim.outlier_effect(expr, noise.outlier_prob, noise.outlier_mean,
                                  noise.outlier_scale)
        _, expr = sim.lib_size_effect(expr, noise.library_mean, noise.library_scale)
        expr = expr * sim.dropout_indicator(expr, noise.dropout_shape,
                                            int(noise.dropout_percentile))
        return sim.convert_to_UMIcounts(expr)

    def seconds(number_sc, knockout):
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            run(i, number_sc, knockout)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    wild_s = seconds(env.cells_per_type, None)
    ko_s = seconds(1, 0)
    return {
        "wild_type_dataset_seconds": wild_s,
        "wild_type_cells_per_s": env.n0 / wild_s,
        "knockout_cell_seconds": ko_s,
        "knockout_cells_per_s": 1.0 / ko_s,
        "repeats": repeats,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--d", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=1000)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--avici-repeats", type=positive_int, default=5)
    parser.add_argument("--increments", default="rademacher", choices=["rademacher", "gaussian"])
    parser.add_argument("--langevin-steps", type=positive_int, default=5,
                        help="SergioEnv.langevin_steps; 0 for None (full trajectories)")
    parser.add_argument("--poisson-rounds", type=positive_int, default=3)
    parser.add_argument("--ref", type=Path, default=Path(os.environ.get("AVICI_REF", DEFAULT_REF)))
    args = parser.parse_args(argv)
    env = SergioEnv(d=args.d, increments=args.increments,
                    langevin_steps=args.langevin_steps or None,
                    poisson_rounds=args.poisson_rounds)
    result = {"benchmark": "sergio_throughput", "d": env.d, "n0": env.n0,
              "budget": env.budget, "increments": env.increments,
              "langevin_steps": env.langevin_steps, "poisson_rounds": env.poisson_rounds,
              "trajectory_steps": env.n_steps, **jax_figures(env, args.batch, args.repeats)}
    sergio_cls = load_avici_sergio(args.ref)
    if sergio_cls is None:
        result["avici"] = f"not measured: avici 1.0.7 not found under {args.ref}"
    else:
        avici = avici_figures(sergio_cls, env, args.avici_repeats)
        result["avici"] = avici
        step_rate = result["step"]["cells_per_s"]
        result["speedup"] = {
            "step_vs_avici_knockout_cell": step_rate / avici["knockout_cells_per_s"],
            "step_vs_avici_wild_type_cell": step_rate / avici["wild_type_cells_per_s"],
            "reset_vs_avici_wild_type_cell":
                result["initial_dataset"]["reset_cells_per_s"] / avici["wild_type_cells_per_s"],
            "from_scratch_vs_avici_wild_type_cell":
                result["initial_dataset"]["with_sample_params_cells_per_s"]
                / avici["wild_type_cells_per_s"],
        }
    result["machine"] = machine_info()
    emit(result)


if __name__ == "__main__":
    main()
