"""The AVICI amortized structure-learning network (Lorch et al. 2022) in Flax linen.

Input: a history `data` f32[..., N, d, 2] (channel 0 raw values, channel 1 the 0/1
intervention indicator) and a row mask bool[..., N]. Output: edge logits f32[..., d, d]
with logit_ij the log-odds of the edge i -> j.

Architecture (see ../shared/REFERENCE.md section 2):

    standardise channel 0 (z-score, or log2-CPM for counts)   [N, d, 2]
    Dense(2 -> dim)                                           [N, d, dim]
    2L pre-norm transformer blocks, alternating the attended axis: block 0 attends
    over the d variables of each sample, block 1 over the N samples of each
    variable, and so on. A block is
        z += MHA(LN_q(z), LN_k(z), LN_v(z))      (three separate LayerNorms)
        z += Dense(dim) . relu . Dense(widening * dim) . LN(z)
    final LayerNorm, max over the samples                     [d, dim]
    u = normalise(Dense(LN(z))), v = normalise(Dense(LN(z)))  [d, out]
    logit_ij = exp(temp) <u_i, v_j> + bias

Padding: the row mask removes padded rows from the standardisation statistics,
from the keys of every attention over samples and from the max-pool, so a padded
row cannot change the output (attention over variables is row-local). LayerNorms
use epsilon 1e-5 and the exact two-pass variance, as Haiku does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caasl_jax.dropout import HashDropout
from caasl_jax.reward.standardize import standardize

Params = Any

_ATTN_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
_KAIMING_UNIFORM = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_EMBED_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_MASKED_LOGIT = -1e30  # large finite negative, as Haiku's masked attention


@dataclasses.dataclass(frozen=True)
class AviciConfig:
    """Hyper-parameters of the AVICI network (hashable: usable as a static jit arg).

    dim: model width; layers: L (the network has 2L blocks); heads, key_size: attention;
    widening: FFN width factor; dropout: rate on the residual branches when training;
    out_dim: width of the u/v embeddings (None = dim); temp_init, bias_init: initial
    log-temperature and logit bias; standardization: "zscore" (real values),
    "log2_cpm" (counts) or "none"; mask_diag: force p_ii = 0.
    The defaults are the official pretrained size (about 4.27M parameters).
    """

    dim: int = 128
    layers: int = 8
    heads: int = 8
    key_size: int = 32
    widening: int = 4
    dropout: float = 0.0
    out_dim: int | None = None
    temp_init: float = 2.0
    bias_init: float = -3.0
    standardization: str = "zscore"
    mask_diag: bool = True

    def __post_init__(self):
        for name in ("dim", "layers", "heads", "key_size", "widening"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AviciConfig.{name} must be a positive integer, got {value!r}")
        if self.out_dim is not None and (not isinstance(self.out_dim, int) or self.out_dim < 1):
            raise ValueError(
                f"AviciConfig.out_dim must be None or a positive int, got {self.out_dim!r}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"AviciConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.standardization not in ("zscore", "log2_cpm", "none"):
            raise ValueError(
                "AviciConfig.standardization must be 'zscore', 'log2_cpm' or 'none', "
                f"got {self.standardization!r}"
            )

    @property
    def embed_dim(self) -> int:
        return self.out_dim or self.dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AviciConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AviciConfig: unknown keys {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
    """Dot-product attention over axis -2 with an optional key mask.

    q_in, k_in, v_in: f32[..., T, D]; key_mask: bool broadcastable to [..., T] or None.
    Returns f32[..., T, model_size].
    """

    heads: int
    key_size: int
    model_size: int

    @nn.compact
    def __call__(self, q_in, k_in, v_in, key_mask=None):
        def project(x, name):
            y = nn.Dense(self.heads * self.key_size, kernel_init=_ATTN_INIT, name=name)(x)
            return y.reshape(*x.shape[:-1], self.heads, self.key_size)

        q = project(q_in, "query")
        k = project(k_in, "key")
        v = project(v_in, "value")
        logits = jnp.einsum("...thk,...Thk->...htT", q, k) / jnp.sqrt(
            jnp.asarray(self.key_size, q.dtype)
        )
        if key_mask is not None:
            logits = jnp.where(key_mask[..., None, None, :], logits, _MASKED_LOGIT)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("...htT,...Thk->...thk", weights, v)
        out = out.reshape(*out.shape[:-2], self.heads * self.key_size)
        return nn.Dense(self.model_size, kernel_init=_ATTN_INIT, name="out")(out)


class Block(nn.Module):
    """Pre-norm transformer block attending over axis -2 of z f32[..., S, T, dim]."""

    config: AviciConfig

    @nn.compact
    def __call__(self, z, key_mask, deterministic: bool):
        cfg = self.config
        attn = MultiHeadAttention(cfg.heads, cfg.key_size, cfg.dim, name="attn")(
            _layer_norm("ln_q")(z), _layer_norm("ln_k")(z), _layer_norm("ln_v")(z), key_mask
        )
        z = z + HashDropout(cfg.dropout)(attn, deterministic=deterministic)
        h = _layer_norm("ln_ffn")(z)
        h = nn.Dense(cfg.widening * cfg.dim, kernel_init=_KAIMING_UNIFORM, name="ffn_in")(h)
        h = nn.Dense(cfg.dim, kernel_init=_KAIMING_UNIFORM, name="ffn_out")(jax.nn.relu(h))
        return z + HashDropout(cfg.dropout)(h, deterministic=deterministic)


class AviciNet(nn.Module):
    """The network on standardised input. x: f32[..., N, d, 2], mask: bool[..., N].

    Returns edge logits f32[..., d, d] (diagonal not masked here).
    """

    config: AviciConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.config
        z = nn.Dense(cfg.dim, kernel_init=_EMBED_INIT, name="embed")(x)  # [..., N, d, dim]
        sample_mask = mask[..., None, :]  # keys of attention over samples: [..., 1, N]
        for i in range(2 * cfg.layers):
            over_samples = i % 2 == 1  # after an odd number of swaps z is [..., d, N, dim]
            z = Block(cfg, name=f"block_{i}")(
                z, sample_mask if over_samples else None, deterministic
            )
            z = jnp.swapaxes(z, -3, -2)
        z = _layer_norm("ln_final")(z)  # [..., N, d, dim]
        any_row = mask.any(-1)[..., None, None]
        z = jnp.where(mask[..., None, None], z, -jnp.inf).max(-3)
        z = jnp.where(any_row, z, 0.0)  # [..., d, dim]
        u = nn.Dense(cfg.embed_dim, kernel_init=_KAIMING_UNIFORM, name="u")(_layer_norm("ln_u")(z))
        v = nn.Dense(cfg.embed_dim, kernel_init=_KAIMING_UNIFORM, name="v")(_layer_norm("ln_v")(z))
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        temp = self.param("temp", nn.initializers.constant(cfg.temp_init), ())
        bias = self.param("bias", nn.initializers.constant(cfg.bias_init), ())
        return jnp.exp(temp) * jnp.einsum("...id,...jd->...ij", u, v) + bias


def _check_inputs(data, mask):
    if data.ndim < 3 or data.shape[-1] != 2:
        raise ValueError(
            f"history data must have shape [..., N, d, 2] (values, intervention indicator), "
            f"got {tuple(data.shape)}"
        )
    if mask is None:
        return jnp.ones(data.shape[:-2], bool)
    if tuple(mask.shape) != tuple(data.shape[:-2]):
        raise ValueError(
            f"row mask must have shape {tuple(data.shape[:-2])} (the [..., N] of data), "
            f"got {tuple(mask.shape)}"
        )
    return mask.astype(bool)


@functools.partial(jax.jit, static_argnames=("config", "d", "n"))
def init_params(key: jax.Array, config: AviciConfig, d: int, n: int = 4) -> Params:
    """Initial parameters (shapes do not depend on d or n). Jitted."""
    data = jnp.zeros((n, d, 2), jnp.float32)
    return AviciNet(config).init(key, data, jnp.ones((n,), bool))["params"]


def edge_logits(
    params: Params,
    data: jax.Array,
    mask: jax.Array | None = None,
    config: AviciConfig = AviciConfig(),
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Edge logits f32[..., d, d] of raw history data f32[..., N, d, 2], mask bool[..., N].

    Standardises channel 0 per `config.standardization` (padding-aware). Dropout is
    active only when `dropout_key` is given. The diagonal is not masked. Jitted
    (config static); calling it inside another jit or vmap is fine.
    """
    mask = _check_inputs(data, mask)
    return _edge_logits(params, data, mask, config, dropout_key)


