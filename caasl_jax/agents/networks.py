"""Policy and Q-function networks of CAASL (paper section 3.2, appendix D).

Both the policy and every critic encode a history with their own
alternating-attention transformer:

    data f32[..., N, d, 2], mask bool[..., N]
      -> Dense 2 -> D                         (padded rows are zeroed first)
      -> L x [ pre-norm block over the d variables (per sample row),
               pre-norm block over the N samples  (per variable, padded rows masked) ]
      -> LayerNorm -> max-pool over the valid samples  -> f32[..., d, D]

The encoding is equivariant to the order of the variables and invariant to the order
of the samples and to whatever the padded rows (mask False) contain: padded rows are
zeroed before the embedding, never attended to, and left out of the pool. (The public
release attended to padding rows; we do not.)

Action layouts (as the environments expect them):
  * ``'targets_values'`` (linear SCM): f32[2d] = (targets a_0..a_{d-1}, values a_d..a_{2d-1});
  * ``'targets'`` (SERGIO): f32[d] = targets.
Per variable the networks work on f32[..., d, k] with k = 2 (target_i, value_i) or
k = 1 (target_i); `to_per_variable` / `to_env_action` convert between the two layouts.

The policy is a per-variable tanh-Gaussian (event shape [d, k]); the Q head pairs
variable i's encoding with variable i's OWN action entries (target_i, value_i) -- the
release paired (a_2i, a_2i+1), which mixes targets and values of different variables.
Nothing depends on d, so a trained network applies to any number of variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import chex
import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from caasl_jax.checks import check_positive_int
from caasl_jax.dropout import HashDropout
from caasl_jax.kernels import cpu_attention
from caasl_jax.reward.standardize import STANDARDIZERS, standardize

ACTION_KINDS = ("targets_values", "targets")


def _check_action_kind(cls: str, kind: str) -> None:
    if kind not in ACTION_KINDS:
        raise ValueError(f"{cls}: action_kind must be one of {ACTION_KINDS}, got {kind!r}")


def _check_hidden(cls: str, hidden: Sequence[int]) -> None:
    if not isinstance(hidden, tuple) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise ValueError(f"{cls}: hidden must be a tuple of positive integers, got {hidden!r}")


# ----------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Alternating-attention history encoder.

    dim: width D of every token (32 in the paper); num_layers: L alternating layers
    (4 linear, 3 SERGIO); num_heads: attention heads (dim must divide by it);
    ffn_multiplier: feed-forward width = ffn_multiplier * dim (4 policy, 2 Q);
    dropout: rate on attention weights and residual branches (used only when the
    module is called with deterministic=False); input_standardization: of the values
    before the embedding, "none" (linear SCMs, as in the release) or one of the reward
    model's padding-aware standardisations, "log2_cpm" for SERGIO's counts (the
    release's SERGIO histories are log2-CPM normalised) or "zscore".
    """

    dim: int = 32
    num_layers: int = 4
    num_heads: int = 8
    ffn_multiplier: int = 4
    dropout: float = 0.0
    input_standardization: str = "none"

    def __post_init__(self):
        check_positive_int("EncoderConfig", "dim", self.dim)
        check_positive_int("EncoderConfig", "num_layers", self.num_layers, minimum=0)
        check_positive_int("EncoderConfig", "num_heads", self.num_heads)
        check_positive_int("EncoderConfig", "ffn_multiplier", self.ffn_multiplier)
        if self.dim % self.num_heads:
            raise ValueError(
                f"EncoderConfig: dim ({self.dim}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig: dropout must be in [0, 1), got {self.dropout!r}")
        kinds = ("none", *STANDARDIZERS)
        if self.input_standardization not in kinds:
            raise ValueError(
                f"EncoderConfig: input_standardization must be one of {kinds}, "
                f"got {self.input_standardization!r}"
            )


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Tanh-Gaussian design policy.

    encoder: its history encoder (paper: ffn 4x, dropout 0.1); hidden: per-variable
    MLP widths; action_kind: 'targets_values' (linear) or 'targets' (SERGIO);
    log_std_min/max: clip range of the log standard deviation; act_with_dropout:
    whether `sample_action` keeps dropout on when acting (off by default).
    """

    encoder: EncoderConfig = EncoderConfig(ffn_multiplier=4, dropout=0.1)
    hidden: tuple[int, ...] = (128, 128)
    action_kind: str = "targets_values"
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    act_with_dropout: bool = False

    def __post_init__(self):
        _check_action_kind("PolicyConfig", self.action_kind)
        _check_hidden("PolicyConfig", self.hidden)
        if not self.log_std_min < self.log_std_max:
            raise ValueError(
                f"PolicyConfig: log_std_min ({self.log_std_min}) must be < log_std_max "
                f"({self.log_std_max})"
            )

    @property
    def per_variable(self) -> int:
        """k: action entries per variable (2 or 1)."""
        return per_variable_entries(self.action_kind)


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """Ensemble of Q-functions, each with its own encoder.

    encoder: encoder of each critic (paper: ffn 2x, no dropout); hidden: per-variable
    MLP widths; action_kind: as for the policy; num_critics: N of REDQ.
    """

    encoder: EncoderConfig = EncoderConfig(ffn_multiplier=2, dropout=0.0)
    hidden: tuple[int, ...] = (128, 128)
    action_kind: str = "targets_values"
    num_critics: int = 2

    def __post_init__(self):
        _check_action_kind("CriticConfig", self.action_kind)
        _check_hidden("CriticConfig", self.hidden)
        check_positive_int("CriticConfig", "num_critics", self.num_critics)

    @property
    def per_variable(self) -> int:
        return per_variable_entries(self.action_kind)


def paper_configs(env: str, num_critics: int = 2) -> tuple[PolicyConfig, CriticConfig]:
    """Network sizes of the paper / public release for env 'linear' or 'sergio'."""
    if env == "linear":
        layers, kind, inputs = 4, "targets_values", "none"
    elif env == "sergio":
        layers, kind, inputs = 3, "targets", "log2_cpm"
    else:
        raise ValueError(f"paper_configs: env must be 'linear' or 'sergio', got {env!r}")
    encoder = EncoderConfig(num_layers=layers, input_standardization=inputs)
    policy = PolicyConfig(
        encoder=dataclasses.replace(encoder, ffn_multiplier=4, dropout=0.1), action_kind=kind
    )
    critic = CriticConfig(
        encoder=dataclasses.replace(encoder, ffn_multiplier=2, dropout=0.0),
        action_kind=kind,
        num_critics=num_critics,
    )
    return policy, critic


# ----------------------------------------------------------------------------------
# action layout
# ----------------------------------------------------------------------------------


def per_variable_entries(action_kind: str) -> int:
    """k = 2 for 'targets_values', 1 for 'targets'."""
    _check_action_kind("per_variable_entries", action_kind)
    return 2 if action_kind == "targets_values" else 1


def to_per_variable(action: jax.Array, action_kind: str) -> jax.Array:
    """Env layout f32[..., k*d] -> per-variable f32[..., d, k] (row i = (target_i, value_i))."""
    k = per_variable_entries(action_kind)
    if action.shape[-1] % k:
        raise ValueError(
            f"to_per_variable: action size {action.shape[-1]} is not a multiple of {k} "
            f"for action_kind {action_kind!r}"
        )
    d = action.shape[-1] // k
    return jnp.swapaxes(action.reshape(*action.shape[:-1], k, d), -1, -2)


def to_env_action(per_variable: jax.Array) -> jax.Array:
    """Per-variable f32[..., d, k] -> env layout f32[..., k*d] = (all targets, all values)."""
    if per_variable.ndim < 2:
        raise ValueError(f"to_env_action: expected f32[..., d, k], got shape {per_variable.shape}")
    return jnp.swapaxes(per_variable, -1, -2).reshape(*per_variable.shape[:-2], -1)


# ----------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------


def _sqrt_head_dim(q: jax.Array) -> jax.Array:
    """sqrt(C) for queries f32[..., S, C], in q's dtype: attention logits are q k / sqrt(C)."""
    return jnp.sqrt(q.shape[-1]).astype(q.dtype)


