"""The exact edge posterior of the linear-Gaussian ER prior (reward/exact.py).

Checked three independent ways: its local marginal likelihoods against numerical
integration of the Gaussian density (scipy), its sum over orders and graphs against
brute-force enumeration, and the posterior as a whole against draws from the env's own
prior (a correct posterior is calibrated: its self-assessed score matches the realised one).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from caasl_jax.baselines.posterior import history_rows
from caasl_jax.envs.core import History
from caasl_jax.envs.registry import make_env
from caasl_jax.reward import exact
from caasl_jax.reward.exact import (
    ExactPrior,
    exact_edge_posterior,
    exact_prior_problem,
    local_log_marginals,
    node_log_marginals,
    order_edge_posterior,
)
from caasl_jax.reward.pretrain import heldout_set
from caasl_jax.reward.reward import make_score_fn

PRIOR = ExactPrior(edge_prob=0.5, noise_concentration=10.0, noise_rate=1.0)


@pytest.fixture
def x64():
    """Float64 inside the test: the reference checks below hold to 1e-8 and tighter."""
    with jax.enable_x64(True):
        yield


def _local_f64(x, targets):
    """local_log_marginals of a history without padding, as numpy f64[d, 2^d]."""
    valid = np.ones(len(x), bool)
    return np.asarray(local_log_marginals(x, targets, valid, PRIOR))


@pytest.fixture(scope="module")
def small_history():
    """x f64[12, 4] with a linear child of nodes 0, 1; node 1 a target in two rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    x[:, 3] = 0.8 * x[:, 0] - 0.5 * x[:, 1] + 0.3 * rng.normal(size=12)
    targets = np.zeros((12, 4), bool)
    targets[[2, 5], 1] = True
    return x, targets


def _integrated_density(x, targets, j, parents):
    """log ∫ N(x_j; 0, σ² I + X_S X_S^T / |S|) InvGamma(σ²; 10, 1) dσ² by adaptive quadrature."""
    rows = x[~targets[:, j]]
    y, k = rows[:, j], len(parents)
    cov = rows[:, parents] @ rows[:, parents].T / k if k else 0.0

    def integrand(noise_var):
        density = stats.multivariate_normal(np.zeros(len(y)), noise_var * np.eye(len(y)) + cov)
        return density.pdf(y) * stats.invgamma(10.0, scale=1.0).pdf(noise_var)

    value, _ = integrate.quad(
        integrand, 1e-6, 50.0, points=[0.05, 0.1, 0.2, 0.5, 1.0], limit=500, epsabs=0, epsrel=1e-10
    )
    return math.log(value)


@pytest.mark.parametrize("j,parents", [(3, [0, 1]), (3, [0, 1, 2]), (1, [0]), (0, [1, 2, 3])])
def test_local_marginal_matches_numerical_integration(x64, small_history, j, parents):
    x, targets = small_history
    local = _local_f64(x, targets)
    mask = sum(1 << i for i in parents)
    assert local[j, mask] == pytest.approx(_integrated_density(x, targets, j, parents), abs=1e-8)
    assert np.isneginf(local[j, mask | (1 << j)])  # a node is never its own parent


@pytest.mark.parametrize("scale", [1.0, 1000.0])  # 1000: far above the prior's noise scale
def test_empty_parent_set_matches_student_t_closed_form(x64, small_history, scale):
    x, targets = small_history
    x = x * scale
    local = _local_f64(x, targets)
    for j in range(4):
        y = x[~targets[:, j], j]
        n, a, b = len(y), PRIOR.noise_concentration, PRIOR.noise_rate
        closed = (
            special.gammaln(a + n / 2) - special.gammaln(a) + a * math.log(b)
            - (a + n / 2) * math.log(b + y @ y / 2) - n / 2 * math.log(2 * math.pi)
        )  # fmt: skip
        assert local[j, 0] == pytest.approx(closed, abs=1e-9)


