"""Metrics against scikit-learn and brute-force references on random inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from caasl_jax import metrics as M

D = 6


def _cases(n=12, d=D, seed=0):
    """Random (probs, true) pairs, some with tied scores (probabilities rounded)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        true = (rng.uniform(size=(d, d)) < rng.uniform(0.1, 0.6)).astype(np.float32)
        np.fill_diagonal(true, 0.0)
        probs = rng.uniform(size=(d, d)).astype(np.float32)
        probs = np.clip(0.6 * probs + 0.4 * true, 0, 1)
        if i % 3 == 0:
            probs = np.round(probs, 1)  # many ties
        np.fill_diagonal(probs, 0.0)
        out.append((probs.astype(np.float32), true))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def batched():
    probs = jnp.asarray(np.stack([p for p, _ in CASES]))
    true = jnp.asarray(np.stack([t for _, t in CASES]))
    return jax.device_get(jax.jit(M.batch_metrics)(probs, true))


def test_average_precision_matches_sklearn(batched):
    for i, (p, t) in enumerate(CASES):
        expected = skm.average_precision_score(t.ravel(), p.ravel())
        assert batched["average_precision"][i] == pytest.approx(expected, abs=1e-5)


def test_auprc_matches_avici_definition(batched):
    for i, (p, t) in enumerate(CASES):
        precision, recall, _ = skm.precision_recall_curve(t.ravel(), p.ravel())
        assert batched["auprc"][i] == pytest.approx(skm.auc(recall, precision), abs=1e-5)


def test_auroc_matches_sklearn(batched):
    for i, (p, t) in enumerate(CASES):
        expected = skm.roc_auc_score(t.ravel(), p.ravel())
        assert batched["auroc"][i] == pytest.approx(expected, abs=1e-5)


def test_edge_f1_matches_sklearn(batched):
    for i, (p, t) in enumerate(CASES):
        expected = skm.f1_score(t.ravel(), (p > 0.5).ravel(), zero_division=0.0)
        assert batched["edge_f1"][i] == pytest.approx(expected, abs=1e-6)


def _brute_shd(g, a):
    d = g.shape[0]
    total = sum(g[i, i] != a[i, i] for i in range(d))
    for i, j in itertools.combinations(range(d), 2):
        total += (g[i, j], g[j, i]) != (a[i, j], a[j, i])
    return total


def test_shd_counts_a_reversed_edge_once(batched):
    a = np.zeros((3, 3), np.float32)
    a[0, 1] = 1.0
    assert int(M.shd(a.T, a)) == 1  # reversal
    assert int(M.shd(np.zeros_like(a), a)) == 1  # deletion
    g = a.copy()
    g[1, 0] = 1.0
    assert int(M.shd(g, a)) == 1  # extra reverse edge on the same pair
    for i, (p, t) in enumerate(CASES):
        assert batched["shd"][i] == _brute_shd(p > 0.5, t > 0.5)


def test_expected_shd_equals_monte_carlo_and_enumeration():
    rng = np.random.default_rng(3)
    d = 3
    p = rng.uniform(size=(d, d)).astype(np.float32)
    np.fill_diagonal(p, 0.0)
    a = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    # exact enumeration over the 2^6 off-diagonal graphs
    off = [(i, j) for i in range(d) for j in range(d) if i != j]
    exact = 0.0
    for bits in itertools.product([0, 1], repeat=len(off)):
        g = np.zeros((d, d))
        prob = 1.0
        for (i, j), b in zip(off, bits, strict=True):
            g[i, j] = b
            prob *= p[i, j] if b else 1 - p[i, j]
        exact += prob * _brute_shd(g, a)
    assert float(M.expected_shd(p, a)) == pytest.approx(exact, abs=1e-5)


def test_expected_correct_entries_closed_form():
    p, t = CASES[1]
    expected = np.sum(t * p + (1 - t) * (1 - p))
    assert float(M.expected_correct_entries(p, t)) == pytest.approx(expected, rel=1e-6)
    # perfect and empty predictions
    assert float(M.expected_correct_entries(t, t)) == D * D
    assert float(M.expected_correct_entries(np.zeros_like(t), t)) == D * D - t.sum()


def test_degenerate_graphs_follow_avici_conventions():
    empty = np.zeros((4, 4), np.float32)
    probs = np.full((4, 4), 0.3, np.float32)
    assert float(M.auroc(probs, empty)) == 0.5
    assert float(M.auprc(probs, empty)) == 0.0
    assert float(M.average_precision(probs, empty)) == 0.0
    assert float(M.auprc(empty, empty)) == 1.0
    assert float(M.edge_f1(empty, empty)) == 1.0
    assert float(M.edge_f1(np.eye(4, dtype=np.float32), empty)) == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="square"):
        M.shd(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(AssertionError):
        M.auroc(np.zeros((3, 3)), np.zeros((4, 4)))
