"""Structure-learning metrics, as AVICI defines them (REFERENCE.md section 4).

Conventions: `true` is a 0/1 adjacency f32[..., d, d] with A[i, j] = 1 for i -> j;
`probs` are edge probabilities of the same shape; predictions are `probs > 0.5`.
Every function is a pure jnp function of one (d, d) pair and is jittable; batch with
`jax.vmap`. Ranking metrics (AUPRC, AP, AUROC) flatten the whole d x d matrix
(diagonal included, as AVICI does) and handle tied scores exactly like scikit-learn,
using O((d^2)^2) pairwise comparisons (cheap for the d <= 50 of this project).

Degenerate inputs follow AVICI: with no true edge the ranking metrics give
AUROC 0.5 and AUPRC/AP 0 if some probability is positive (1 if all are 0); edge
F1 is 1 when both the truth and the prediction are empty and 0 when only one is.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _pair(probs: jax.Array, true: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank([probs, true], 2)
    chex.assert_equal_shape([probs, true])
    if probs.shape[0] != probs.shape[1]:
        raise ValueError(f"adjacency matrices must be square, got {tuple(probs.shape)}")
    return jnp.asarray(probs, jnp.float32), jnp.asarray(true, jnp.float32)


def expected_correct_entries(probs: jax.Array, true: jax.Array) -> jax.Array:
    """sum_ij [A_ij p_ij + (1 - A_ij)(1 - p_ij)], diagonal included. Scalar."""
    p, a = _pair(probs, true)
    return jnp.sum(a * p + (1.0 - a) * (1.0 - p))


def shd(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Structural Hamming distance of 0/1 graphs: each unordered pair {i, j} counts 1
    when (G_ij, G_ji) differs from (A_ij, A_ji) (a reversed edge counts once); the
    diagonal counts 1 per differing self-loop. Scalar int32."""
    g, a = _pair(pred, true)
    diff = jnp.abs(g - a) > 0.5
    pair = diff | diff.T
    return jnp.sum(jnp.triu(pair)).astype(jnp.int32)


def expected_shd(probs: jax.Array, true: jax.Array) -> jax.Array:
    """E_{G ~ p}[SHD(G, A)] in closed form for independent Bernoulli edges G_ij ~ p_ij:
    sum over pairs i < j of 1 - P(G_ij = A_ij) P(G_ji = A_ji), plus the diagonal's
    expected self-loop errors. Scalar."""
    p, a = _pair(probs, true)
    right = a * p + (1.0 - a) * (1.0 - p)  # P(G_ij = A_ij)
    off = 1.0 - right * right.T
    d = p.shape[0]
    upper = jnp.triu(jnp.ones((d, d), bool), k=1)
    return jnp.sum(jnp.where(upper, off, 0.0)) + jnp.sum(1.0 - jnp.diag(right))


def edge_f1(probs: jax.Array, true: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Binary F1 of the flattened matrix thresholded at `probs > threshold`. Scalar."""
    p, a = _pair(probs, true)
    pred = (p > threshold).astype(jnp.float32)
    tp = jnp.sum(pred * a)
    n_pred, n_true = jnp.sum(pred), jnp.sum(a)
    f1 = 2.0 * tp / jnp.maximum(n_pred + n_true, 1.0)
    return jnp.where((n_pred == 0) & (n_true == 0), 1.0, f1)


def _ranking_stats(p: jax.Array, a: jax.Array):
    """Flattened scores s[n], labels y[n] and the pairwise order ge[i, j] = s_j >= s_i."""
    s, y = p.reshape(-1), a.reshape(-1)
    ge = s[None, :] >= s[:, None]  # [i, j]: j ranks at or above threshold s_i
    return s, y, ge


def _degenerate(value: jax.Array, p: jax.Array, a: jax.Array, *, none_pos, none_any) -> jax.Array:
    n_pos = jnp.sum(a)
    return jnp.where(n_pos > 0, value, jnp.where(jnp.any(p > 0), none_pos, none_any))


def average_precision(probs: jax.Array, true: jax.Array) -> jax.Array:
    """Average precision (sklearn's `average_precision_score`): the mean over true
    edges k of the precision at threshold s_k. Scalar."""
    p, a = _pair(probs, true)
    s, y, ge = _ranking_stats(p, a)
    tp = ge @ y  # [i]: positives with score >= s_i
    n_above = ge.sum(1)
    ap = jnp.sum(y * tp / n_above) / jnp.maximum(jnp.sum(y), 1.0)
    return _degenerate(ap, p, a, none_pos=0.0, none_any=1.0)


def auprc(probs: jax.Array, true: jax.Array) -> jax.Array:
    """Area under the precision-recall curve by the trapezoidal rule, as AVICI computes
    it (`sklearn.metrics.auc(recall, precision)` of `precision_recall_curve`). Scalar."""
    p, a = _pair(probs, true)
    s, y, ge = _ranking_stats(p, a)
    n = s.shape[0]
    n_pos = jnp.maximum(jnp.sum(y), 1.0)
    gt = s[None, :] > s[:, None]
    tp, fp = ge @ y, ge @ (1.0 - y)
    tp_prev, fp_prev = gt @ y, gt @ (1.0 - y)  # point at the next larger threshold
    prec = tp / (tp + fp)
    prec_prev = jnp.where(tp_prev + fp_prev > 0, tp_prev / jnp.maximum(tp_prev + fp_prev, 1.0), 1.0)
    # one point per distinct threshold: keep the first index of each tied group
    idx = jnp.arange(n)
    first = ~jnp.any((s[None, :] == s[:, None]) & (idx[None, :] < idx[:, None]), axis=1)
    area = jnp.where(first, (tp - tp_prev) / n_pos * (prec + prec_prev) / 2.0, 0.0)
    return _degenerate(jnp.sum(area), p, a, none_pos=0.0, none_any=1.0)


def auroc(probs: jax.Array, true: jax.Array) -> jax.Array:
    """Area under the ROC curve: P(s_pos > s_neg) + 0.5 P(s_pos = s_neg). Scalar."""
    p, a = _pair(probs, true)
    s, y = p.reshape(-1), a.reshape(-1)
    pair = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    weight = y[:, None] * (1.0 - y)[None, :]
    n_pairs = jnp.sum(weight)
    value = jnp.sum(pair * weight) / jnp.maximum(n_pairs, 1.0)
    value = jnp.where(n_pairs > 0, value, 0.5)
    return _degenerate(value, p, a, none_pos=0.5, none_any=1.0)


def all_metrics(probs: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
    """Every metric of one (d, d) pair, as a dict of scalars (jittable, vmappable)."""
    return {
        "expected_correct": expected_correct_entries(probs, true),
        "expected_shd": expected_shd(probs, true),
        "shd": shd(probs > 0.5, true),
        "auprc": auprc(probs, true),
        "average_precision": average_precision(probs, true),
        "auroc": auroc(probs, true),
        "edge_f1": edge_f1(probs, true),
    }


def batch_metrics(probs: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
    """Per-graph metrics of probs, true f32[B, d, d]: dict of f32[B]."""
    chex.assert_rank([probs, true], 3)
    return jax.vmap(all_metrics)(probs, true)