def _enumerated_posterior(local, edge_prob):
    """Edge marginals and log evidence by summing over every order and every graph."""
    d = local.shape[0]
    log_total, log_edge = -np.inf, np.full((d, d), -np.inf)
    for order in itertools.permutations(range(d)):
        pairs = [(order[a], order[b]) for a in range(d) for b in range(a + 1, d)]
        for chosen in itertools.product([False, True], repeat=len(pairs)):
            edges = [pair for pair, on in zip(pairs, chosen, strict=True) if on]
            log_joint = (
                -math.log(math.factorial(d))
                + len(edges) * math.log(edge_prob)
                + (len(pairs) - len(edges)) * math.log1p(-edge_prob)
                + sum(local[j, sum(1 << i for i, c in edges if c == j)] for j in range(d))
            )
            log_total = np.logaddexp(log_total, log_joint)
            for i, j in edges:
                log_edge[i, j] = np.logaddexp(log_edge[i, j], log_joint)
    return np.exp(log_edge - log_total), log_total


@pytest.mark.parametrize("edge_prob", [0.3, 0.8])
def test_sum_over_orders_matches_enumeration(x64, small_history, edge_prob):
    local = _local_f64(*small_history)
    probs, log_evidence = map(np.asarray, order_edge_posterior(local, edge_prob))
    expected, expected_evidence = _enumerated_posterior(local, edge_prob)
    np.testing.assert_allclose(probs, expected, atol=1e-12)
    assert log_evidence == pytest.approx(expected_evidence, abs=1e-10)
    assert 0.05 < probs.max() and probs.min() >= 0.0  # not a trivial table
    # arbitrary local tables too: the recursion must not depend on them being likelihoods
    arbitrary = np.random.default_rng(1).normal(size=local.shape) * 3
    arbitrary[np.isneginf(local)] = -np.inf
    np.testing.assert_allclose(
        np.asarray(order_edge_posterior(arbitrary, edge_prob)[0]),
        _enumerated_posterior(arbitrary, edge_prob)[0],
        atol=1e-12,
    )


def _weights_of_variance_one(node_log_marginals):
    """node_log_marginals with weights ~ N(0, I) instead of the env's N(0, I/k): scaling
    the Gram matrix by k and the cross products by sqrt(k) multiplies the prior's
    covariance X_S X_S^T / k by k."""

    def perturbed(gram, cross, sizes, sq, n, grid):
        k = jnp.maximum(sizes, 1.0)
        scaled_cross = cross * jnp.sqrt(k)[:, None]
        return node_log_marginals(gram * k[:, None, None], scaled_cross, sizes, sq, n, grid)

    return perturbed


