"""The exact edge posterior of the linear-Gaussian Erdős–Rényi prior, for d up to ~14.

The linear envs draw a system as: a uniformly random node order; every ordered pair an
edge with probability p; the weights into node j ~ N(0, 1/|pa_j|); noise variance
σ_j² ~ InvGamma(a, b); zero bias; do-interventions. That prior is *order-modular*: given
the order, each node's parent set is an independent choice among its predecessors, and
the likelihood factorises per node. So the posterior marginal p(i -> j | history) is an
exact sum over all orders and graphs, computed by dynamic programming over node subsets
(Friedman & Koller 2003; Koivisto & Sood 2004): d · 2^(d-1) local marginal likelihoods,
then O(d² 2^d) log-sum-exps. About 0.1 s per d = 10 history on one core.

What it is for: it is the Bayes-optimal answer to the reward model's task. A model
trained with BCE on the prior converges to it, so its expected-correct score is what a
perfectly trained reward model would get; thresholded at 0.5 it maximises the expected
number of correct adjacency entries over every possible predictor (section "Expected
correct" of experiments/reward_reference.py). Plain numpy in float64: a reference, not
a training-time component.

    probs = exact_edge_posterior(x, targets, ExactPrior.of_env(env))   # f64[d, d]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caasl_jax.envs.graphs import erdos_renyi_edge_prob

MAX_D = 14  # 14 · 2^13 local scores and 2^14-entry tables: about 5 s per history
GRID_HALF_WIDTH = 12.0  # log σ² range around the prior's mode, in nats
GRID_STEPS_PER_WIDTH = 2.0  # quadrature nodes per standard deviation of the integrand
GRID_PEAK_MARGIN = 10.0  # integrand widths kept beyond the likelihood's peak


@dataclass(frozen=True)
class ExactPrior:
    """The prior the posterior is exact for: ER edge probability, InvGamma(a, b) noise."""

    edge_prob: float
    noise_concentration: float
    noise_rate: float

    def __post_init__(self):
        if not 0.0 < self.edge_prob < 1.0:
            raise ValueError(f"edge_prob must lie in (0, 1), got {self.edge_prob}")
        if self.noise_concentration <= 0 or self.noise_rate <= 0:
            raise ValueError("noise_concentration and noise_rate must be positive")

    @classmethod
    def of_env(cls, env) -> ExactPrior:
        """The prior of a linear env; ValueError naming what this posterior cannot handle."""
        problem = exact_prior_problem(env)
        if problem:
            raise ValueError(f"exact posterior: {problem}")
        return cls(
            erdos_renyi_edge_prob(env.d, env.edges_per_node),
            env.noise_concentration,
            env.noise_rate,
        )


def exact_prior_problem(env) -> str | None:
    """Why the exact posterior does not apply to `env` (None: it does)."""
    from caasl_jax.envs.linear import LinearSCMEnv

    if not isinstance(env, LinearSCMEnv):
        return f"needs a linear SCM env, got {type(env).__name__}"
    unsupported = {
        "graph_kind": (env.graph_kind, "er"),
        "noise": (env.noise, "gaussian"),
        "intervention": (env.intervention, "do"),
        "weight_mean": (env.weight_mean, 0.0),
        "heteroskedastic": (env.heteroskedastic, False),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            return f"{name}={value!r} is not supported (only {needed!r})"
    if not 2 <= env.d <= MAX_D:
        return f"d={env.d} is outside 2..{MAX_D} (the sum over node subsets is 2^d)"
    return None


# ------------------------------------------------------------------- local scores
def log_noise_grid(concentration: float, rate: float, n: int, max_mean_square: float = 0.0):
    """Quadrature over σ² ~ InvGamma(a, b) in u = log σ²: (u f64[Q], log weights f64[Q])
    with  E[f(σ²)] ≈ Σ_q exp(w_q) f(exp(u_q))  (trapezoid rule on the prior's density in u).

    For f a Gaussian likelihood of n rows with mean square s, prior times f is a bump of
    width about 1 / sqrt(n/2 + a) in u, peaked between log(b / (n/2 + a)) (a perfect fit)
    and log((n s / 2 + b) / (n/2 + a)) (no parents); with 2 nodes per width the trapezoid
    rule's relative error is about 1e-34 for a Gaussian bump (it converges exponentially
    on smooth peaks). The grid spans GRID_HALF_WIDTH nats of u around the prior's mode,
    widened where needed to GRID_PEAK_MARGIN widths beyond both peak ends (the integrand
    has fallen by > 20 nats there), so data far outside the prior's scale
    (`max_mean_square`, the largest per-node mean square) is not cut off. Q = 305 at
    n = 60 on the prior's own scale.
    """
    mode = math.log(rate / (concentration + 1.0))
    shape = n / 2 + concentration
    width = 1.0 / math.sqrt(shape)
    peak_low = math.log(rate / shape)
    peak_high = math.log((n * max_mean_square / 2 + rate) / shape)
    low = min(mode - GRID_HALF_WIDTH, peak_low - GRID_PEAK_MARGIN * width)
    high = max(mode + GRID_HALF_WIDTH, peak_high + GRID_PEAK_MARGIN * width)
    spacing = width / GRID_STEPS_PER_WIDTH
    points = max(64, math.ceil((high - low) / spacing) + 1)
    u = np.linspace(low, high, points)
    log_density = (
        concentration * math.log(rate)
        - math.lgamma(concentration)
        - concentration * u
        - rate * np.exp(-u)
    )
    return u, log_density + math.log(u[1] - u[0])


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def node_log_marginals(gram: np.ndarray, cross: np.ndarray, sq: float, n: int, grid) -> np.ndarray:
    """log p(x_j | X_S, S) for parent sets S given as the rows of `gram`.

    gram f64[m, k, k] = X_S^T X_S, cross f64[m, k] = X_S^T x_j, sq = x_j^T x_j, n rows.
    Weights ~ N(0, I/k) are integrated analytically (x_j ~ N(0, σ² I + X_S X_S^T / k)),
    σ² numerically on `grid`. Returns f64[m].
    """
    u, log_w = grid
    k = gram.shape[-1]
    noise_var = np.exp(u)  # [Q]
    const = -0.5 * n * (math.log(2 * math.pi) + u)  # [Q]
    if k == 0:
        ll = const - 0.5 * sq / noise_var
        return np.broadcast_to(_logsumexp(log_w + ll, axis=-1), gram.shape[:1]).copy()
    prior_var = 1.0 / k
    eigval, eigvec = np.linalg.eigh(gram)  # [m, k], [m, k, k]
    eigval = np.maximum(eigval, 0.0) * prior_var
    proj = np.einsum("mkl,mk->ml", eigvec, cross) ** 2 * prior_var  # [m, k]
    spread = eigval[:, None, :] + noise_var[None, :, None]  # [m, Q, k]
    log_det = np.sum(np.log(spread / noise_var[None, :, None]), axis=-1)  # [m, Q]
    quad = (sq - np.sum(proj[:, None, :] / spread, axis=-1)) / noise_var  # [m, Q]
    return _logsumexp(log_w + const - 0.5 * (log_det + quad), axis=-1)


def local_log_marginals(x: np.ndarray, targets: np.ndarray, prior: ExactPrior) -> np.ndarray:
    """f64[d, 2^d]: entry [j, S] = log p(x_j on the rows where j is not a target | parents
    S), S a bitmask of nodes; -inf where S contains j.

    x f64[n, d] values, targets bool[n, d] (True: the node was intervened on in that row).
    """
    n, d = x.shape
    max_mean_square = float(np.max(np.mean(x**2, axis=0)))
    grid = log_noise_grid(prior.noise_concentration, prior.noise_rate, n, max_mean_square)
    masks = np.arange(1 << d)
    bits = (masks[:, None] >> np.arange(d)) & 1  # [M, d]
    sizes = bits.sum(1)
    out = np.full((d, 1 << d), -np.inf)
    for j in range(d):
        rows = x[~targets[:, j]]
        gram, cross, sq = rows.T @ rows, rows.T @ rows[:, j], float(rows[:, j] @ rows[:, j])
        for k in range(d):
            chosen = masks[(sizes == k) & (bits[:, j] == 0)]
            members = np.nonzero(bits[chosen])[1].reshape(len(chosen), k)
            out[j, chosen] = node_log_marginals(
                gram[members[:, :, None], members[:, None, :]],
                cross[members],
                sq,
                len(rows),
                grid,
            )
    return out


# ----------------------------------------------------------- sum over orders and graphs
def _subset_logsumexp(a: np.ndarray) -> np.ndarray:
    """Zeta transform in log space: out[..., U] = log Σ_{S ⊆ U} exp(a[..., S])."""
    d = int(a.shape[-1]).bit_length() - 1
    masks = np.arange(a.shape[-1])
    out = a.copy()
    for bit in range(d):
        has = (masks >> bit) & 1 == 1
        out[..., has] = np.logaddexp(out[..., has], out[..., masks[has] ^ (1 << bit)])
    return out


def _log_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(exp(a) - exp(b)) for b <= a (-inf where they are equal)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a + np.log1p(-np.exp(b - a))
    return np.where(np.isfinite(a) & (b < a), out, -np.inf)


def order_edge_posterior(local: np.ndarray, edge_prob: float) -> tuple[np.ndarray, float]:
    """Edge marginals f64[d, d] (entry [i, j] = p(i -> j | data)) and log p(data), from
    local log marginals f64[d, 2^d] under the order-modular ER prior."""
    d = local.shape[0]
    full = (1 << d) - 1
    masks = np.arange(1 << d)
    bits = (masks[:, None] >> np.arange(d)) & 1  # [M, d]
    sizes = bits.sum(1)
    log_p, log_q = math.log(edge_prob), math.log1p(-edge_prob)
    # alpha[j, U] = log Σ_{S ⊆ U} p^|S| (1-p)^(|U|-|S|) p(x_j | S), for U not containing j
    subset_sum = _subset_logsumexp(local + sizes * (log_p - log_q))
    alpha = subset_sum + sizes * log_q
    alpha[bits.T == 1] = -np.inf

    # forward[U]: sum over orders of U placed first; backward[U]: over orders of the rest
    forward = np.full(1 << d, -np.inf)
    backward = np.full(1 << d, -np.inf)
    forward[0], backward[full] = 0.0, 0.0
    by_size = [masks[sizes == k] for k in range(d + 1)]
    for k in range(1, d + 1):
        level = by_size[k]
        before = level[:, None] ^ (1 << np.arange(d))  # [m, d]: U without j
        terms = np.where(bits[level] == 1, forward[before] + alpha.T[before, np.arange(d)], -np.inf)
        forward[level] = _logsumexp(terms, axis=1)
    for k in range(d - 1, -1, -1):
        level = by_size[k]
        after = level[:, None] | (1 << np.arange(d))  # [m, d]: U with j
        terms = np.where(bits[level] == 0, alpha.T[level] + backward[after], -np.inf)
        backward[level] = _logsumexp(terms, axis=1)
    log_evidence = forward[full] - math.lgamma(d + 1)  # orders are uniform: 1/d! each

    probs = np.zeros((d, d))
    for j in range(d):
        free = masks[bits[:, j] == 0]  # predecessor sets U of j
        placed = forward[free] + backward[free | (1 << j)] - forward[full]  # [m]
        without = free[:, None] & ~(1 << np.arange(d))  # [m, d]: U without i
        # Σ over parent sets S ⊆ U that contain i = (all S ⊆ U) - (all S ⊆ U \ i)
        with_i = _log_minus(subset_sum[j, free][:, None], subset_sum[j, without])
        log_terms = placed[:, None] + sizes[free][:, None] * log_q + with_i
        log_terms = np.where(bits[free] == 1, log_terms, -np.inf)
        probs[:, j] = np.exp(_logsumexp(log_terms, axis=0))
    probs = np.clip(probs, 0.0, 1.0)  # rounding can exceed 1 by an ulp
    return probs, float(log_evidence)


def exact_edge_posterior(x: np.ndarray, targets: np.ndarray, prior: ExactPrior) -> np.ndarray:
    """p(i -> j | history) f64[d, d] of one history: values x f[n, d], targets bool[n, d]
    (do-targets of each row; the valid rows only, as `posterior.history_rows` gives)."""
    x = np.asarray(x, np.float64)
    targets = np.asarray(targets, bool)
    if x.ndim != 2 or targets.shape != x.shape:
        raise ValueError(
            f"x must be [n, d] and targets the same shape, got {x.shape}, {targets.shape}"
        )
    if not 2 <= x.shape[1] <= MAX_D:
        raise ValueError(f"exact posterior: d={x.shape[1]} is outside 2..{MAX_D}")
    if not np.all(np.isfinite(x)):
        raise ValueError("exact posterior: the history has non-finite values")
    probs, _ = order_edge_posterior(local_log_marginals(x, targets, prior), prior.edge_prob)
    return probs
