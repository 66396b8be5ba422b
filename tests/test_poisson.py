"""The fixed-work Poisson sampler of SERGIO's technical noise against the exact law.

`poisson_counts` (inversion below rate 10, PTRS rounds above, a rounded normal when
every round rejects) is checked over a grid of rates with scipy's Poisson law: a
chi-square goodness-of-fit test over all counts, the mean and variance, and the two
tail probabilities beyond the 0.1 % and 99.9 % quantiles. The same checks reject the
rounded normal approximation and a one-round sampler, so they can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from caasl_jax.envs.sergio import bits_to_uniform, poisson_counts, poisson_from_bits

N = 200_000
RATES = (0.05, 0.5, 2.0, 5.0, 9.9, 10.0, 10.5, 20.0, 60.0, 200.0, 1000.0, 5000.0)


def poisson_misfit(sample: np.ndarray, rate: float) -> dict:
    """How far a sample f[n] is from Poisson(rate): chi-square p-value over the counts
    (bins with expected < 5 merged into the tails), z-scores of the mean, the variance
    and the two tail masses P(X <= q_0.001), P(X >= q_0.999)."""
    n = sample.size
    law = stats.poisson(rate)
    lo, hi = int(law.ppf(1e-6)), int(law.ppf(1 - 1e-6))
    edges = np.arange(lo, hi + 1)
    expected = np.diff(np.concatenate([[0.0], law.cdf(edges[:-1]), [1.0]])) * n
    observed = np.bincount(np.clip(sample.astype(np.int64), lo, hi) - lo, minlength=edges.size)
    # merge sparse bins into their neighbour towards the centre
    exp_bins, obs_bins, e_acc, o_acc = [], [], 0.0, 0
    for e, o in zip(expected, observed, strict=True):
        e_acc, o_acc = e_acc + e, o_acc + o
        if e_acc >= 5:
            exp_bins.append(e_acc)
            obs_bins.append(o_acc)
            e_acc, o_acc = 0.0, 0
    if exp_bins:
        exp_bins[-1] += e_acc
        obs_bins[-1] += o_acc
    exp_bins, obs_bins = np.array(exp_bins), np.array(obs_bins)
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    p_value = float(stats.chi2.sf(chi2, max(exp_bins.size - 1, 1)))

    def tail_z(observed_frac, p):
        return (observed_frac - p) / np.sqrt(max(p * (1 - p), 1e-12) / n)

    q_lo, q_hi = law.ppf(1e-3), law.ppf(1 - 1e-3)
    var = rate  # Var of the sample variance of a Poisson: (rate + 2 rate^2) / n
    return {
        "p_value": p_value,
        "mean_z": (sample.mean() - rate) / np.sqrt(rate / n),
        "var_z": (sample.var() - var) / np.sqrt((rate + 2 * rate**2) / n),
        "low_tail_z": tail_z((sample <= q_lo).mean(), law.cdf(q_lo)),
        "high_tail_z": tail_z((sample >= q_hi).mean(), law.sf(q_hi - 1)),
    }


def fits(misfit: dict) -> bool:
    """The sample passes: p > 1e-4 and every z-score within 4.5 (fixed seeds)."""
    return misfit["p_value"] > 1e-4 and all(
        abs(v) < 4.5 for k, v in misfit.items() if k.endswith("_z")
    )


@pytest.fixture(scope="module")
def sampler():
    return jax.jit(poisson_counts, static_argnums=2)


@pytest.mark.parametrize("rate", RATES)
def test_poisson_counts_follow_the_poisson_law(sampler, rate):
    sample = np.asarray(sampler(jax.random.key(int(rate * 100)), jnp.full((N,), rate), 3))
    assert np.all(sample == np.round(sample)) and sample.min() >= 0
    misfit = poisson_misfit(sample, rate)
    assert fits(misfit), misfit


def test_mixed_rates_keep_their_own_law(sampler):
    """Small and large rates interleaved in one call (each branch picked per entry)."""
    rates = np.tile(np.array([0.0, 3.0, 40.0, 0.0], np.float32), N // 4)
    sample = np.asarray(sampler(jax.random.key(7), jnp.asarray(rates), 3))
    assert np.all(sample[rates == 0] == 0)
    for rate in (3.0, 40.0):
        misfit = poisson_misfit(sample[rates == rate], rate)
        assert fits(misfit), (rate, misfit)


def test_checks_reject_approximations(sampler):
    """The checks have power: the rounded normal and a single PTRS round (about 10 %
    of entries then take the normal fallback) both fail them."""
    for rate in (10.0, 60.0):
        z = np.asarray(jax.random.normal(jax.random.key(3), (N,)))
        rounded_normal = np.maximum(np.round(rate + np.sqrt(rate) * z), 0)
        assert not fits(poisson_misfit(rounded_normal, rate)), rate
    one_round = np.asarray(sampler(jax.random.key(4), jnp.full((N,), 10.0), 1))
    assert not fits(poisson_misfit(one_round, 10.0))


def test_matches_jax_poisson_moments(sampler):
    """Against jax.random.poisson (exact, variable work) over a range of rates."""
    rates = jnp.asarray(np.geomspace(0.1, 3000, 64), jnp.float32)
    ours = np.asarray(sampler(jax.random.key(5), jnp.tile(rates, 4000), 3)).reshape(4000, -1)
    theirs = np.asarray(jax.random.poisson(jax.random.key(6), rates, (4000, 64)))
    r = np.asarray(rates)
    se = np.sqrt(2 * r / 4000)  # sd of the difference of two 4,000-draw means
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) < 5 * se)
    assert np.all(np.abs(ours.var(0) / theirs.var(0) - 1) < 0.15)


def test_uniforms_stay_inside_the_unit_interval():
    words = jnp.array([0, 1, 511, 512, 2**31, 2**32 - 1], jnp.uint32)
    u = np.asarray(bits_to_uniform(words))
    assert np.all(u > 0) and np.all(u < 1)
    assert u[0] == u[2] and u[3] > u[2]  # the low 9 bits are dropped


def test_from_bits_is_a_pure_function_of_its_words():
    words = jax.random.bits(jax.random.key(8), (4, 1000), jnp.uint32)
    rate = jnp.linspace(0.0, 100.0, 1000)
    a = np.asarray(poisson_from_bits(words, rate))
    assert np.array_equal(a, np.asarray(jax.jit(poisson_from_bits)(words, rate)))
    assert not np.array_equal(a, np.asarray(poisson_from_bits(words[::-1], rate)))
