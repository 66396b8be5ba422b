"""Jittable priors over DAGs.

Adjacency convention everywhere in caasl_jax: `A[i, j] = 1` means the edge i -> j.
Both priors build a DAG on a fixed node order and then permute the nodes at random,
so a graph's node order carries no information.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRAPH_KINDS = ("er", "sf")


def erdos_renyi_edge_prob(d: int, edges_per_node: float) -> float:
    """Edge probability giving `edges_per_node * d` expected edges (capped at 0.99;
    0 for d < 2, which has no pairs)."""
    if d < 2:
        return 0.0
    return min(edges_per_node * d / (d * (d - 1) / 2), 0.99)


def permute_graph(key: jax.Array, adjacency: jax.Array) -> jax.Array:
    """Relabel the nodes of an adjacency f32[d, d] by a random permutation."""
    perm = jax.random.permutation(key, adjacency.shape[0])
    return adjacency[perm][:, perm]


def erdos_renyi_dag(key: jax.Array, d: int, edges_per_node: float = 3.0) -> jax.Array:
    """Erdős–Rényi DAG f32[d, d]: each pair i < j (in a hidden order) is an edge w.p. p."""
    edge_key, perm_key = jax.random.split(key)
    p = erdos_renyi_edge_prob(d, edges_per_node)
    upper = jnp.triu(jnp.ones((d, d), jnp.bool_), k=1)
    edges = jax.random.bernoulli(edge_key, p, (d, d)) & upper
    return permute_graph(perm_key, edges.astype(jnp.float32))


def scale_free_dag(key: jax.Array, d: int, edges_per_node: float = 3) -> jax.Array:
    """Barabási–Albert DAG f32[d, d] with power-law in-degree.

    Node t (in a hidden order) sends min(t, m) edges, m = round(edges_per_node), to
    distinct earlier nodes, chosen with probability proportional to their degree + 1
    (Gumbel top-k sampling without replacement), so early hubs collect many parents'
    worth of in-edges.
    """
    m = round(edges_per_node)
    if m < 1:
        raise ValueError(f"scale-free graphs need round(edges_per_node) >= 1, got {edges_per_node}")
    attach_key, perm_key = jax.random.split(key)
    k = min(m, d - 1)

    def add_node(t, carry):
        adjacency, degree = carry
        scores = jnp.log(degree + 1.0) + jax.random.gumbel(jax.random.fold_in(attach_key, t), (d,))
        scores = jnp.where(jnp.arange(d) < t, scores, -jnp.inf)
        _, chosen = jax.lax.top_k(scores, k)
        keep = jnp.arange(k) < jnp.minimum(t, m)
        new_edges = jnp.zeros((d,), jnp.float32).at[chosen].max(keep.astype(jnp.float32))
        adjacency = adjacency.at[t].set(new_edges)
        degree = degree + new_edges
        degree = degree.at[t].add(new_edges.sum())
        return adjacency, degree

    adjacency, _ = jax.lax.fori_loop(
        1, d, add_node, (jnp.zeros((d, d), jnp.float32), jnp.zeros((d,), jnp.float32))
    )
    return permute_graph(perm_key, adjacency)


def graph_prior_problem(kind: str, edges_per_node: float) -> str | None:
    """Why (kind, edges_per_node) names no graph prior (None if it does): environments
    check this when built, before any graph is sampled."""
    if kind not in GRAPH_KINDS:
        return f"unknown graph_kind {kind!r}; choose one of {GRAPH_KINDS}"
    if not edges_per_node > 0:
        return f"edges_per_node must be > 0, got {edges_per_node}"
    if kind == "sf" and round(edges_per_node) < 1:
        return (
            "scale-free graphs attach round(edges_per_node) >= 1 edges per node, got "
            f"edges_per_node={edges_per_node}"
        )
    return None


def sample_graph(key: jax.Array, d: int, kind: str = "er", edges_per_node: float = 3.0):
    """A random DAG f32[d, d] from the named prior ('er' or 'sf')."""
    if kind == "er":
        return erdos_renyi_dag(key, d, edges_per_node)
    if kind == "sf":
        return scale_free_dag(key, d, edges_per_node)
    raise ValueError(f"unknown graph prior {kind!r}; choose one of {GRAPH_KINDS}")


def is_acyclic(adjacency: jax.Array) -> jax.Array:
    """bool[]: True when A has no directed cycle (A^d = 0 for a nilpotent matrix)."""
    d = adjacency.shape[-1]
    power = jnp.eye(d, dtype=jnp.float32)
    a = (adjacency != 0).astype(jnp.float32)
    for _ in range(d):
        power = jnp.minimum(power @ a, 1.0)
    return jnp.all(power == 0)


def topological_depth(adjacency: jax.Array) -> jax.Array:
    """i32[d]: length of the longest directed path ending at each node (roots are 0)."""
    d = adjacency.shape[-1]
    a = adjacency != 0

    def relax(_, depth):
        incoming = jnp.where(a, depth[:, None] + 1, 0)
        return jnp.maximum(depth, incoming.max(axis=0))

    return jax.lax.fori_loop(0, d, relax, jnp.zeros((d,), jnp.int32))
