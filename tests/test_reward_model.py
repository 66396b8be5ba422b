"""The Flax AVICI network: shapes, padding invariance, standardisation, jit/vmap, errors."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.reward.model import (
    AviciConfig,
    AviciModel,
    check_params,
    edge_logits,
    edge_probs,
    init_params,
    param_count,
)
from caasl_jax.reward.standardize import log2_cpm, standardize, zscore

CFG = AviciConfig(dim=16, layers=1, heads=2, key_size=4, widening=2)
COUNT_CFG = AviciConfig(dim=16, layers=1, heads=2, key_size=4, widening=2,
                        standardization="log2_cpm")


@pytest.fixture(scope="module")
def params():
    p = init_params(jax.random.key(0), CFG, 4)
    # perturb so that LayerNorm offsets/scales and the scalars are not at their init
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _history(key, n, d, counts=False):
    k1, k2 = jax.random.split(key)
    if counts:
        x = jax.random.poisson(k1, 3.0, (n, d)).astype(jnp.float32)
    else:
        x = jax.random.normal(k1, (n, d)) * 2.0 + 1.0
    t = jax.random.bernoulli(k2, 0.2, (n, d)).astype(jnp.float32)
    return jnp.stack([x, t], -1)


def test_official_size_has_4_27m_parameters():
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), AviciConfig(), 3))
    assert param_count(shapes) == 4_269_442


def test_output_shapes_probabilities_and_diagonal(params):
    data = _history(jax.random.key(2), 12, 5)
    logits = edge_logits(params, data, None, CFG)
    probs = edge_probs(params, data, None, CFG)
    chex.assert_shape([logits, probs], (5, 5))
    chex.assert_tree_all_finite(logits)
    assert np.all(np.diag(probs) == 0.0)
    off = probs[~np.eye(5, dtype=bool)]
    assert np.all((off > 0) & (off < 1))
    no_mask = AviciConfig(**{**CFG.to_dict(), "mask_diag": False})
    assert np.all(np.diag(edge_probs(params, data, None, no_mask)) > 0)


def _dot_precisions(fn, *args) -> set[str]:
    """The operand precisions of every dot in fn's StableHLO (none written = DEFAULT)."""
    hlo = jax.jit(fn).lower(*args).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert dots
    found = (re.search(r"precision = \[(\w+), (\w+)\]", line) for line in dots)
    return {name for m in found for name in (m.groups() if m else ("DEFAULT",))}


def test_edge_probs_multiply_in_full_float32_under_any_default(params):
    # GPUs default to TF32 (and bf16 contexts to one bf16 pass); the reward must not
    data = _history(jax.random.key(2), 12, 5)
    with jax.default_matmul_precision("bfloat16"):
        probs = _dot_precisions(lambda p, x: edge_probs(p, x, None, CFG), params, data)
        logits = _dot_precisions(lambda p, x: edge_logits(p, x, None, CFG), params, data)
    assert probs == {"HIGHEST"}
    assert logits == {"DEFAULT"}  # training follows the context (here one bf16 pass)


def test_full_float32_edge_probs_are_bit_identical_on_cpu(params):
    data = _history(jax.random.key(3), 12, 5)
    probs = jax.jit(lambda p, x: edge_probs(p, x, None, CFG))(params, data)
    logits = jax.jit(lambda p, x: edge_logits(p, x, None, CFG))(params, data)
    expected = jnp.where(jnp.eye(5, dtype=bool), 0.0, jax.nn.sigmoid(logits))
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(expected))


@pytest.mark.parametrize("cfg", [CFG, COUNT_CFG], ids=["zscore", "log2_cpm"])
def test_padding_rows_do_not_change_output(params, cfg):
    n_valid, n_total, d = 9, 16, 4
    data = _history(jax.random.key(3), n_total, d, counts=cfg.standardization == "log2_cpm")
    mask = jnp.arange(n_total) < n_valid
    reference = edge_logits(params, data[:n_valid], None, cfg)
    # padding filled with garbage, zeros, and huge values: output identical
    for fill in (jax.random.normal(jax.random.key(4), data.shape) * 100.0,
                 jnp.zeros_like(data), jnp.full_like(data, 1e6)):
        padded = jnp.where(mask[:, None, None], data, fill)
        out = edge_logits(params, padded, mask, cfg)
        np.testing.assert_allclose(out, reference, atol=2e-5, rtol=0)


def test_mask_need_not_be_contiguous(params):
    data = _history(jax.random.key(5), 10, 3)
    mask = jnp.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    np.testing.assert_allclose(
        edge_logits(params, data, mask, CFG), edge_logits(params, data[mask], None, CFG),
        atol=2e-5, rtol=0,
    )


