"""Networks: symmetries, masking, tanh-Gaussian log-probs, action layout, Q pairing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.agents.networks import (
    CriticConfig,
    CriticEnsemble,
    Encoder,
    EncoderConfig,
    Policy,
    PolicyConfig,
    SelfAttention,
    masked_max_pool,
    mode_action,
    paper_configs,
    policy_distribution,
    sample_action,
    softmax_attention,
    to_env_action,
    to_per_variable,
)

ENC = EncoderConfig(dim=8, num_layers=2, num_heads=2, ffn_multiplier=2, dropout=0.0)
N, D, LENGTH = 7, 4, 5
ATOL = 2e-5


def make_history(seed=0, n=N, d=D, length=LENGTH):
    data = jax.random.normal(jax.random.key(seed), (n, d, 2))
    data = data.at[..., 1].set((data[..., 1] > 0).astype(jnp.float32))
    mask = jnp.arange(n) < length
    return data, mask


class Jitted:
    """A module whose apply/init are jitted (eager flax is slow on a busy CPU)."""

    def __init__(self, module):
        self.module = module
        self.config = module.config
        self.apply = jax.jit(module.apply, static_argnames="deterministic")
        self.init = jax.jit(module.init)


@pytest.fixture(scope="module")
def encoder():
    enc = Encoder(ENC)
    data, mask = make_history()
    params = jax.jit(enc.init)(jax.random.key(1), data, mask)
    return Jitted(enc), params


def test_encoder_equivariant_to_variable_order(encoder):
    enc, params = encoder
    data, mask = make_history()
    perm = jnp.array([2, 0, 3, 1])
    out = enc.apply(params, data, mask)
    assert out.shape == (D, ENC.dim)
    out_perm = enc.apply(params, data[:, perm], mask)
    np.testing.assert_allclose(out_perm, out[perm], atol=ATOL)


def test_encoder_invariant_to_sample_order(encoder):
    enc, params = encoder
    data, mask = make_history()
    perm = jnp.array([4, 6, 0, 2, 5, 1, 3])  # mixes valid and padded rows
    out = enc.apply(params, data, mask)
    np.testing.assert_allclose(enc.apply(params, data[perm], mask[perm]), out, atol=ATOL)


def test_padding_content_changes_nothing(encoder):
    enc, params = encoder
    data, mask = make_history()
    out = enc.apply(params, data, mask)
    junk = data.at[LENGTH:].set(1e3 * jax.random.normal(jax.random.key(9), (N - LENGTH, D, 2)))
    np.testing.assert_array_equal(enc.apply(params, junk, mask), out)
    # and padding is not treated as data: dropping the padded rows gives the same
    np.testing.assert_allclose(enc.apply(params, data[:LENGTH], mask[:LENGTH]), out, atol=ATOL)
    # while a valid row does matter
    changed = data.at[0, 0, 0].add(1.0)
    assert not np.allclose(enc.apply(params, changed, mask), out)


def test_log2_cpm_inputs_ignore_library_size_and_padding():
    """SERGIO counts: the encoder reads log2-CPM values, so a cell sequenced twice as deep
    (every count doubled) is the same cell; padded rows still change nothing."""
    enc = Encoder(EncoderConfig(dim=8, num_layers=1, num_heads=2, input_standardization="log2_cpm"))
    apply = jax.jit(enc.apply)
    data, mask = make_history()
    counts = jnp.floor(50.0 * jnp.abs(data[..., 0]))  # zeros included (dropouts)
    data = data.at[..., 0].set(counts)
    params = jax.jit(enc.init)(jax.random.key(1), data, mask)
    out = apply(params, data, mask)
    deeper = data.at[2, :, 0].multiply(2.0)
    np.testing.assert_allclose(apply(params, deeper, mask), out, atol=ATOL)
    junk = data.at[LENGTH:, :, 0].set(1e6)
    np.testing.assert_array_equal(apply(params, junk, mask), out)
    assert not np.allclose(apply(params, data.at[0, 1, 0].add(40.0), mask), out)
    assert paper_configs("sergio")[0].encoder.input_standardization == "log2_cpm"
    assert paper_configs("linear")[1].encoder.input_standardization == "none"


def test_encoder_batched_matches_single(encoder):
    enc, params = encoder
    d1, m1 = make_history(0, length=3)
    d2, m2 = make_history(1, length=7)
    out = enc.apply(params, jnp.stack([d1, d2]), jnp.stack([m1, m2]))
    np.testing.assert_allclose(out[0], enc.apply(params, d1, m1), atol=ATOL)
    np.testing.assert_allclose(out[1], enc.apply(params, d2, m2), atol=ATOL)


def _reference_attention(params, x, key_mask, keep=None, rate=0.0):
    """Plain multi-head attention: softmax weights (dropped by `keep`, scaled) times values."""
    p = params["params"]
    q = jnp.einsum("sd,dhc->hsc", x, p["query"]["kernel"]) + p["query"]["bias"][:, None]
    k = jnp.einsum("sd,dhc->hsc", x, p["key"]["kernel"])
    v = jnp.einsum("sd,dhc->hsc", x, p["value"]["kernel"]) + p["value"]["bias"][:, None]
    drop_scale = None if keep is None else jnp.where(keep, 1.0 / (1.0 - rate), 0.0)
    out = _plain_attention(q, jnp.swapaxes(k, -1, -2), v, key_mask, drop_scale)
    out = jnp.swapaxes(out, 0, 1)  # [S, H, C]
    return jnp.einsum("shc,hcd->sd", out, p["out"]["kernel"]) + p["out"]["bias"]


def test_self_attention_matches_plain_softmax_attention(monkeypatch):
    """The row-sum division after the value product (networks.SelfAttention) is the
    usual softmax attention, with padded keys ignored and dropout on the weights."""
    import flax.linen as nn

    from caasl_jax.agents import networks

    x = jax.random.normal(jax.random.key(3), (6, 8))
    key_mask = jnp.arange(6) < 4
    layer = SelfAttention(num_heads=2, dropout=0.0, deterministic=True)
    params = layer.init(jax.random.key(4), x, key_mask)
    got = layer.apply(params, x, key_mask)
    np.testing.assert_allclose(got, _reference_attention(params, x, key_mask), atol=ATOL)

    # dropout with a known mask: it must act on the normalised weights
    keep = jax.random.bernoulli(jax.random.key(5), 0.75, (2, 6, 6))

    class FixedMaskDropout(nn.Module):
        rate: float
        deterministic: bool = False

        def keep_scale(self, shape, dtype):
            assert shape == keep.shape
            return jnp.where(keep, 1.0 / (1.0 - self.rate), 0.0).astype(dtype)

    monkeypatch.setattr(networks, "HashDropout", FixedMaskDropout)
    dropped = SelfAttention(num_heads=2, dropout=0.25, deterministic=False)
    got = dropped.apply(params, x, key_mask)
    want = _reference_attention(params, x, key_mask, keep=keep, rate=0.25)
    np.testing.assert_allclose(got, want, atol=ATOL)


def _plain_attention(q, kt, v, key_mask, drop_scale):
    logits = q @ kt / jnp.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, -1)
    return (weights if drop_scale is None else weights * drop_scale) @ v


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
def test_softmax_attention_gradient_matches_autodiff(masked, dropped):
    """The hand-written backward pass of `softmax_attention` is the gradient of plain
    softmax attention, with padded keys and dropout of the weights."""
    ks = jax.random.split(jax.random.key(11), 5)
    q = jax.random.normal(ks[0], (3, 2, 7, 4))  # [batch, heads, S, C]
    kt = jax.random.normal(ks[1], (3, 2, 4, 7))
    v = jax.random.normal(ks[2], (3, 2, 7, 4))
    cotangent = jax.random.normal(ks[3], (3, 2, 7, 4))
    key_mask = (jnp.arange(7) < 5)[None, None, None, :] if masked else None
    keep = jax.random.bernoulli(ks[4], 0.75, (3, 2, 7, 7))
    drop_scale = jnp.where(keep, 1 / 0.75, 0.0) if dropped else None

    def loss(attention):
        return lambda *qkv: jnp.sum(attention(*qkv, key_mask, drop_scale) * cotangent)

    got_value, got = jax.value_and_grad(loss(softmax_attention), (0, 1, 2))(q, kt, v)
    want_value, want = jax.value_and_grad(loss(_plain_attention), (0, 1, 2))(q, kt, v)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=ATOL)


def test_masked_max_pool():
    x = jnp.arange(3 * 2 * 1, dtype=jnp.float32).reshape(3, 2, 1)
    pooled = masked_max_pool(x, jnp.array([True, True, False]))
    np.testing.assert_array_equal(pooled, x[1])
    np.testing.assert_array_equal(masked_max_pool(x, jnp.zeros(3, bool)), jnp.zeros((2, 1)))


def test_action_layout_roundtrip():
    action = jnp.arange(2 * D, dtype=jnp.float32)  # targets 0..3, values 4..7
    per_var = to_per_variable(action, "targets_values")
    np.testing.assert_array_equal(per_var[1], jnp.array([1.0, 5.0]))  # (target_1, value_1)
    np.testing.assert_array_equal(to_env_action(per_var), action)
    assert to_per_variable(action[:D], "targets").shape == (D, 1)
    with pytest.raises(ValueError, match="multiple"):
        to_per_variable(jnp.zeros(5), "targets_values")


@functools.lru_cache
def policy_setup(kind="targets_values", dropout=0.0, **kw):
    cfg = PolicyConfig(
        encoder=EncoderConfig(dim=8, num_layers=1, num_heads=2, ffn_multiplier=2, dropout=dropout),
        hidden=(16,),
        action_kind=kind,
        **kw,
    )
    pol = Jitted(Policy(cfg))
    data, mask = make_history()
    return pol, pol.init(jax.random.key(3), data, mask), data, mask


_sample = jax.jit(sample_action, static_argnums=0, static_argnames="deterministic")


def jitted_sample(pol, params, key, data, mask, **kw):
    return _sample(pol.module, params, key, data, mask, **kw)


def hand_log_prob(action_per_var, mean, log_std):
    u = np.arctanh(np.asarray(action_per_var, np.float64))
    mean, std = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
    normal = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return np.sum(normal - np.log(1 - np.tanh(u) ** 2))


@pytest.mark.parametrize("kind,k", [("targets_values", 2), ("targets", 1)])
def test_policy_samples_and_log_probs(kind, k):
    pol, params, data, mask = policy_setup(kind)
    batch = jnp.stack([data] * 16)
    masks = jnp.stack([mask] * 16)
    action, log_prob = jitted_sample(pol, params, jax.random.key(5), batch, masks)
    assert action.shape == (16, k * D) and log_prob.shape == (16,)
    assert np.all(np.abs(np.asarray(action)) <= 1.0)
    mean, log_std = pol.apply(params, data, mask)
    for a, lp in zip(np.asarray(action), np.asarray(log_prob), strict=True):
        per_var = np.asarray(to_per_variable(jnp.asarray(a), kind))
        if np.abs(per_var).max() > 0.999:  # atanh is ill-conditioned at the edges
            continue
        np.testing.assert_allclose(lp, hand_log_prob(per_var, mean, log_std), rtol=1e-3)
    # distrax's own log_prob agrees at a fixed point
    point = 0.3 * jnp.ones((D, k))
    np.testing.assert_allclose(
        policy_distribution(mean, log_std).log_prob(point),
        hand_log_prob(point, mean, log_std),
        rtol=1e-4,
    )


def test_log_std_is_clipped():
    pol, params, data, mask = policy_setup(log_std_min=-0.1, log_std_max=0.1)
    params = jax.tree.map(lambda x: 50.0 * x, params)
    _, log_std = pol.apply(params, data, mask)
    np.testing.assert_allclose(np.abs(np.asarray(log_std)), 0.1, rtol=1e-6)


def test_deterministic_mode():
    pol, params, data, mask = policy_setup(dropout=0.5)
    off1 = pol.apply(params, data, mask, deterministic=True)
    off2 = pol.apply(params, data, mask, deterministic=True)
    np.testing.assert_array_equal(off1[0], off2[0])
    on1 = pol.apply(params, data, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    on2 = pol.apply(params, data, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(on1[0], on2[0])
    # acting: dropout off by default -> same key, same action whatever the dropout stream
    a1, _ = jitted_sample(pol, params, jax.random.key(7), data, mask)
    a2, _ = jitted_sample(pol, params, jax.random.key(7), data, mask)
    np.testing.assert_array_equal(a1, a2)
    mode = jax.jit(mode_action, static_argnums=0)(pol.module, params, data, mask)
    np.testing.assert_allclose(mode, jnp.tanh(to_env_action(off1[0])))


def test_policy_any_d():
    pol, params, _, _ = policy_setup()
    for d in (2, 9):
        data, mask = make_history(d=d)
        action, _ = jitted_sample(pol, params, jax.random.key(0), data, mask)
        assert action.shape == (2 * d,)


@functools.lru_cache
def critic_setup(kind="targets_values", n=3):
    enc = EncoderConfig(dim=8, num_layers=1, num_heads=2, ffn_multiplier=2)
    cfg = CriticConfig(encoder=enc, hidden=(16,), action_kind=kind, num_critics=n)
    critic = Jitted(CriticEnsemble(cfg))
    data, mask = make_history()
    k = 2 if kind == "targets_values" else 1
    action = jax.random.uniform(jax.random.key(4), (k * D,), minval=-1, maxval=1)
    return critic, critic.init(jax.random.key(6), data, mask, action), data, mask, action


def test_critic_ensemble_shapes_and_independence():
    critic, params, data, mask, action = critic_setup()
    q = critic.apply(params, data, mask, action)
    assert q.shape == (3,)
    assert len(set(np.round(np.asarray(q), 5).tolist())) == 3  # distinct critics
    qb = critic.apply(params, jnp.stack([data] * 5), jnp.stack([mask] * 5), jnp.stack([action] * 5))
    assert qb.shape == (3, 5)
    np.testing.assert_allclose(qb[:, 2], q, atol=ATOL)


def test_q_pairs_each_variable_with_its_own_target_and_value():
    critic, params, data, mask, action = critic_setup()
    q = critic.apply(params, data, mask, action)
    perm = jnp.array([3, 1, 0, 2])
    targets, values = action[:D], action[D:]
    permuted_action = jnp.concatenate([targets[perm], values[perm]])
    # permuting the variables together with their (target_i, value_i) leaves Q unchanged
    np.testing.assert_allclose(
        critic.apply(params, data[:, perm], mask, permuted_action), q, atol=1e-4
    )
    # permuting the variables but not the action pairs changes Q
    assert not np.allclose(critic.apply(params, data[:, perm], mask, action), q, atol=1e-3)
    # swapping the values of two variables (targets kept) changes Q
    swapped = action.at[D + 0].set(action[D + 1]).at[D + 1].set(action[D + 0])
    assert not np.allclose(critic.apply(params, data, mask, swapped), q, atol=1e-3)


def test_q_targets_only_kind_and_padding():
    critic, params, data, mask, action = critic_setup(kind="targets")
    q = critic.apply(params, data, mask, action)
    junk = data.at[LENGTH:].set(123.0)
    np.testing.assert_array_equal(critic.apply(params, junk, mask, action), q)


def test_paper_sizes():
    pol_cfg, critic_cfg = paper_configs("linear")
    assert (pol_cfg.encoder.dim, pol_cfg.encoder.num_layers, pol_cfg.encoder.num_heads) == (
        32,
        4,
        8,
    )
    assert pol_cfg.encoder.ffn_multiplier == 4 and critic_cfg.encoder.ffn_multiplier == 2
    assert pol_cfg.encoder.dropout == 0.1 and pol_cfg.hidden == (128, 128)
    sergio_pol, sergio_critic = paper_configs("sergio")
    assert sergio_pol.encoder.num_layers == 3 and sergio_critic.action_kind == "targets"


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: EncoderConfig(dim=30, num_heads=8), "divisible"),
        (lambda: EncoderConfig(dropout=1.0), "dropout"),
        (lambda: EncoderConfig(input_standardization="log"), "input_standardization must be"),
        (lambda: PolicyConfig(action_kind="values"), "action_kind"),
        (lambda: PolicyConfig(log_std_min=1.0, log_std_max=0.0), "log_std_min"),
        (lambda: CriticConfig(num_critics=0), "num_critics"),
        (lambda: CriticConfig(hidden=[128]), "hidden"),
        (lambda: paper_configs("foo"), "linear"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()
