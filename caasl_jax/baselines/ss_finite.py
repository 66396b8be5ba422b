"""SS Finite (Sussex et al. 2021): separating-system candidates, MI objective, lazy greedy.

1. Candidates: a separating system over U, the union of the undirected edges of the
   particles' I-essential graphs: an approximate minimum vertex cover of U (greedy:
   repeatedly take the node of highest remaining degree), a greedy colouring of U
   restricted to the cover, and every colour class cut into sets of at most
   `max_targets` nodes. Every edge of U then has a candidate holding exactly one of its
   ends. If U is empty (all particles fully oriented) the candidates are the singletons.
2. Objective: the mutual information between the graph and the data of a set of
   interventions, I(G; Y) = E[log p(G | Y) - log p(G)], estimated by simulating
   `n_datasets` datasets from every particle and scoring the particle posterior
   (uniform prior, likelihoods of posterior.py), aggregated over particles that share
   a DAG.
3. Lazy greedy selection of a batch of `batch` interventions (batch 1 per design
   step here: one sample per step, as CAASL's setting has it).

Values are fixed, not optimised. The public code's default is 0; here it is the top of
the environment's range (action value 1, i.e. value_scale): a shift of 0 would be no
intervention at all, and a do far from the mean separates the hypotheses better.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caasl_jax.baselines.posterior import Particles, log_likelihood, simulate_particle
from caasl_jax.checks import check_positive_int


@dataclasses.dataclass(frozen=True)
class SSFiniteConfig:
    """max_targets: largest candidate set (None: d); value_action: fixed value in [-1, 1];
    n_datasets: simulated datasets per particle in the MI estimate; batch: designs chosen
    per call (the env takes one)."""

    max_targets: int | None = None
    value_action: float = 1.0
    n_datasets: int = 16
    batch: int = 1

    def __post_init__(self):
        counts = ("n_datasets", "batch") + (() if self.max_targets is None else ("max_targets",))
        for name in counts:
            check_positive_int("SSFiniteConfig", name, getattr(self, name))
        if not -1.0 <= self.value_action <= 1.0:
            raise ValueError(
                f"SSFiniteConfig: value_action must be in [-1, 1] (it is scaled by the env's "
                f"value_scale), got {self.value_action!r}"
            )


# ----------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------


def undirected_union(essential: np.ndarray) -> np.ndarray:
    """bool[d, d] symmetric: i - j undirected in some particle's graph. essential [L, d, d]."""
    essential = np.asarray(essential) != 0
    return np.any(essential & np.swapaxes(essential, -1, -2), axis=0)


def greedy_vertex_cover(adjacency: np.ndarray) -> list[int]:
    """Approximate minimum vertex cover of a symmetric bool[d, d] graph (max-degree greedy)."""
    remaining = np.array(adjacency, bool)
    np.fill_diagonal(remaining, False)
    cover = []
    while remaining.any():
        node = int(np.argmax(remaining.sum(1)))
        cover.append(node)
        remaining[node, :] = remaining[:, node] = False
    return sorted(cover)


def greedy_colouring(adjacency: np.ndarray, nodes: Sequence[int]) -> list[list[int]]:
    """Colour classes of the subgraph induced by `nodes` (largest degree first, smallest
    free colour). Returns the classes, each a sorted list of nodes."""
    nodes = sorted(nodes, key=lambda n: (-int(adjacency[n, list(nodes)].sum()), n))
    colour: dict[int, int] = {}
    for n in nodes:
        used = {colour[m] for m in colour if adjacency[n, m]}
        colour[n] = next(c for c in range(len(nodes)) if c not in used)
    classes = [sorted(n for n in colour if colour[n] == c) for c in sorted(set(colour.values()))]
    return classes


def separating_system(essential: np.ndarray, max_targets: int | None = None) -> list[list[int]]:
    """Candidate target sets (see the module docstring). essential f32[L, d, d]."""
    d = essential.shape[-1]
    k = d if max_targets is None else max_targets
    if k < 1:
        raise ValueError(f"max_targets must be >= 1, got {max_targets}")
    union = undirected_union(essential)
    cover = greedy_vertex_cover(union)
    if not cover:
        return [[i] for i in range(d)]
    classes = greedy_colouring(union, cover)
    return [cls[i : i + k] for cls in classes for i in range(0, len(cls), k)]


# ----------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------