def test_posterior_is_calibrated_on_draws_from_the_env_prior(monkeypatch):
    """On systems drawn from the env's prior, a correct posterior's self-assessed
    expected-correct score matches the realised one, and on the same systems it has a
    lower log loss than posteriors that get one part of the prior or the data wrong:
    weights of variance 1 instead of 1/|pa|, do-targets ignored, a wrong edge density."""
    env = make_env("linear-d5", edges_per_node=1.2, n0=15, budget=4)
    data, mask, graph = heldout_set(env, jax.random.key(0), 300)
    prior = ExactPrior.of_env(env)
    assert prior.edge_prob == pytest.approx(0.6)
    histories = [history_rows(History(data[b], mask[b].sum())) for b in range(len(graph))]
    g = np.asarray(graph, np.float64)
    off = ~np.eye(env.d, dtype=bool)

    def posteriors(p, ignore_targets=False):
        return np.stack([exact_edge_posterior(x, t & ~ignore_targets, p) for x, t in histories])

    def log_loss(q):  # f64[systems]
        q = np.clip(q[:, off], 1e-9, 1 - 1e-9)
        t = g[:, off]
        return -np.mean(t * np.log(q) + (1 - t) * np.log1p(-q), axis=1)

    def expected_correct(p, truth):
        return (truth * p + (1 - truth) * (1 - p)).sum((1, 2))

    q = posteriors(prior)
    gap = expected_correct(q, g) - expected_correct(q, q)
    assert abs(gap.mean()) < 3 * gap.std() / math.sqrt(len(gap))

    prior_mean = np.full_like(q, prior.edge_prob / 2) * off
    worse = {
        "edge density 0.15": posteriors(ExactPrior(0.15, 10.0, 1.0)),
        "do-targets ignored": posteriors(prior, ignore_targets=True),
        "no data (the prior's mean)": prior_mean,
    }
    monkeypatch.setattr(exact, "node_log_marginals", _weights_of_variance_one(node_log_marginals))
    jitted = exact._exact_edge_probs_jit
    jitted.clear_cache()  # retrace with the mutation...
    try:
        worse["weights of variance 1"] = posteriors(prior)
    finally:
        jitted.clear_cache()  # ...and never leave it cached for other tests
    for name, other in worse.items():
        extra = log_loss(other) - log_loss(q)  # paired: the same systems
        assert extra.mean() > 3 * extra.std() / math.sqrt(len(extra)), name


def test_recovers_a_strong_chain_from_interventional_data():
    rng = np.random.default_rng(3)
    n = 300
    x = np.zeros((3 * n, 3))
    targets = np.zeros((3 * n, 3), bool)
    for block, target in enumerate([None, 0, 1]):  # observational, do(x0), do(x1)
        rows = slice(block * n, (block + 1) * n)
        eps = 0.3 * rng.normal(size=(n, 3))
        x0 = rng.uniform(-1, 1, n) if target == 0 else eps[:, 0]
        x1 = rng.uniform(-1, 1, n) if target == 1 else 0.9 * x0 + eps[:, 1]
        x[rows] = np.stack([x0, x1, -0.8 * x1 + eps[:, 2]], 1)
        if target is not None:
            targets[rows, target] = True
    probs = exact_edge_posterior(x, targets, PRIOR)
    truth = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]], float)
    # the absent 0 -> 2 stays slightly plausible: the weight prior has mass near zero
    np.testing.assert_allclose(probs, truth, atol=0.1)
    assert probs[0, 1] > 0.999 and probs[1, 2] > 0.999
    assert probs[1, 0] < 1e-6 and probs[2, 1] < 1e-6 and probs[2, 0] < 1e-6


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("linear-ood-graph-d5", {}, "graph_kind='sf' is not supported"),
        ("linear-ood-shift-d5", {}, "intervention='shift' is not supported"),
        ("linear-ood-hetero-d5", {}, "heteroskedastic=True is not supported"),
        ("linear-d5", {"weight_mean": 0.1}, "weight_mean=0.1 is not supported"),
        ("linear-d15", {}, "d=15 is outside 2..14"),
        ("sergio-d5", {}, "needs a linear SCM env, got SergioEnv"),
    ],
)
def test_unsupported_envs_are_named(name, overrides, message):
    env = make_env(name, **overrides)
    assert message in exact_prior_problem(env)
    with pytest.raises(ValueError, match="exact posterior: " + message.split("(")[0]):
        ExactPrior.of_env(env)
    assert exact_prior_problem(make_env("linear-d10")) is None


def test_bad_histories_raise_named_errors():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="targets the same shape"):
        exact_edge_posterior(x, np.zeros((5, 2), bool), PRIOR)
    with pytest.raises(ValueError, match="d=1 is outside"):
        exact_edge_posterior(np.zeros((5, 1)), np.zeros((5, 1), bool), PRIOR)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        exact_edge_posterior(x, np.zeros((5, 3), bool), PRIOR)
    with pytest.raises(ValueError, match="edge_prob must lie in"):
        ExactPrior(1.0, 10.0, 1.0)


