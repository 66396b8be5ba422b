"""Cheap pseudo-random words: one threefry call per draw, then a counter hash.

    words[i] = fmix32(fmix32(i ^ seed0) + seed1),   (seed0, seed1) = threefry(key)

`jax.random.bits` runs threefry-2x32 (20 rounds, ~60 integer ops per word). On XLA's
CPU backend each call is a loop of small kernels that does not fuse into its
consumer; under vmap over a batch of environments, with a few dozen words each, that
loop dominated a SERGIO design step. Here the key costs one threefry call for two
words and every word is a dozen integer ops on its index, which XLA fuses into the
elementwise code that uses it. fmix32 (murmur3's 32-bit finaliser) is a bijection
with full avalanche; applied twice with two seed words, words are uncorrelated
across indices and keys (tests/test_hash_random.py, tests/test_dropout.py and the
SERGIO reference tests in tests/test_sergio.py check the statistics that depend on
them).

Users: `caasl_jax.dropout` (dropout masks) and `caasl_jax.envs.sergio` (all the
per-cell randomness of a design step and of the initial data set).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp


def fmix32(x: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser (a bijection of uint32 with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Pseudo-random uint32[shape] keyed by a JAX PRNG key (one threefry call in all)."""
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"hash_bits: at most 2**32 entries per call, got shape {shape}")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return fmix32(fmix32(index ^ seed[0]) + seed[1])


def split_words(words: jax.Array, sizes: tuple[int, ...]) -> list[jax.Array]:
    """Consecutive pieces u32[size] of a flat u32[sum(sizes)] draw, one per size."""
    if words.shape != (sum(sizes),):
        raise ValueError(f"split_words: need u32[{sum(sizes)}], got shape {words.shape}")
    offsets = [0, *itertools.accumulate(sizes)]
    return [words[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]
