"""Bootstrapped-GIES posterior over linear-Gaussian SCMs (REFERENCE.md section 6).

The likelihood-based baselines approximate p(G, θ | history) by a DAG bootstrap
(Friedman et al.; as DiffCBED suggests): for each of L particles,

1. resample the history's rows with replacement *within each group* of rows that
   share a target set (the observational rows are one group);
2. run GIES (PyPI `gies`, BIC score) on the resample and keep its I-essential graph;
3. draw one DAG of that I-essential graph (a consistent extension, found after a
   random relabelling of the nodes so that undirected edges get random orientations);
4. fit the linear-Gaussian mechanism of each node by least squares on its parents,
   over all resampled rows in which the node was not a target.

Particles carry uniform weights.

Single-sample interventional groups. CAASL records one sample per design step, so
most target sets occur once. The `gies` package's own score centres every
environment on its own mean, which turns a one-row environment into zeros and
discards it. CAASL's SCMs have zero bias, so here the score is the uncentred,
pooled Gaussian BIC: node k's local score uses the scatter matrix of every row in
which k was not a target, whatever group the row came from (`PooledGaussianBIC`).
The family of target sets is still passed to GIES, which needs it to search over
I-essential graphs.

The GIES part is plain numpy (it runs in worker processes); the particle
likelihood and simulation below are JAX and vectorised over particles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gies.scores.decomposable_score import DecomposableScore

from caasl_jax.envs.core import History
from caasl_jax.envs.linear import _nilpotent_inverse

INTERVENTIONS = ("do", "shift")
MIN_NOISE_VAR = 1e-4  # floor of a fitted noise variance (the prior's mean is ~0.11)


# ----------------------------------------------------------------------------------
# the particle set
# ----------------------------------------------------------------------------------


@struct.dataclass
class Particles:
    """L weighted-uniformly SCM particles.

    dag f32[L, d, d] (A[i, j] = 1: i -> j), weights f32[L, d, d] (zero off the dag),
    noise_var f32[L, d], essential f32[L, d, d] (the I-essential graph GIES returned:
    an undirected edge i - j has both entries set).
    """

    dag: jax.Array
    weights: jax.Array
    noise_var: jax.Array
    essential: jax.Array

    @property
    def n_particles(self) -> int:
        return self.dag.shape[-3]


def particles_from_numpy(fits: dict[str, np.ndarray]) -> Particles:
    """Particles (f32 jnp arrays) from the numpy dict `fit_posterior` returns."""
    return Particles(**{k: jnp.asarray(fits[k], jnp.float32) for k in Particles.__annotations__})


# ----------------------------------------------------------------------------------
# numpy side: history -> groups -> bootstrap -> GIES -> DAG -> least squares
# ----------------------------------------------------------------------------------


def history_rows(history: History) -> tuple[np.ndarray, np.ndarray]:
    """The valid rows of one (unbatched) history: values f64[n, d], targets bool[n, d]."""
    n = int(history.length)
    data = np.asarray(history.data[:n], np.float64)
    return data[..., 0], data[..., 1] > 0.5


def target_groups(targets: np.ndarray) -> dict[tuple[int, ...], np.ndarray]:
    """Row indices grouped by target set. targets bool[n, d] -> {(i, ...): int[n_g]}."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, mask in enumerate(targets):
        groups.setdefault(tuple(int(i) for i in np.flatnonzero(mask)), []).append(row)
    return {key: np.asarray(rows) for key, rows in groups.items()}


def bootstrap_rows(rng: np.random.Generator, groups: dict[tuple[int, ...], np.ndarray]):
    """Resample with replacement within every group; int[n] row indices (group order)."""
    return np.concatenate(
        [rng.choice(rows, size=len(rows), replace=True) for rows in groups.values()]
    )


