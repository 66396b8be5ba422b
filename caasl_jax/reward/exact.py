"""The exact edge posterior of the linear-Gaussian Erdős–Rényi prior, jittable.

The linear envs draw a system as: a uniformly random node order; every ordered pair an
edge with probability p; the weights into node j ~ N(0, 1/|pa_j|); noise variance
σ_j² ~ InvGamma(a, b); zero bias; do-interventions. That prior is *order-modular*: given
the order, each node's parent set is an independent choice among its predecessors, and
the likelihood factorises per node. So the posterior marginal p(i -> j | history) is an
exact sum over all orders and graphs, computed by dynamic programming over node subsets
(Friedman & Koller 2003; Koivisto & Sood 2004): d · 2^(d-1) local marginal likelihoods,
then O(d² 2^d) log-sum-exps.

What it is for:
- the Bayes-optimal answer to the reward model's task. A model trained with BCE on the
  prior converges to it, so its expected-correct score is what a perfectly trained
  reward model would get (experiments/reward_reference.py);
- an oracle reward for CAASL on the linear envs (`reward_model: exact`; in code
  `make_score_fn({}, ExactPrior.of_env(env))`): the reward without a reward model's
  errors, jittable and vmappable like the AVICI score.

Everything is fixed-shape in the padded history, so it jits, vmaps and runs inside the
trainer's fused step. It computes in the dtype of its input: float32 in the trainer,
float64 for the reference (`exact_edge_posterior`, under `jax.enable_x64`).

    probs = exact_edge_probs(values, targets, valid, ExactPrior.of_env(env))  # [d, d]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from caasl_jax.envs.graphs import erdos_renyi_edge_prob

MAX_D = 14  # 14 · 2^13 local scores and 2^14-entry tables
GRID_POINTS = 128  # fewest quadrature nodes over log σ² per node (see grid_points)
GRID_PEAK_RANGE = 17.0  # nats of peak range the grid resolves at one node per width
GRID_PEAK_MARGIN = 10.0  # integrand widths kept beyond the likelihood's peak range


@dataclasses.dataclass(frozen=True)
class ExactPrior:
    """The prior the posterior is exact for: ER edge probability, InvGamma(a, b) noise.

    Hashable, so it can be a static argument of a jitted function.
    """

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
            float(erdos_renyi_edge_prob(env.d, env.edges_per_node)),
            float(env.noise_concentration),
            float(env.noise_rate),
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


# ------------------------------------------------------------------- subset tables
@functools.cache
def _subsets(d: int):
    """Static index tables over the 2^d node subsets (bitmasks), built once per d.

    bits i32[M, d] (bit i of mask U), sizes i32[M], free i32[d, M/2] (the masks without
    node j, ascending), by_size: tuple of i32[·] (the masks of each size 0..d).
    """
    masks = np.arange(1 << d, dtype=np.int32)
    bits = (masks[:, None] >> np.arange(d, dtype=np.int32)) & 1
    sizes = bits.sum(1)
    free = np.stack([masks[bits[:, j] == 0] for j in range(d)])
    by_size = tuple(masks[sizes == k] for k in range(d + 1))
    return bits, sizes, free, by_size


# ------------------------------------------------------------------- local scores
def grid_points(n_rows: int, prior: ExactPrior) -> int:
    """Quadrature nodes for histories of up to n_rows rows (static): at least one per
    integrand width 1/sqrt(n/2 + a) over GRID_PEAK_RANGE nats plus the margins, so long
    histories get a finer grid (129 nodes at n = 60, ~680 at n = 3,000)."""
    per_nat = math.sqrt(n_rows / 2 + prior.noise_concentration)
    return max(GRID_POINTS, math.ceil(GRID_PEAK_RANGE * per_nat + 2 * GRID_PEAK_MARGIN) + 1)


def log_noise_grid(prior: ExactPrior, n: jax.Array, sq: jax.Array, points: int = GRID_POINTS):
    """Quadrature over σ² ~ InvGamma(a, b) in u = log σ² for one node's likelihood:
    (u f[Q], log weights f[Q]) with  E[f(σ²)] ≈ Σ_q exp(w_q) f(exp(u_q)).

    n: the node's row count, sq: its sum of squares (traced scalars). Prior times a
    Gaussian likelihood of n rows is a bump of width about 1 / sqrt(n/2 + a) in u,
    peaked between log(b / (n/2 + a)) (a perfect fit by the parents) and
    log((sq/2 + b) / (n/2 + a)) (no parents). The grid spans that range plus
    GRID_PEAK_MARGIN widths on each side (the integrand has fallen by > 20 nats
    there). With `grid_points(n)` nodes the spacing stays below one width while the
    peak range is under GRID_PEAK_RANGE nats (values with mean square up to ~1e6 at
    any n). There the trapezoid rule's relative error on a Gaussian bump is at most
    about 2 exp(-2π²) ≈ 5e-9; beyond, it grows smoothly (~1% at two widths per node).
    Float32 (the trainer's dtype) loses the residual sq - shrunk for large values:
    within 1e-4 of float64 for values up to ~20x the linear envs' scale, not beyond;
    use float64 (jax.enable_x64) for such data.
    """
    a, b = prior.noise_concentration, prior.noise_rate
    shape = n / 2 + a
    width = jax.lax.rsqrt(shape)
    low = jnp.log(b / shape) - GRID_PEAK_MARGIN * width
    high = jnp.log((sq / 2 + b) / shape) + GRID_PEAK_MARGIN * width
    steps = jnp.linspace(0.0, 1.0, points, dtype=jnp.result_type(sq))
    u = low + (high - low) * steps
    log_density = a * math.log(b) - math.lgamma(a) - a * u - b * jnp.exp(-u)
    return u, log_density + jnp.log((high - low) / (points - 1))


def node_log_marginals(gram, cross, sizes, sq, n, grid) -> jax.Array:
    """log p(x_j | X_S, S) for parent sets S, each given by its masked statistics.

    gram f[m, d, d] = X_S^T X_S (zero outside S × S), cross f[m, d] = X_S^T x_j (zero
    outside S), sizes f[m] = |S|, sq = x_j^T x_j and n rows (scalars), grid from
    log_noise_grid. Weights ~ N(0, I/|S|) are integrated analytically
    (x_j ~ N(0, σ² I + X_S X_S^T / |S|)), σ² numerically on the grid. Returns f[m].
    The zero rows and columns outside S add eigenvalues 0 with projections 0, which
    contribute nothing, so every parent set shares one shape.
    """
    u, log_w = grid
    prior_var = 1.0 / jnp.maximum(sizes, 1.0)  # [m]
    eigval, eigvec = jnp.linalg.eigh(gram)  # [m, d], [m, d, d]
    eigval = jnp.maximum(eigval, 0.0) * prior_var[:, None]
    proj = jnp.einsum("mkl,mk->ml", eigvec, cross) ** 2 * prior_var[:, None]  # [m, d]
    noise_var = jnp.exp(u)  # [Q]
    ratio = eigval[:, None, :] / noise_var[None, :, None]  # [m, Q, d]
    log_det = jnp.sum(jnp.log1p(ratio), axis=-1)  # log det(I + X_S X_S^T / (|S| σ²))
    shrunk = jnp.sum(proj[:, None, :] / (eigval[:, None, :] + noise_var[None, :, None]), -1)
    quad = jnp.maximum(sq - shrunk, 0.0) / noise_var  # x_j^T (σ² I + X_S X_S^T / |S|)^-1 x_j
    const = -0.5 * n * (math.log(2 * math.pi) + u)  # [Q]
    return jax.nn.logsumexp(log_w + const - 0.5 * (log_det + quad), axis=-1)


def local_log_marginals(values, targets, valid, prior: ExactPrior, points: int | None = None):
    """f[d, 2^d]: entry [j, S] = log p(x_j on the rows where j is not a target | parents
    S), S a bitmask of nodes; -inf where S contains j.

    values f[N, d], targets bool[N, d] (True: the node was intervened on in that row),
    valid bool[N] (False: a padding row, ignored).
    """
    d = values.shape[-1]
    bits, sizes, free, _ = _subsets(d)
    dtype = values.dtype
    points = points or grid_points(values.shape[0], prior)
    values = jnp.where(valid[:, None], values, 0.0)  # padding may hold anything, NaN too
    rows_of = (valid[:, None] & ~targets).astype(dtype)  # [N, d]: node j's rows
    gram = jnp.einsum("nj,na,nb->jab", rows_of, values, values)  # [d, d, d]
    n = rows_of.sum(0)  # [d]
    sq = gram[jnp.arange(d), jnp.arange(d), jnp.arange(d)]  # [d]

    chosen = jnp.asarray(bits[free], dtype)  # [d, m, d]: the parent sets of each node
    nodes = np.arange(d, dtype=np.int32)

    def one_node(gram_j, chosen_j, sizes_j, n_j, sq_j, cross_j):
        grid = log_noise_grid(prior, n_j, sq_j, points)
        pair = chosen_j[:, :, None] * chosen_j[:, None, :]
        return node_log_marginals(gram_j * pair, cross_j * chosen_j, sizes_j, sq_j, n_j, grid)

    cross = gram[nodes, :, nodes]  # [d, d]: row j = X^T x_j on node j's rows
    sizes_free = jnp.asarray(sizes[free], dtype)
    scores = jax.vmap(one_node)(gram, chosen, sizes_free, n, sq, cross)  # [d, m]
    return jnp.full((d, 1 << d), -jnp.inf, dtype).at[nodes[:, None], free].set(scores)


# ----------------------------------------------------------- sum over orders and graphs
def _subset_logsumexp(a: jax.Array) -> jax.Array:
    """Zeta transform in log space: out[..., U] = log Σ_{S ⊆ U} exp(a[..., S])."""
    d = int(a.shape[-1]).bit_length() - 1
    masks = np.arange(a.shape[-1])
    for bit in range(d):
        has = (masks >> bit) & 1 == 1
        a = jnp.where(has, jnp.logaddexp(a, a[..., masks ^ (1 << bit)]), a)
    return a


def _log_minus(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(exp(a) - exp(b)) for b <= a (-inf where they are equal)."""
    keep = jnp.isfinite(a) & (b < a)
    safe_b = jnp.where(keep, b, a - 1.0)
    return jnp.where(keep, a + jnp.log1p(-jnp.exp(safe_b - a)), -jnp.inf)


def order_edge_posterior(local: jax.Array, edge_prob: float) -> tuple[jax.Array, jax.Array]:
    """Edge marginals f[d, d] (entry [i, j] = p(i -> j | data)) and log p(data) f[], from
    local log marginals f[d, 2^d] under the order-modular ER prior."""
    d = local.shape[0]
    bits, sizes, free, by_size = _subsets(d)
    full = (1 << d) - 1
    nodes = np.arange(d, dtype=np.int32)
    log_p, log_q = math.log(edge_prob), math.log1p(-edge_prob)
    # alpha[j, U] = log Σ_{S ⊆ U} p^|S| (1-p)^(|U|-|S|) p(x_j | S), for U not containing j
    size_log_q = jnp.asarray(sizes * log_q, local.dtype)
    subset_sum = _subset_logsumexp(local + jnp.asarray(sizes * (log_p - log_q), local.dtype))
    alpha = jnp.where(bits.T == 1, -jnp.inf, subset_sum + size_log_q)  # [d, M]

    # forward[U]: sum over orders of U placed first; backward[U]: over orders of the rest
    forward = jnp.full(1 << d, -jnp.inf, local.dtype).at[0].set(0.0)
    backward = jnp.full(1 << d, -jnp.inf, local.dtype).at[full].set(0.0)
    for k in range(1, d + 1):
        level = by_size[k]
        before = level[:, None] ^ (1 << nodes)  # [m, d]: U without j
        terms = jnp.where(bits[level] == 1, forward[before] + alpha.T[before, nodes], -jnp.inf)
        forward = forward.at[level].set(jax.nn.logsumexp(terms, axis=1))
    for k in range(d - 1, -1, -1):
        level = by_size[k]
        after = level[:, None] | (1 << nodes)  # [m, d]: U with j
        terms = jnp.where(bits[level] == 0, alpha.T[level] + backward[after], -jnp.inf)
        backward = backward.at[level].set(jax.nn.logsumexp(terms, axis=1))
    log_evidence = forward[full] - math.lgamma(d + 1)  # orders are uniform: 1/d! each

    # p(i -> j) = Σ over predecessor sets U of j (with i in U) of p(U precedes j) times
    # the share of j's parent sets S ⊆ U that contain i: (all S ⊆ U) - (all S ⊆ U \ i)
    placed = forward[free] + backward[free | (1 << nodes)[:, None]] - forward[full]  # [d, m]
    without = free[:, :, None] & ~(1 << nodes)  # [d(j), m, d(i)]: U without i
    own_sum = jnp.take_along_axis(subset_sum, free, axis=1)  # [d, m]
    without_sum = subset_sum[nodes[:, None, None], without]  # [d, m, d]
    with_i = _log_minus(own_sum[:, :, None], without_sum)
    log_terms = (placed + size_log_q[free])[:, :, None] + with_i
    log_terms = jnp.where(bits[free] == 1, log_terms, -jnp.inf)  # i must be in U
    probs = jnp.exp(jax.nn.logsumexp(log_terms, axis=1)).T  # [i, j]
    return jnp.clip(probs, 0.0, 1.0), log_evidence  # rounding can exceed 1 by an ulp


def exact_edge_probs(values, targets, valid, prior: ExactPrior, points: int | None = None):
    """p(i -> j | history) f[d, d] of one padded history: values f[N, d], targets
    bool[N, d] (do-targets of each row), valid bool[N]. Jittable (prior and points
    static; points default grid_points(N)) and vmappable; computes in values' dtype."""
    chex.assert_rank([values, targets, valid], [2, 2, 1])
    chex.assert_equal_shape([values, targets])
    local = local_log_marginals(values, targets, valid, prior, points)
    return order_edge_posterior(local, prior.edge_prob)[0]


_exact_edge_probs_jit = jax.jit(exact_edge_probs, static_argnames=("prior", "points"))


def exact_edge_posterior(x, targets, prior: ExactPrior) -> np.ndarray:
    """The float64 reference: p(i -> j | history) f64[d, d] of one history given by its
    valid rows only (values x f[n, d], targets bool[n, d], as `posterior.history_rows`
    gives). Bad shapes and non-finite values raise ValueError."""
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
    with jax.enable_x64(True):
        valid = np.ones(x.shape[0], bool)
        return np.asarray(_exact_edge_probs_jit(x, targets, valid, prior), np.float64)
