"""The counter hash behind dropout masks and SERGIO's random words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.hash_random import fmix32, hash_bits, split_words


def test_fmix32_matches_murmur3_reference_values():
    # murmur3's fmix32 computed by hand in Python integers
    def reference(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    xs = np.array([0, 1, 2, 12345, 2**31, 2**32 - 1], np.uint32)
    got = np.asarray(fmix32(jnp.asarray(xs)))
    np.testing.assert_array_equal(got, [reference(int(x)) for x in xs])


def test_bits_are_uniform_over_bytes():
    bits = np.asarray(hash_bits(jax.random.key(3), (1 << 20,)))
    for shift in (0, 8, 16, 24):
        counts = np.bincount((bits >> shift) & 0xFF, minlength=256)
        expected = bits.size / 256
        chi2 = np.sum((counts - expected) ** 2 / expected)
        assert chi2 < 400  # 255 degrees of freedom: p ~ 1e-8 above 400


def test_hash_bits_are_deterministic_and_depend_on_the_key():
    one = hash_bits(jax.random.key(4), (3, 5))
    assert one.shape == (3, 5) and one.dtype == jnp.uint32
    np.testing.assert_array_equal(one, hash_bits(jax.random.key(4), (3, 5)))
    assert np.mean(np.asarray(one) == np.asarray(hash_bits(jax.random.key(5), (3, 5)))) < 0.2


def test_split_words_cuts_consecutive_pieces():
    words = jnp.arange(9, dtype=jnp.uint32)
    a, b, c = split_words(words, (2, 0, 7))
    np.testing.assert_array_equal(a, [0, 1])
    assert b.shape == (0,)
    np.testing.assert_array_equal(c, np.arange(2, 9))
    with pytest.raises(ValueError, match="u32\\[8\\]"):
        split_words(words, (4, 4))