class PooledGaussianBIC(DecomposableScore):
    """Uncentred Gaussian BIC pooled over every row where a node is not a target.

    local_score(k, pa) = -n_k/2 · (1 + log σ̂²_k|pa) - λ (|pa| + 1), λ = log(n)/2, with
    n_k the rows where k is not a target and σ̂² the residual variance of the
    no-intercept least-squares regression of x_k on x_pa over those rows.
    x f64[n, d], targets bool[n, d]; `interv` is the list of distinct target sets
    (the family GIES searches I-essential graphs for).
    """

    def __init__(self, x: np.ndarray, targets: np.ndarray, interv: list[list[int]]):
        super().__init__([], interv, cache=True)
        n, d = x.shape
        self.p = d
        free = ~np.asarray(targets, bool)  # [n, d]: row usable for node k
        self.n_free = free.sum(0).astype(np.float64)  # [d]
        if np.any(self.n_free == 0):
            raise ValueError("every node needs at least one row where it is not a target")
        # scatter[k] = sum over rows free for k of x x^T / n_k : [d, d, d]
        self.scatter = np.einsum("nk,ni,nj->kij", free, x, x) / self.n_free[:, None, None]
        self.lmbda = 0.5 * math.log(n)

    def regression(self, k: int, pa) -> tuple[np.ndarray, float]:
        """(weights f64[|pa|], residual variance) of x_k on x_pa over k's free rows."""
        pa = sorted(pa)
        s = self.scatter[k]
        if not pa:
            return np.zeros(0), max(float(s[k, k]), MIN_NOISE_VAR)
        s_pp = s[np.ix_(pa, pa)]
        ridge = 1e-10 * (np.trace(s_pp) / len(pa) + 1e-12)
        w = np.linalg.solve(s_pp + ridge * np.eye(len(pa)), s[pa, k])
        return w, max(float(s[k, k] - w @ s[pa, k]), MIN_NOISE_VAR)

    def _compute_local_score(self, k, pa):
        _, var = self.regression(k, pa)
        return -0.5 * self.n_free[k] * (1.0 + math.log(var)) - self.lmbda * (len(pa) + 1)

    def full_score(self, A) -> float:
        """Sum of local scores of the DAG A (A[i, j] != 0: i -> j)."""
        return sum(self.local_score(k, set(np.flatnonzero(A[:, k]))) for k in range(self.p))


def semi_directed_paths(fro: int, to: int, pdag: np.ndarray):
    """Every path fro -> ... -> to of distinct nodes whose edges are directed forward
    (i -> j) or undirected (i - j) in `pdag` (pdag[i, j] != 0: an edge leaves i), as
    lists of nodes, generated lazily.

    The same paths, by the same depth-first search, as `gies.utils.semi_directed_paths`
    (0.0.3), which GIES's turn operator iterates to test that each path meets a given
    node set (the insert operator, in `fast_forward_step`, tests reachability
    instead). That version rebuilds every node's successor set with 20 numpy calls per
    call and returns the full list; this one needs a few and lets the caller stop at
    the first path that violates the condition. It made a
    30-particle posterior fit 2.2-2.5x faster (`python -m benchmarks.baseline_runtime`,
    RESULTS_BASELINES.md); tests/test_baselines.py checks that GIES returns the same
    graphs with it.
    """
    successors = _pdag_sets(pdag)[0]
    stack = [(fro, [], list(successors[fro]))]
    while stack:
        node, before, to_visit = stack[-1]
        if node == to:
            yield before + [node]
            stack.pop()
        elif not to_visit:
            stack.pop()
        else:
            nxt = to_visit.pop()
            path = before + [node]
            stack.append((nxt, path, list(successors[nxt] - set(path))))


def _pdag_sets(pdag: np.ndarray):
    """Per-node Python sets of a PDAG (pdag[i, j] != 0: an edge leaves i):
    (successors, neighbours (undirected), adjacent (any edge), parents (directed in))."""
    nonzero = np.asarray(pdag) != 0
    successors = [set(np.flatnonzero(row).tolist()) for row in nonzero]
    predecessors = [set(np.flatnonzero(col).tolist()) for col in nonzero.T]
    neighbours = [s & p for s, p in zip(successors, predecessors)]
    adjacent = [s | p for s, p in zip(successors, predecessors)]
    parents = [p - s for s, p in zip(successors, predecessors)]
    return successors, neighbours, adjacent, parents


