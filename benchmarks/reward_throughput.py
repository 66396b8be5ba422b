"""Reward-model throughput: histories scored per second.

    python -m benchmarks.reward_throughput [--batch 1000] [--big-batch 1000] [--n 60] [--d 10]

Prints JSON with histories/s (edge probabilities of a batch of [n, d, 2] histories,
one jitted vmapped call, compile excluded) for
- the shipped size (caasl_jax/weights/linear-d10.msgpack if present, else its config),
- the official AVICI size (dim 128, 8 layers = 16 blocks, 8 heads, key size 32; 4.27M
  parameters), randomly initialised,
- avici's own Haiku model at the official size, when the reference install in .ref/
  exists (see tests/reference/avici_ref.py), on the same inputs;
- the exact posterior of the linear-dN prior (caasl_jax/reward/exact.py, float32, the
  oracle reward `reward_model: exact`), `--exact-batch` histories, d <= 14.
The official-size models and the exact posterior run `--big-repeats` timed calls
(default 1) after compiling ahead of time, so the whole benchmark stays within a few
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import emit, machine_info, time_call
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.reward.checkpoint import available_pretrained, load_pretrained
from caasl_jax.reward.model import AviciConfig, edge_probs, init_params, param_count

SHIPPED_FALLBACK = AviciConfig(dim=32, layers=2, heads=4, key_size=8, widening=4)
OFFICIAL = AviciConfig(dim=128, layers=8, heads=8, key_size=32, widening=4)


def _inputs(batch: int, n: int, d: int):
    k1, k2 = jax.random.split(jax.random.key(0))
    values = jax.random.normal(k1, (batch, n, d))
    targets = jax.random.bernoulli(k2, 0.05, (batch, n, d)).astype(jnp.float32)
    data = jnp.stack([values, targets], -1)
    mask = jnp.ones((batch, n), bool)
    return data, mask


def _measure(fn, args, repeats: int) -> dict:
    """Compile ahead of time, then time `repeats` calls (one warm-up when repeats > 1)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    timing = time_call(lambda: compiled(*args), repeats=repeats, warmup=1 if repeats > 1 else 0)
    return {"compile_s": round(compile_s, 2), **timing}


def ours(config: AviciConfig, params, batch, n, d, repeats) -> dict:
    data, mask = _inputs(batch, n, d)
    fn = jax.vmap(lambda p, x, m: edge_probs(p, x, m, config), in_axes=(None, 0, 0))
    timing = _measure(fn, (params, data, mask), repeats)
    return {"params": param_count(params), "batch": batch,
            "histories_per_s": round(batch / timing["median_s"], 2), **timing}


def exact(batch, n, d, repeats) -> dict:
    from caasl_jax.envs.registry import make_env
    from caasl_jax.reward.exact import ExactPrior, exact_edge_probs

    try:
        prior = ExactPrior.of_env(make_env(f"linear-d{d}"))
    except ValueError as err:
        return {"skipped": str(err)}
    data, mask = _inputs(batch, n, d)
    fn = jax.vmap(lambda x, m: exact_edge_probs(x[..., 0], x[..., 1] > 0.5, m, prior))
    timing = _measure(fn, (data, mask), repeats)
    return {"batch": batch, "histories_per_s": round(batch / timing["median_s"], 2), **timing}


def avici_haiku(batch, n, d, repeats) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        from reference.avici_ref import import_avici
        avici_model, _ = import_avici()
        from avici.utils.data_jax import jax_standardize_default_simple
    except ImportError as err:
        return {"skipped": str(err)}
    kwargs = dict(layers=OFFICIAL.layers, dim=OFFICIAL.dim, key_size=OFFICIAL.key_size,
                  num_heads=OFFICIAL.heads, widening_factor=OFFICIAL.widening, dropout=0.0,
                  cosine_temp_init=2.0)
    model = avici_model.InferenceModel(model_class=avici_model.BaseModel, model_kwargs=kwargs,
                                       mask_diag=True, acyclicity=None)
    data, _ = _inputs(batch, n, d)
    params = model.net.init(jax.random.PRNGKey(0), data[0], False)

    def fn(p, x):
        logits = model.net.apply(p, jax.random.PRNGKey(0), jax_standardize_default_simple(x),
                                 False)
        probs = jax.nn.sigmoid(logits)
        return probs * (1.0 - jnp.eye(x.shape[-2]))

    timing = _measure(fn, (params, data), repeats)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"params": int(n_params), "batch": batch,
            "histories_per_s": round(batch / timing["median_s"], 2), **timing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batch", type=positive_int, default=1000)
    parser.add_argument(
        "--big-batch", type=positive_int, default=1000, help="batch for official size"
    )
    parser.add_argument("--n", type=positive_int, default=60, help="rows per history (50 obs + 10)")
    parser.add_argument("--d", type=positive_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--big-repeats", type=positive_int, default=1)
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--skip-haiku", action="store_true")
    parser.add_argument("--exact-batch", type=positive_int, default=1000)
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args(argv)

    if "linear-d10" in available_pretrained():
        shipped_params, shipped_config, _ = load_pretrained("linear-d10")
        shipped_name = "linear-d10 (shipped weights)"
    else:
        shipped_config = SHIPPED_FALLBACK
        shipped_params = init_params(jax.random.key(0), shipped_config, args.d)
        shipped_name = "shipped config (random init; no weights file yet)"
    result = {
        "benchmark": "reward_throughput",
        "history_shape": [args.n, args.d, 2],
        "machine": machine_info(),
        "shipped": {"name": shipped_name, "config": shipped_config.to_dict(),
                    **ours(shipped_config, shipped_params, args.batch, args.n, args.d,
                           args.repeats)},
    }
    if not args.skip_official:
        official_params = init_params(jax.random.key(0), OFFICIAL, args.d)
        result["official_flax"] = ours(OFFICIAL, official_params, args.big_batch, args.n,
                                       args.d, args.big_repeats)
    if not args.skip_haiku:
        result["official_avici_haiku"] = avici_haiku(args.big_batch, args.n, args.d,
                                                     args.big_repeats)
    if not args.skip_exact:
        result["exact_posterior"] = exact(args.exact_batch, args.n, args.d, args.big_repeats)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