@pytest.fixture(scope="module")
def short_histories():
    """Six linear-d5 histories (n0 = 12 + 4 design rows) and their true graphs."""
    env = make_env("linear-d5", n0=12, budget=4)
    data, mask, graph = heldout_set(env, jax.random.key(1), 6)
    return env, np.asarray(data), np.asarray(mask), np.asarray(graph)


def test_float32_padded_batch_matches_the_float64_reference(short_histories):
    """The jitted float32 path on padded, vmapped histories (the trainer's) equals the
    float64 reference on the valid rows; what the padding holds does not matter."""
    env, data, mask, _ = short_histories
    prior = ExactPrior.of_env(env)
    lengths = np.array([16, 15, 13, 12, 14, 16])  # some rows turned into padding
    mask = np.arange(data.shape[1]) < lengths[:, None]
    garbage = np.random.default_rng(2).normal(size=data.shape) * 1e3
    garbage[1, -1, 0, 0] = np.nan  # a NaN in padding must not leak (0 * NaN = NaN)
    padded = np.where(mask[..., None, None], data, garbage).astype(np.float32)

    @jax.jit
    @jax.vmap
    def batch(d, m):
        return exact.exact_edge_probs(d[..., 0], d[..., 1] > 0.5, m, prior)

    probs = np.asarray(batch(padded, mask))
    assert probs.dtype == np.float32 and probs.shape == (6, 5, 5)
    for b, n in enumerate(lengths):
        x, targets = history_rows(History(data[b], n))
        reference = exact_edge_posterior(x, targets, prior)
        np.testing.assert_allclose(probs[b], reference, atol=1e-4)
    assert np.all(np.diag(probs[0]) == 0.0)


def test_exact_score_is_the_expected_correct_count_and_drives_the_env_reward(short_histories):
    env, data, mask, graph = short_histories
    prior = ExactPrior.of_env(env)
    score_fn = make_score_fn({}, prior, microbatch=2)  # dispatches on the ExactPrior
    scores = jax.jit(jax.vmap(lambda d, n, g: score_fn(History(d, n), g)))(data, mask.sum(1), graph)
    for b in range(len(graph)):
        p = exact_edge_posterior(*history_rows(History(data[b], mask[b].sum())), prior)
        expected = np.sum(graph[b] * p + (1 - graph[b]) * (1 - p))
        assert scores[b] == pytest.approx(expected, abs=1e-3)

    scored = env.with_score(score_fn)  # the reward is the score's improvement
    params = scored.sample_params(jax.random.key(3))
    _, state = scored.reset(jax.random.key(4), params)
    action = jnp.zeros(scored.action_dim).at[0].set(1.0)
    _, after, reward, _, _ = jax.jit(scored.step)(jax.random.key(5), state, action, params)
    assert float(reward) == pytest.approx(float(after.score - state.score), abs=1e-5)
    assert float(reward) != 0.0
    own = float(score_fn(state.history, params.graph))
    assert float(state.score) == pytest.approx(own, abs=1e-5)


def test_long_histories_get_a_finer_grid(x64):
    """The integrand narrows like 1/sqrt(n): a fixed 128-node grid was off by 0.74 nats
    at n = 10,000; the default grid grows with the rows and matches a very fine one."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10_000, 3))
    x[:, 2] = 0.7 * x[:, 0] + 0.3 * rng.normal(size=10_000)
    targets, valid = np.zeros(x.shape, bool), np.ones(len(x), bool)
    default = np.asarray(local_log_marginals(x, targets, valid, PRIOR))
    fine = np.asarray(local_log_marginals(x, targets, valid, PRIOR, points=8192))
    finite = np.isfinite(fine)
    np.testing.assert_allclose(default[finite], fine[finite], rtol=0, atol=1e-6)
    assert exact.grid_points(60, PRIOR) < 140 and exact.grid_points(10_000, PRIOR) > 1000