def test_permuting_samples_leaves_output_unchanged(params):
    data = _history(jax.random.key(6), 11, 4)
    perm = jax.random.permutation(jax.random.key(7), 11)
    np.testing.assert_allclose(
        edge_logits(params, data, None, CFG), edge_logits(params, data[perm], None, CFG),
        atol=2e-5, rtol=0,
    )


def test_permuting_variables_permutes_the_graph(params):
    data = _history(jax.random.key(8), 11, 4)
    perm = jnp.array([2, 0, 3, 1])
    out = edge_logits(params, data, None, CFG)
    out_perm = edge_logits(params, data[:, perm], None, CFG)
    np.testing.assert_allclose(out_perm, out[perm][:, perm], atol=2e-5, rtol=0)


def test_jit_and_vmap_over_a_batch_match_single_calls(params):
    batch = jnp.stack([_history(jax.random.key(i), 8, 3) for i in range(3)])
    masks = jnp.arange(8)[None, :] < jnp.array([8, 5, 2])[:, None]
    fn = jax.jit(jax.vmap(lambda x, m: edge_probs(params, x, m, CFG)))
    out = fn(batch, masks)
    chex.assert_shape(out, (3, 3, 3))
    single = edge_probs(params, batch[1][:5], None, CFG)  # row 1 has 5 valid rows
    np.testing.assert_allclose(out[1], single, atol=2e-5, rtol=0)
    assert not np.allclose(out[0], out[1])
    # leading batch dims also broadcast natively
    np.testing.assert_allclose(edge_probs(params, batch, masks, CFG), out, atol=2e-5, rtol=0)


def test_dropout_only_with_a_key():
    cfg = AviciConfig(dim=16, layers=1, heads=2, key_size=4, widening=2, dropout=0.5)
    p = init_params(jax.random.key(0), cfg, 3)
    data = _history(jax.random.key(9), 6, 3)
    a = edge_logits(p, data, None, cfg)
    np.testing.assert_array_equal(a, edge_logits(p, data, None, cfg))
    b = edge_logits(p, data, None, cfg, dropout_key=jax.random.key(1))
    assert not np.allclose(a, b)


def test_model_bundle_and_param_shapes_independent_of_d():
    model = AviciModel(CFG)
    p3, p7 = model.init(jax.random.key(0), 3), model.init(jax.random.key(0), 7)
    chex.assert_trees_all_equal_shapes(p3, p7)
    out = model.edge_probs(p3, _history(jax.random.key(1), 5, 7))
    chex.assert_shape(out, (7, 7))


def test_zscore_is_masked_population_zscore():
    data = _history(jax.random.key(10), 12, 3)
    mask = jnp.arange(12) < 7
    out = zscore(data, mask)
    x = np.asarray(data[:7, :, 0])
    expected = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(out[:7, :, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(out[7:, :, 0], 0.0)
    np.testing.assert_array_equal(out[..., 1], data[..., 1])
    const = data.at[:, 1, 0].set(4.0)
    assert np.all(zscore(const)[:, 1, 0] == 0.0)  # zero std divides by 1


def test_log2_cpm_matches_a_numpy_reference():
    data = _history(jax.random.key(11), 10, 4, counts=True).at[0, :, 0].set(0.0)
    x = np.asarray(data[..., 0], np.float64)
    lib = x.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cpm = np.where(x == 0, np.nan, np.log2(x / (lib * 1e-6)))
    expected = np.nan_to_num((cpm - np.nanmin(cpm)) / np.nanstd(cpm), nan=0.0)
    np.testing.assert_allclose(log2_cpm(data)[..., 0], expected, atol=1e-4)
    mask = jnp.arange(10) < 6
    np.testing.assert_allclose(log2_cpm(data, mask)[:6], log2_cpm(data[:6]), atol=1e-5)
    np.testing.assert_array_equal(log2_cpm(data, mask)[6:, :, 0], 0.0)


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match=r"\[\.\.\., N, d, 2\]"):
        edge_logits(params, jnp.zeros((5, 3)), None, CFG)
    with pytest.raises(ValueError, match="row mask must have shape"):
        edge_logits(params, jnp.zeros((5, 3, 2)), jnp.ones((4,), bool), CFG)
    with pytest.raises(ValueError, match="standardisation"):
        standardize(jnp.zeros((5, 3, 2)), None, "minmax")
    with pytest.raises(ValueError, match="dim"):
        AviciConfig(dim=0)
    with pytest.raises(ValueError, match="standardization"):
        AviciConfig(standardization="log")
    with pytest.raises(ValueError, match="shape"):
        check_params(params, AviciConfig(dim=16, layers=1, heads=4, key_size=4, widening=2))
    with pytest.raises(ValueError, match="missing"):
        check_params(params, AviciConfig(dim=16, layers=2, heads=2, key_size=4, widening=2))