def _reaches(successors: list[set], fro: int, to: int, blocked: set) -> bool:
    """Whether `to` is reachable from `fro` along edges leaving nodes, through no node
    of `blocked` (i.e. some semi-directed path fro ... to misses `blocked`)."""
    seen, frontier = {fro}, [fro]
    while frontier:
        for nxt in successors[frontier.pop()] - seen:
            if nxt == to:
                return True
            if nxt not in blocked:
                seen.add(nxt)
                frontier.append(nxt)
    return False


def _valid_insert_operators(x, y, sets, cache) -> list[tuple]:
    """Every valid insert(x, y, T) operator with its score change, in the order of
    `gies.main.score_valid_insert_operators` (0.0.3): (score change, x, y, T int[|T|]).

    The same enumeration of the subsets T of T0 = ne(y) minus adj(x) (all 2^|T0| in
    the package's `cartesian` order, supersets of a T whose NA_yx ∪ T is no clique
    dropped, supersets of a T that passes the path condition marked passed), on Python
    sets instead of numpy calls on the adjacency matrix. The path condition "every
    semi-directed path y ... x meets NA_yx ∪ T" is tested as "x is unreachable from y
    around NA_yx ∪ T", which is the same statement. Assumes no self-loops (GIES never
    makes one).
    """
    successors, neighbours, adjacent, parents = sets
    t0 = sorted(neighbours[y] - adjacent[x])
    m = len(t0)
    na_yx = neighbours[y] & adjacent[x]
    # the package's cartesian order: the first element of T0 is the most significant bit
    queue = [[row, False] for row in range(2**m)]
    operators = []
    while queue:
        row, passed = queue.pop(0)
        members = [t0[c] for c in range(m) if row >> (m - 1 - c) & 1]
        na_yx_t = na_yx | set(members)
        clique = all(v in adjacent[u] for u in na_yx_t for v in na_yx_t if u != v)
        if not clique:
            queue = [entry for entry in queue if entry[0] & row != row]
        paths_blocked = passed or not _reaches(successors, y, x, na_yx_t)
        if paths_blocked:
            for entry in queue:
                if entry[0] & row == row:
                    entry[1] = True
        if clique and paths_blocked:
            aux = na_yx_t | parents[y]
            change = cache.local_score(y, aux | {x}) - cache.local_score(y, aux)
            operators.append((change, x, y, np.asarray(members, dtype=np.intp)))
    return operators


def fast_forward_step(A: np.ndarray, cache, debug: int = 0):
    """`gies.main.forward_step` (0.0.3) with `_valid_insert_operators`: scores every
    valid insert operator of the I-essential graph A and applies the best one (the
    first of equal scores, like the package). Returns (score change, new A).

    The package spends ~85% of a GIES run there, mostly in numpy calls on a d x d
    matrix for every candidate subset. Same operators, same scores (the same cached
    local scores), same choice: tests/test_baselines.py checks that GIES returns the
    same graphs.
    """
    from gies.main import insert

    sets = _pdag_sets(A)
    fro, to = np.where((A + A.T + np.eye(len(A))) == 0)
    operators = []
    for x, y in zip(fro, to):
        operators += _valid_insert_operators(x, y, sets, cache)
    if not operators:
        return 0, A
    score, x, y, T = operators[np.argmax([op[0] for op in operators])]
    return score, insert(x, y, T, A, cache.interv)


def use_fast_gies() -> None:
    """Make the `gies` package (0.0.3, the version pinned) use `semi_directed_paths`
    and `fast_forward_step`.

    Idempotent. Any other gies version keeps its own functions: its search code may
    expect something else.
    """
    import gies.main
    import gies.utils

    if _gies_version() == "0.0.3":
        gies.utils.semi_directed_paths = semi_directed_paths
        gies.main.forward_step = fast_forward_step


@functools.cache
def _gies_version() -> str:
    from importlib.metadata import version

    return version("gies")


def fit_gies(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, PooledGaussianBIC]:
    """GIES under the pooled BIC. Returns (I-essential graph f64[d, d], the score object)."""
    import gies

    use_fast_gies()
    interv = [list(key) for key in target_groups(targets)]
    if [] not in interv:
        interv.insert(0, [])
    score = PooledGaussianBIC(x, targets, interv)
    essential, _ = gies.fit(score, np.zeros((x.shape[1], x.shape[1])))
    return essential, score