def mutual_information(
    particles: Particles,
    eps: jax.Array,
    targets: jax.Array,
    values: jax.Array,
    intervention: str = "do",
) -> jax.Array:
    """MI estimate between the graph and the data of a set of m designs. Scalar.

    eps f32[L, R, m, k, d]: R datasets per particle, k rows per design; targets and
    values f32[m, d]. MI = mean_{l,r} log p(G_l | Y_lr) - mean_l log p(G_l), where
    p(G | Y) sums the particle posterior over particles with the same DAG.
    """
    n_particles, n_data, m, k, d = eps.shape

    def datasets(w, v, e):  # e [R, m, k, d] -> [R, m·k, d], one inverse per design
        per_design = jnp.swapaxes(e, 0, 1).reshape(m, n_data * k, d)
        x = jax.vmap(lambda ei, t, val: simulate_particle(w, v, ei, t, val, intervention))(
            per_design, targets, values
        )  # [m, R·k, d]
        return jnp.swapaxes(x.reshape(m, n_data, k, d), 0, 1).reshape(n_data, m * k, d)

    y = jax.vmap(datasets)(particles.weights, particles.noise_var, eps)  # [L, R, m·k, d]
    rows_t = jnp.broadcast_to(jnp.repeat(targets, k, 0), (n_particles * n_data, m * k, d))
    rows_v = jnp.broadcast_to(jnp.repeat(values, k, 0), rows_t.shape)
    flat = y.reshape(-1, d)
    ll = log_likelihood(particles, flat, rows_t.reshape(-1, d), rows_v.reshape(-1, d), intervention)
    ll = ll.reshape(n_particles, n_particles, n_data, m * k).sum(-1)  # [j, l, r]
    log_post = jax.nn.log_softmax(jnp.transpose(ll, (1, 2, 0)), -1)  # [l, r, j]
    same = jnp.all(particles.dag[:, None] == particles.dag[None, :], axis=(-1, -2))  # [l, j]
    log_post_graph = jax.nn.logsumexp(jnp.where(same[:, None, :], log_post, -jnp.inf), -1)
    log_prior_graph = jnp.log(same.mean(-1))  # [l]
    return jnp.mean(log_post_graph) - jnp.mean(log_prior_graph)


@functools.lru_cache(maxsize=32)
def _objective(env, n_datasets: int, m: int):
    """Jitted MI of many candidate sets of m designs: (particles, key, t[c, m, d], v) -> [c]."""
    k, d = env.samples_per_step, env.d

    def many(particles, key, targets, values):
        eps = jax.random.normal(key, (particles.n_particles, n_datasets, m, k, d))
        return jax.vmap(lambda t, v: mutual_information(particles, eps, t, v, env.intervention))(
            targets, values
        )

    return jax.jit(many)


def lazy_greedy(
    gain: Callable[[tuple[int, ...], int], float], n_candidates: int, batch: int, first=None
) -> tuple[list[int], list[float]]:
    """Lazy greedy maximisation of a monotone set function over candidate indices.

    gain(selected, c) is the marginal gain of candidate c given the selected tuple;
    `first` (optional sequence of the gains given nothing) skips the first round.
    Stale gains are upper bounds (submodularity); a candidate whose refreshed gain still
    tops the heap is taken. Returns up to `batch` indices in selection order and their
    marginal gains.
    """
    first = [gain((), c) for c in range(n_candidates)] if first is None else list(first)
    heap = [(-float(g), c, 0) for c, g in enumerate(first)]
    heapq.heapify(heap)
    selected: list[int] = []
    gains: list[float] = []
    while heap and len(selected) < batch:
        neg, c, stamp = heapq.heappop(heap)
        if stamp == len(selected):
            selected.append(c)
            gains.append(-neg)
            continue
        heapq.heappush(heap, (-float(gain(tuple(selected), c)), c, len(selected)))
    return selected, gains


def set_mutual_information(
    env, particles: Particles, key: jax.Array, sets_of_sets, config: SSFiniteConfig
) -> np.ndarray:
    """MI estimates f32[c] of c intervention sets, each a list of m target lists
    (all with the same m), at the fixed value. Common random numbers across sets."""
    value = env.design(jnp.full((env.action_dim,), config.value_action))[1]  # f32[d]
    c, m = len(sets_of_sets), len(sets_of_sets[0])
    # pad to a multiple of d candidates so that the jitted objective keeps its shape
    padded = -(-c // env.d) * env.d
    targets = np.zeros((padded, m, env.d), np.float32)
    for i, sets in enumerate(sets_of_sets):
        for j, target_set in enumerate(sets):
            targets[i, j, list(target_set)] = 1.0
    targets = jnp.asarray(targets)
    values = jnp.broadcast_to(value, targets.shape)
    mi = _objective(env, config.n_datasets, m)(particles, key, targets, values)
    return np.asarray(mi)[:c]


def design_batch(env, particles: Particles, key: jax.Array, config: SSFiniteConfig | None = None):
    """Lazy-greedy batch of target sets: (list of candidate target lists, their MI gains)."""
    config = config or SSFiniteConfig()
    candidates = separating_system(np.asarray(particles.essential), config.max_targets)

    def mi_of(sets_of_sets):
        return set_mutual_information(env, particles, key, sets_of_sets, config)

    first = mi_of([[c] for c in candidates])

    def gain(selected, c):
        base = float(mi_of([[candidates[i] for i in selected]])[0]) if selected else 0.0
        return float(mi_of([[candidates[i] for i in (*selected, c)]])[0]) - base

    chosen, gains = lazy_greedy(gain, len(candidates), config.batch, first=first)
    return [candidates[c] for c in chosen], gains


def design(env, particles: Particles, key: jax.Array, config: SSFiniteConfig | None = None):
    """SS Finite's design for one step: (action f32[2d] in [-1, 1], its MI estimate)."""
    config = config or SSFiniteConfig()
    (chosen, *_), (mi, *_) = design_batch(env, particles, key, dataclasses.replace(config, batch=1))
    targets = np.zeros(env.d, np.float32)
    targets[chosen] = 1.0
    action = jnp.concatenate(
        [jnp.where(jnp.asarray(targets) > 0, 1.0, -1.0), jnp.full((env.d,), config.value_action)]
    )
    return action, mi
