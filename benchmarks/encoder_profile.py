"""Forward vs gradient cost of the paper-size encoder on one CPU micro-batch.

    python -m benchmarks.encoder_profile [--histories 4] [--repeats 30] [--kernels 20]

Times the policy encoder (ffn 4x) with and without dropout and the critic encoder
(ffn 2x), forward and gradient, on a micro-batch of [60, 10, 2] histories, and one
variable-axis and one sample-axis block alone. These are the figures behind "What
limits the gradient step" in RESULTS.md. Prints JSON (milliseconds, medians). With
`--kernels N`, also the N slowest XLA kernels of the gradient of one policy
sample-axis block (dropout on, padded rows masked), from a `jax.profiler` trace.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import emit, machine_info, profile_kernels, time_call
from caasl_jax.agents.networks import Encoder, EncoderConfig, TransformerBlock
from caasl_jax.cli import DefaultsHelpFormatter, int_at_least, positive_int

N_ROWS, D, WIDTH = 60, 10, 32


def median_ms(fn, *args, repeats: int) -> float:
    """Median milliseconds of jitted `fn(*args)`, compile excluded (`common.time_call`)."""
    return 1000 * time_call(jax.jit(fn), *args, repeats=repeats)["median_s"]


def fwd_and_grad(module, params, *inputs, repeats: int, rngs=None) -> dict:
    def forward(p):
        return module.apply(p, *inputs, rngs=rngs)

    def grad(p):
        return jax.grad(lambda q: jnp.sum(forward(q) ** 2))(p)

    return {
        "forward_ms": median_ms(forward, params, repeats=repeats),
        "grad_ms": median_ms(grad, params, repeats=repeats),
    }


def sample_block_kernels(tokens, key_mask, top: int, calls: int) -> list[dict]:
    """Top kernels of the gradient (params and input) of a policy sample-axis block
    (ffn 4x, dropout 0.1) on tokens f32[B, d, N, D] with key_mask bool[B, 1, N]."""
    block = TransformerBlock(num_heads=8, ffn_width=4 * WIDTH, dropout=0.1, deterministic=False)
    key = jax.random.key(1)
    params = block.init({"params": key, "dropout": key}, tokens, key_mask)

    @jax.jit
    def grad(p, x, m):
        def loss(q, y):
            return jnp.sum(block.apply(q, y, m, rngs={"dropout": key}) ** 2)

        return jax.grad(loss, argnums=(0, 1))(p, x)

    for _ in range(3):
        jax.block_until_ready(grad(params, tokens, key_mask))
    return profile_kernels(grad, params, tokens, key_mask, calls=calls, top=top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--histories", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--kernels", type=int_at_least(0), default=0, help="top kernels to profile")
    args = parser.parse_args(argv)
    b, key = args.histories, jax.random.key(0)
    data = jax.random.normal(key, (b, N_ROWS, D, 2))
    mask = jnp.arange(N_ROWS) < jax.random.randint(key, (b, 1), 50, N_ROWS + 1)
    results = {}
    for name, ffn, dropout in (
        ("policy", 4, 0.1),
        ("policy_no_dropout", 4, 0.0),
        ("critic", 2, 0.0),
    ):
        config = EncoderConfig(num_layers=4, num_heads=8, ffn_multiplier=ffn, dropout=dropout)
        encoder = Encoder(config, deterministic=dropout == 0.0)
        params = encoder.init({"params": key, "dropout": key}, data, mask)
        results[f"encoder_{name}"] = fwd_and_grad(
            encoder, params, data, mask, repeats=args.repeats, rngs={"dropout": key}
        )
    x = jax.random.normal(key, (b, N_ROWS, D, WIDTH))
    block = TransformerBlock(num_heads=8, ffn_width=4 * WIDTH, dropout=0.0, deterministic=True)
    for name, tokens, key_mask in (
        ("variables", x, None),
        ("samples", jnp.swapaxes(x, 1, 2), mask[:, None, :]),
    ):
        params = block.init(key, tokens, key_mask)
        results[f"block_{name}"] = fwd_and_grad(
            block, params, tokens, key_mask, repeats=args.repeats
        )
    if args.kernels:
        results["policy_block_samples_grad_kernels"] = sample_block_kernels(
            jnp.swapaxes(x, 1, 2), mask[:, None, :], args.kernels, args.repeats
        )
    emit(
        {
            "benchmark": "encoder_profile",
            "histories": b,
            "results": results,
            "machine": machine_info(),
        }
    )


if __name__ == "__main__":
    main()