def random_extension(rng: np.random.Generator, pdag: np.ndarray) -> np.ndarray:
    """One DAG consistent with the PDAG (same skeleton and v-structures; directed edges
    kept). The node labels are shuffled before `gies.utils.pdag_to_dag` so that its
    deterministic sink order does not always orient undirected edges the same way."""
    from gies.utils import pdag_to_dag

    perm = rng.permutation(pdag.shape[0])
    inverse = np.argsort(perm)
    dag = pdag_to_dag(np.asarray(pdag)[np.ix_(perm, perm)])
    return np.asarray(dag)[np.ix_(inverse, inverse)]


def fit_mechanisms(score: PooledGaussianBIC, dag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights f64[d, d] and noise variances f64[d] of `dag`'s nodes."""
    d = dag.shape[0]
    weights, noise_var = np.zeros((d, d)), np.zeros(d)
    for k in range(d):
        pa = np.flatnonzero(dag[:, k])
        w, noise_var[k] = score.regression(k, pa)
        weights[pa, k] = w
    return weights, noise_var


def fit_particle(rng: np.random.Generator, x: np.ndarray, targets: np.ndarray):
    """One bootstrap particle: (dag, weights, noise_var, essential), numpy."""
    rows = bootstrap_rows(rng, target_groups(targets))
    essential, score = fit_gies(x[rows], targets[rows])
    dag = random_extension(rng, essential)
    weights, noise_var = fit_mechanisms(score, dag)
    return dag, weights, noise_var, essential


def fit_posterior(
    x: np.ndarray, targets: np.ndarray, n_particles: int = 30, seed: int = 0
) -> dict[str, np.ndarray]:
    """L bootstrap particles of one history (numpy; safe to run in a worker process).

    x f64[n, d], targets bool[n, d]. Returns {"dag", "weights", "essential": f32[L, d, d],
    "noise_var": f32[L, d]}.
    """
    x = np.asarray(x, np.float64)
    targets = np.asarray(targets, bool)
    fits = [
        fit_particle(np.random.default_rng(s), x, targets)
        for s in np.random.SeedSequence(seed).spawn(n_particles)
    ]
    names = ("dag", "weights", "noise_var", "essential")
    return {name: np.stack([f[i] for f in fits]).astype(np.float32) for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------
# JAX side: particle likelihoods and simulation
# ----------------------------------------------------------------------------------


def _check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; choose one of {INTERVENTIONS}")


def node_log_densities(
    weights: jax.Array,
    noise_var: jax.Array,
    x: jax.Array,
    targets: jax.Array,
    values: jax.Array,
    intervention: str = "do",
) -> jax.Array:
    """log N(x_j; (x W)_j [+ shift_j], σ_j²) of every node: f32[n, d].

    One particle: weights f32[d, d], noise_var f32[d]; data x f32[n, d], targets and
    values f32[n, d] (values only enter under shift interventions).
    """
    _check_intervention(intervention)
    mean = x @ weights
    if intervention == "shift":
        mean = mean + targets * values
    return -0.5 * (jnp.log(2.0 * jnp.pi * noise_var) + (x - mean) ** 2 / noise_var)


def log_likelihood(
    particles: Particles,
    x: jax.Array,
    targets: jax.Array,
    values: jax.Array | None = None,
    intervention: str = "do",
) -> jax.Array:
    """Per-row log-likelihood f32[L, n] of data x f32[n, d] under every particle.

    do: the sum over non-target nodes (a do-target's value is not modelled);
    shift: the sum over all nodes, the target's mean moved by its shift value.
    targets f32[n, d] 0/1 (may be relaxed in [0, 1] for gradients); values f32[n, d].
    """
    values = jnp.zeros_like(x) if values is None else values

    def one(weights, noise_var):
        lp = node_log_densities(weights, noise_var, x, targets, values, intervention)
        return jnp.sum(lp * (1.0 - targets), -1) if intervention == "do" else jnp.sum(lp, -1)

    return jax.vmap(one)(particles.weights, particles.noise_var)


def design_log_likelihood(
    particles: Particles,
    x: jax.Array,
    targets: jax.Array,
    values: jax.Array,
    intervention: str = "do",
) -> jax.Array:
    """`log_likelihood` of rows x f32[n, d] that all share one design (targets, values
    f32[d]): f32[L, n], as one matrix product.

    A node's residual is r = x̃ B with x̃ = [x, 1] and B = [[I - W], [-shift]], so the
    weighted square sum is Σ_i r_i² / σ_i² = x̃ᵀ Q x̃ with Q = B P Bᵀ, P = diag(modelled_i
    / σ_i²): one [n, (d+1)(d+2)/2] x [., L] product over the upper triangle of the
    symmetric Q instead of an [L, n, d] residual tensor. DiffCBED's EIG evaluates it 32
    times per epoch; with it one DiffCBED design took 3.0 s instead of 4.4 s (the
    whole 100-epoch optimisation; an ad hoc A/B under load, see
    benchmarks/RESULTS_BASELINES.md). The expanded form
    loses precision when a residual is small next to x: in float32 the error grows like
    1e-7 · |x̃|² / σ², e.g. ~2e-4 nats per row at σ² = 0.1 (the prior's noise level)
    but ~0.2 at the floor σ² = MIN_NOISE_VAR with |x| ~ 8, where the per-row form errs
    by 1e-4. Such particles' likelihoods differ from the others' by far more than that,
    and the EIG is a Monte-Carlo estimate; `log_likelihood` stays the exact reference.
    """
    _check_intervention(intervention)
    d = x.shape[-1]
    modelled = 1.0 - targets if intervention == "do" else jnp.ones_like(targets)
    shift = targets * values if intervention == "shift" else jnp.zeros_like(targets)
    precision = modelled / particles.noise_var  # [L, d]
    const = -0.5 * jnp.sum(modelled * jnp.log(2.0 * jnp.pi * particles.noise_var), -1)  # [L]
    resid_map = jnp.concatenate(
        [jnp.eye(d) - particles.weights, jnp.broadcast_to(-shift, (particles.n_particles, 1, d))],
        axis=1,
    )  # [L, d+1, d]
    quad = jnp.einsum("lai,li,lbi->lab", resid_map, precision, resid_map)  # [L, d+1, d+1]
    rows, cols = np.triu_indices(d + 1)
    quad_upper = quad[:, rows, cols] * np.where(rows == cols, 1.0, 2.0).astype(np.float32)
    xt = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], -1)  # [n, d+1]
    return const[:, None] - 0.5 * (quad_upper @ (xt[:, rows] * xt[:, cols]).T)