def _attention_forward(q, kt, v, key_mask, drop_scale):
    """Softmax attention: q f32[..., S, C], kt f32[..., C, T], v f32[..., T, C] ->
    (out f32[..., S, C], residuals). key_mask bool broadcastable to [..., S, T] or None
    (False: weight 0); drop_scale f32 broadcastable to [..., S, T] or None (dropout of
    the weights, applied after the softmax)."""
    logits = (q @ kt) / _sqrt_head_dim(q)
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
    # the division by the row sums comes after the value product, on [..., S, C]
    # rather than on the [..., S, T] weights (dropout commutes with it): on a CPU the
    # S x T passes are memory-bound, and this saves one of them each way
    unnormalized = jnp.exp(logits - logits.max(-1, keepdims=True))
    row_sums = unnormalized.sum(-1, keepdims=True)  # [..., S, 1]
    weighted = unnormalized if drop_scale is None else unnormalized * drop_scale
    out = (weighted @ v) / row_sums
    return out, (q, kt, v, key_mask, drop_scale, unnormalized, row_sums, out)


@jax.custom_vjp
def softmax_attention(q, kt, v, key_mask=None, drop_scale=None):
    """softmax(q kt / sqrt(C), keys masked) (dropped out) @ v -> f32[..., S, C].

    Shapes as `_attention_forward`. The gradient is written by hand so that every
    product in it has the layout XLA's CPU backend hands to its fast (YNNPACK) batched
    matmul, [..., M, K] @ [..., K, N]. Autodiff's own transposes contract the leading
    axis of the left operand (dv = w^T g, dk = dlogits^T q), which that backend runs in
    its generic loop emitter, about 10x slower on these 4-wide heads. No gradient flows
    to key_mask or drop_scale.
    """
    return _attention_forward(q, kt, v, key_mask, drop_scale)[0]


