"""HashDropout: the statistics and semantics of nn.Dropout with hashed masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.dropout import HashDropout, keep_mask

SHAPE = (64, 8, 60, 60)  # ~1.8M entries: one sample-axis attention of a micro-batch


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_is_one_minus_rate(rate):
    keep = np.asarray(keep_mask(jax.random.key(0), SHAPE, rate))
    n = keep.size
    tolerance = 5 * np.sqrt(rate * (1 - rate) / n)  # 5 binomial standard errors
    assert abs(keep.mean() - (1 - rate)) < tolerance


def test_masks_are_uncorrelated_across_entries_and_keys():
    rate = 0.1
    a = np.asarray(keep_mask(jax.random.key(1), SHAPE, rate)).ravel()
    b = np.asarray(keep_mask(jax.random.key(2), SHAPE, rate)).ravel()
    n = a.size
    # neighbours in the flat index (the hash input differs by one) and other keys
    for x, y in ((a[:-1], a[1:]), (a, b), (a[:-60], a[60:])):
        both_dropped = np.mean(~x & ~y)
        assert abs(both_dropped - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / n)


def test_same_key_same_mask_and_the_mask_depends_on_the_key():
    one = keep_mask(jax.random.key(4), (1000,), 0.3)
    np.testing.assert_array_equal(one, keep_mask(jax.random.key(4), (1000,), 0.3))
    assert not np.array_equal(one, keep_mask(jax.random.key(5), (1000,), 0.3))


def test_module_scales_kept_entries_and_zeros_the_rest():
    x = jax.random.normal(jax.random.key(6), (32, 50)) + 3.0  # no exact zeros
    layer = HashDropout(0.25)
    y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(7)}))
    kept = y != 0
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    # the gradient flows through kept entries only, scaled the same way
    grad = jax.grad(
        lambda v: layer.apply({}, v, deterministic=False, rngs={"dropout": jax.random.key(7)}).sum()
    )(x)
    np.testing.assert_allclose(np.asarray(grad), kept / 0.75, rtol=1e-6)


def test_module_is_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(HashDropout(0.5, deterministic=True).apply({}, x), x)
    np.testing.assert_array_equal(
        HashDropout(0.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}), x
    )


def test_module_rejects_a_bad_rate_and_a_missing_rng():
    with pytest.raises(ValueError, match="rate must be in"):
        HashDropout(1.0).apply(
            {}, jnp.ones(3), deterministic=False, rngs={"dropout": jax.random.key(0)}
        )
    with pytest.raises(Exception, match="dropout"):
        HashDropout(0.1).apply({}, jnp.ones(3), deterministic=False)


def test_two_layers_in_one_module_draw_different_masks():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return HashDropout(0.5)(x, False), HashDropout(0.5)(x, False)

    first, second = Two().apply({}, jnp.ones(4096), rngs={"dropout": jax.random.key(8)})
    agree = np.mean((np.asarray(first) > 0) == (np.asarray(second) > 0))
    assert 0.45 < agree < 0.55
