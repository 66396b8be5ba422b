"""Padding-aware input standardisations of the AVICI reward model.

Both act on channel 0 (values) of a history `data` f32[..., N, d, 2] and leave
channel 1 (the 0/1 intervention indicator) untouched. `mask` bool[..., N] marks the
valid rows; statistics use only those rows and padded rows come out as exact zeros,
so padding never changes a valid row's standardised value.

- `zscore`: per variable, subtract the mean over the valid rows and divide by the
  population standard deviation (a zero deviation divides by 1), as AVICI does for
  real-valued data.
- `log2_cpm`: for count data (SERGIO): log2 counts-per-million of each cell (row);
  zero counts are missing; subtract the global minimum and divide by the global
  standard deviation of the non-missing entries; missing entries become 0.
"""

from __future__ import annotations

import warnings

import chex
import jax.numpy as jnp


def _full_mask(data: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    if mask is None:
        return jnp.ones(data.shape[:-2], bool)
    chex.assert_equal_shape_prefix([data, mask], mask.ndim)
    chex.assert_rank(mask, data.ndim - 2)
    return mask.astype(bool)


def _check(data: jnp.ndarray) -> None:
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(
            f"history data must have shape [..., N, d, 2] (values, intervention indicator), "
            f"got {tuple(data.shape)}"
        )


def zscore(data: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-variable z-score of channel 0 over the valid rows.

    data: f32[..., N, d, 2]; mask: bool[..., N] or None (all rows valid).
    Returns f32[..., N, d, 2], padded rows all zero in channel 0.
    """
    _check(data)
    mask = _full_mask(data, mask)
    x = data[..., 0]
    w = mask[..., None].astype(x.dtype)  # [..., N, 1]
    count = jnp.maximum(w.sum(-2, keepdims=True), 1.0)  # [..., 1, 1]
    mean = (x * w).sum(-2, keepdims=True) / count
    var = (jnp.square(x - mean) * w).sum(-2, keepdims=True) / count
    std = jnp.sqrt(var)
    z = (x - mean) / jnp.where(std == 0.0, 1.0, std)
    z = jnp.where(mask[..., None], z, 0.0)
    return data.at[..., 0].set(z)


def log2_cpm(data: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """log2-CPM standardisation of count data (channel 0) over the valid rows.

    data: f32[..., N, d, 2] nonnegative counts in channel 0; mask: bool[..., N] or None.
    Returns f32[..., N, d, 2]; zero counts, empty cells and padded rows give 0.
    """
    _check(data)
    mask = _full_mask(data, mask)
    x = data[..., 0]
    libsize = x.sum(-1, keepdims=True)  # [..., N, 1]
    present = (~jnp.isclose(x, 0.0)) & mask[..., None]
    safe = jnp.where(present, x / (libsize * 1e-6), 1.0)
    cpm = jnp.log2(safe)
    present = present & jnp.isfinite(cpm)
    axes = (-1, -2)
    n = present.sum(axes, keepdims=True)
    big = jnp.finfo(cpm.dtype).max
    gmin = jnp.where(present, cpm, big).min(axes, keepdims=True)
    gmean = jnp.where(present, cpm, 0.0).sum(axes, keepdims=True) / jnp.maximum(n, 1)
    gvar = jnp.where(present, jnp.square(cpm - gmean), 0.0).sum(axes, keepdims=True)
    gstd = jnp.sqrt(gvar / jnp.maximum(n, 1))
    # no observed entry at all: AVICI's NaN statistics fall back to shift 0, scale 1
    gmin = jnp.where(n > 0, gmin, 0.0)
    gstd = jnp.where((n > 0) & (gstd > 0), gstd, 1.0)
    out = jnp.where(present, (cpm - gmin) / gstd, 0.0)
    return data.at[..., 0].set(out)


STANDARDIZERS = {"zscore": zscore, "log2_cpm": log2_cpm}


def standardization_for_env(env_name: str) -> str:
    """The standardisation AVICI uses for an environment's data: log2_cpm for SERGIO's
    counts, zscore for real values."""
    return "log2_cpm" if env_name.startswith("sergio") else "zscore"


def warn_if_other_family(reward_name: str, standardization: str, env_name: str) -> None:
    """A UserWarning when a reward model's input standardisation is not the one
    `env_name`'s data call for (a model trained for another environment family)."""
    expected = standardization_for_env(env_name)
    # real values may be read z-scored or raw ("none": the shipped linear-raw-d10 model)
    if (standardization == "log2_cpm") != (expected == "log2_cpm"):
        warnings.warn(
            f"reward model {reward_name!r} reads its input as {standardization!r}, but "
            f"{env_name!r} data call for {expected!r}: was it trained for another "
            "environment family?",
            stacklevel=3,
        )


def standardize(data: jnp.ndarray, mask: jnp.ndarray | None, kind: str) -> jnp.ndarray:
    """Dispatch on `kind` in STANDARDIZERS ("zscore" or "log2_cpm"; "none" = identity)."""
    if kind == "none":
        _check(data)
        if mask is None:
            return data
        return jnp.where(_full_mask(data, mask)[..., None, None], data, 0.0)
    try:
        fn = STANDARDIZERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown standardisation {kind!r}; expected one of {sorted(STANDARDIZERS)} or 'none'"
        ) from None
    return fn(data, mask)