def _attention_fwd(q, kt, v, key_mask, drop_scale):
    return _attention_forward(q, kt, v, key_mask, drop_scale)


def _attention_bwd(residuals, g):
    q, kt, v, key_mask, drop_scale, unnormalized, row_sums, out = residuals
    weighted = unnormalized if drop_scale is None else unnormalized * drop_scale

    def t(x):  # a materialised transpose: XLA must not fold it into a product
        barrier = jax.lax.optimization_barrier
        return barrier(jnp.swapaxes(barrier(x), -1, -2))

    g = g / row_sums  # gradient of (weighted @ v), [..., S, C]
    d_row_sums = -jnp.sum(g * out, -1, keepdims=True)  # times 1 / row_sums, [..., S, 1]
    dv = t(t(g) @ weighted)  # [..., C, S] @ [..., S, T] -> [..., T, C]
    d_weighted = g @ t(v)  # [..., S, T]
    d_unnormalized = d_weighted if drop_scale is None else d_weighted * drop_scale
    # exp's derivative; the max shift cancels between numerator and row sums
    d_logits = (d_unnormalized + d_row_sums) * unnormalized / _sqrt_head_dim(q)
    if key_mask is not None:  # masked logits are constants (matters when all keys are)
        d_logits = jnp.where(key_mask, d_logits, 0.0)
    dq = d_logits @ t(kt)  # [..., S, T] @ [..., T, C]
    dkt = t(q) @ d_logits  # [..., C, S] @ [..., S, T]
    return dq, dkt, dv, None, None


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class SelfAttention(nn.Module):
    """Multi-head self-attention over axis -2 of x f32[..., S, D].

    key_mask: optional bool broadcastable to [..., S]; keys with False get zero weight.
    The key projection has no bias: it would add q . b_k to every logit of a query,
    which the softmax ignores, so its gradient is pure rounding noise (that Adam would
    amplify into +-lr steps and break device-count invariance of training).
    """

    num_heads: int
    dropout: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        heads = (self.num_heads, head_dim)
        q = nn.DenseGeneral(heads, name="query")(x)  # [..., S, H, C]
        k = nn.DenseGeneral(heads, use_bias=False, name="key")(x)
        v = nn.DenseGeneral(heads, name="value")(x)
        drop_scale = None
        if not self.deterministic and self.dropout > 0.0:
            s = x.shape[-2]
            weights_shape = (*x.shape[:-2], self.num_heads, s, s)
            drop_scale = HashDropout(self.dropout).keep_scale(weights_shape, x.dtype)
        if cpu_attention.use_for_current_backend(q.dtype):  # fused kernel, heads in place
            out = cpu_attention.attention(q, k, v, key_mask, drop_scale)
        else:
            # heads-first layout [..., H, S, C] makes both products plain batched
            # matmuls (measured 1.3x faster than einsums over [..., S, H, C] on the CPU)
            q, v = (jnp.swapaxes(t, -3, -2) for t in (q, v))
            kt = jnp.moveaxis(k, -3, -1)  # [..., H, C, S]
            if key_mask is not None:
                key_mask = key_mask[..., None, None, :]
            out = jnp.swapaxes(softmax_attention(q, kt, v, key_mask, drop_scale), -3, -2)
        return nn.DenseGeneral(dim, axis=(-2, -1), name="out")(out)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block over axis -2 of x f32[..., S, D].

    key_mask: optional bool broadcastable to [..., S] -- keys with False are ignored.
    """

    num_heads: int
    ffn_width: int
    dropout: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        dim = x.shape[-1]
        h = nn.LayerNorm()(x)
        h = SelfAttention(self.num_heads, self.dropout, self.deterministic, name="attention")(
            h, key_mask
        )
        x = x + HashDropout(self.dropout, deterministic=self.deterministic)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.ffn_width)(h)
        h = nn.relu(h)
        h = nn.Dense(dim)(h)
        return x + HashDropout(self.dropout, deterministic=self.deterministic)(h)


class Encoder(nn.Module):
    """Alternating-attention encoder: (data [..., N, d, 2], mask [..., N]) -> [..., d, D]."""

    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, data: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        chex.assert_axis_dimension(data, -1, 2)
        chex.assert_equal_shape_prefix([data, mask], mask.ndim)
        mask = mask.astype(bool)
        if cfg.input_standardization == "none":
            # Padding content must not matter: zero it before anything sees it.
            data = jnp.where(mask[..., :, None, None], data, 0.0)
        else:  # statistics of the valid rows only; padded rows come out as zeros
            data = standardize(data, mask, cfg.input_standardization)
        x = nn.Dense(cfg.dim, name="embed")(data)  # [..., N, d, D]
        for layer in range(cfg.num_layers):
            block = dict(
                num_heads=cfg.num_heads,
                ffn_width=cfg.ffn_multiplier * cfg.dim,
                dropout=cfg.dropout,
                deterministic=self.deterministic,
            )
            # over variables: tokens are the d variables of one sample row
            x = TransformerBlock(**block, name=f"layer{layer}_variables")(x)
            # over samples: tokens are the N rows of one variable; padded rows masked
            xt = jnp.swapaxes(x, -3, -2)  # [..., d, N, D]
            xt = TransformerBlock(**block, name=f"layer{layer}_samples")(
                xt, key_mask=mask[..., None, :]
            )
            x = jnp.swapaxes(xt, -3, -2)
        x = nn.LayerNorm(name="final_norm")(x)
        return masked_max_pool(x, mask)


def masked_max_pool(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over the valid rows: x f32[..., N, d, D], mask bool[..., N] -> f32[..., d, D].

    A history without any valid row pools to zeros.
    """
    chex.assert_equal_shape_prefix([x, mask], mask.ndim)
    valid = mask[..., :, None, None]
    pooled = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-3)
    any_valid = jnp.any(mask, axis=-1)[..., None, None]
    return jnp.where(any_valid, pooled, 0.0)