@functools.partial(jax.jit, static_argnames=("config",))
def _edge_logits(params, data, mask, config, dropout_key):
    x = standardize(data.astype(jnp.float32), mask, config.standardization)
    deterministic = dropout_key is None
    rngs = None if deterministic else {"dropout": dropout_key}
    return AviciNet(config).apply({"params": params}, x, mask, deterministic, rngs=rngs)


def mask_diagonal(mat: jax.Array, value: float) -> jax.Array:
    """mat f32[..., d, d] with its diagonal set to `value`."""
    d = mat.shape[-1]
    return jnp.where(jnp.eye(d, dtype=bool), jnp.asarray(value, mat.dtype), mat)


def edge_probs(
    params: Params,
    data: jax.Array,
    mask: jax.Array | None = None,
    config: AviciConfig = AviciConfig(),
) -> jax.Array:
    """Edge probabilities p_ij = P(i -> j | data), f32[..., d, d]; p_ii = 0 if mask_diag.

    Matmuls in full float32 on every backend (GPUs default to TF32): the CAASL step
    reward is a difference of ~0.1 between sums of d^2 of these probabilities. On CPU
    this changes nothing (bit for bit); training (`edge_logits`) keeps the default.
    """
    with jax.default_matmul_precision("float32"):
        p = jax.nn.sigmoid(edge_logits(params, data, mask, config))
    return mask_diagonal(p, 0.0) if config.mask_diag else p


def param_count(params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class AviciModel:
    """Convenience bundle of a config with the functions above.

    >>> from caasl_jax.envs import make_env
    >>> env = make_env("linear-d5")
    >>> history, _ = env.reset(jax.random.key(1), env.sample_params(jax.random.key(2)))
    >>> model = AviciModel(AviciConfig(dim=32, layers=1, heads=2, key_size=8))
    >>> params = model.init(jax.random.key(0), d=5)
    >>> probs = model.edge_probs(params, history.data, history.mask)   # f32[5, 5]
    """

    config: AviciConfig = AviciConfig()

    def init(self, key: jax.Array, d: int) -> Params:
        return init_params(key, self.config, d)

    def edge_logits(self, params, data, mask=None, *, dropout_key=None):
        return edge_logits(params, data, mask, self.config, dropout_key=dropout_key)

    def edge_probs(self, params, data, mask=None):
        return edge_probs(params, data, mask, self.config)


def _shape_table(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(jnp.shape(leaf)) for path, leaf in leaves}


def check_params(params: Params, config: AviciConfig) -> None:
    """Raise ValueError naming the first parameter that `config` does not imply."""
    expected = _shape_table(jax.eval_shape(lambda: init_params(jax.random.key(0), config, 3)))
    got = _shape_table(params)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            f"parameters do not match {config}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, shape in expected.items():
        if got[name] != shape:
            raise ValueError(f"parameter {name} has shape {got[name]}, the config implies {shape}")