def simulate_particle(
    weights: jax.Array,
    noise_var: jax.Array,
    eps: jax.Array,
    targets: jax.Array,
    values: jax.Array,
    intervention: str = "do",
) -> jax.Array:
    """Samples f32[n, d] of one particle under one design, from standard normals eps f32[n, d].

    targets f32[d] (0/1, or straight-through relaxed), values f32[d]. A do cuts the
    target's incoming edges and sets it to its value; a shift adds the value to the
    target's structural equation. x = c (I - W')^-1 with c the exogenous term.
    """
    _check_intervention(intervention)
    noise = jnp.sqrt(noise_var) * eps
    if intervention == "do":
        weights = weights * (1.0 - targets)[None, :]
        exogenous = targets * values + (1.0 - targets) * noise
    else:
        exogenous = noise + targets * values
    return exogenous @ _nilpotent_inverse(weights)


def simulate(
    particles: Particles,
    key: jax.Array,
    targets: jax.Array,
    values: jax.Array,
    n: int,
    intervention: str = "do",
) -> jax.Array:
    """n samples from every particle under one design: f32[L, n, d]."""
    eps = jax.random.normal(key, (particles.n_particles, n, particles.dag.shape[-1]))
    return jax.vmap(lambda w, v, e: simulate_particle(w, v, e, targets, values, intervention))(
        particles.weights, particles.noise_var, eps
    )