def _mlp(x: jax.Array, hidden: Sequence[int], prefix: str) -> jax.Array:
    for i, width in enumerate(hidden):
        x = nn.relu(nn.Dense(width, name=f"{prefix}{i}")(x))
    return x


# ----------------------------------------------------------------------------------
# policy
# ----------------------------------------------------------------------------------


class Policy(nn.Module):
    """Per-variable tanh-Gaussian parameters from a history.

    __call__(data f32[..., N, d, 2], mask bool[..., N], deterministic=True)
      -> (mean f32[..., d, k], log_std f32[..., d, k])   (pre-tanh; log_std clipped)
    """

    config: PolicyConfig

    @nn.compact
    def __call__(self, data: jax.Array, mask: jax.Array, deterministic: bool = True):
        cfg = self.config
        h = Encoder(cfg.encoder, deterministic=deterministic, name="encoder")(data, mask)
        h = _mlp(h, cfg.hidden, "head")
        k = cfg.per_variable
        mean = nn.Dense(k, name="mean")(h)
        log_std = nn.Dense(k, name="log_std")(h)
        log_std = jnp.clip(log_std, cfg.log_std_min, cfg.log_std_max)
        return mean, log_std


def policy_distribution(mean: jax.Array, log_std: jax.Array) -> distrax.Distribution:
    """Tanh-Gaussian with event shape [d, k] (batch shape = leading dims of mean)."""
    chex.assert_equal_shape([mean, log_std])
    base = distrax.Normal(mean, jnp.exp(log_std))
    return distrax.Independent(distrax.Transformed(base, distrax.Tanh()), 2)


def sample_action(
    policy: Policy,
    params,
    key: jax.Array,
    data: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample env-layout actions f32[..., k*d] in (-1, 1) and their log-probs f32[...].

    deterministic: dropout off (True) or on (False); default: off unless
    `policy.config.act_with_dropout`. The log-prob is of the per-variable
    tanh-Gaussian (the env layout is a permutation of it, so it is the same).
    """
    if deterministic is None:
        deterministic = not policy.config.act_with_dropout
    sample_key, dropout_key = jax.random.split(key)
    mean, log_std = policy.apply(
        params, data, mask, deterministic=deterministic, rngs={"dropout": dropout_key}
    )
    per_var, log_prob = policy_distribution(mean, log_std).sample_and_log_prob(seed=sample_key)
    return to_env_action(per_var), log_prob


def mode_action(policy: Policy, params, data: jax.Array, mask: jax.Array) -> jax.Array:
    """The deterministic action tanh(mean), env layout f32[..., k*d]; dropout off."""
    mean, _ = policy.apply(params, data, mask, deterministic=True)
    return to_env_action(jnp.tanh(mean))


# ----------------------------------------------------------------------------------
# critics
# ----------------------------------------------------------------------------------


class Critic(nn.Module):
    """One Q-function: Q(h, a) = sum_i MLP([enc_i(h), target_i, value_i]).

    __call__(data f32[..., N, d, 2], mask bool[..., N], action f32[..., k*d]) -> f32[...]
    """

    config: CriticConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, data: jax.Array, mask: jax.Array, action: jax.Array) -> jax.Array:
        cfg = self.config
        enc = Encoder(cfg.encoder, deterministic=self.deterministic, name="encoder")(data, mask)
        per_var = to_per_variable(action, cfg.action_kind)  # [..., d, k]
        chex.assert_equal_shape_prefix([enc, per_var], enc.ndim - 1)
        h = jnp.concatenate([enc, per_var.astype(enc.dtype)], axis=-1)
        h = _mlp(h, cfg.hidden, "head")
        q_per_variable = nn.Dense(1, name="out")(h)[..., 0]  # [..., d]
        return jnp.sum(q_per_variable, axis=-1)


class CriticEnsemble(nn.Module):
    """N independent critics (parameters stacked on a leading axis of size N).

    __call__(data, mask, action, deterministic=True) -> f32[N, ...]
    """

    config: CriticConfig

    @nn.compact
    def __call__(
        self, data: jax.Array, mask: jax.Array, action: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        ensemble = nn.vmap(
            Critic,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.config.num_critics,
        )
        return ensemble(self.config, deterministic=deterministic, name="critics")(
            data, mask, action
        )
