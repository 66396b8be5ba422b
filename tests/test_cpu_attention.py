"""The fused CPU attention kernel (caasl_jax/kernels) against the pure-JAX attention."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from caasl_jax.agents import networks
from caasl_jax.agents.networks import Encoder, EncoderConfig, SelfAttention, softmax_attention
from caasl_jax.kernels import cpu_attention

ATOL = 2e-6


def test_kernel_builds_where_a_compiler_exists():
    """CI has a compiler: the kernel must build there, not quietly fall back."""
    if cpu_attention._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_attention.available(), cpu_attention.unavailable_reason()
    assert cpu_attention.use_for_current_backend()


def _heads_first(q, k, v, key_mask=None, drop_scale=None):
    """The networks' pure-JAX attention on heads-last operands [..., L, H, C]."""
    mask = None if key_mask is None else key_mask[..., None, None, :]
    out = softmax_attention(
        jnp.swapaxes(q, -3, -2), jnp.moveaxis(k, -3, -1), jnp.swapaxes(v, -3, -2), mask,
        drop_scale,
    )  # fmt: skip
    return jnp.swapaxes(out, -3, -2)


def _operands(seed, lead, s, t, heads, width, masked, dropped):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (*lead, s, heads, width))
    k = jax.random.normal(ks[1], (*lead, t, heads, width))
    v = jax.random.normal(ks[2], (*lead, t, heads, width))
    key_mask = None
    if masked:  # ragged masks, one entry with every key masked
        key_mask = jax.random.bernoulli(ks[3], 0.7, (*lead, t)).at[..., 0].set(False)
        key_mask = key_mask.reshape(-1, t).at[0].set(False).reshape(*lead, t)
    drop_scale = None
    if dropped:
        keep = jax.random.bernoulli(ks[4], 0.8, (*lead, heads, s, t))
        drop_scale = jnp.where(keep, 1 / 0.8, 0.0)
    cotangent = jax.random.normal(ks[5], q.shape)
    return q, k, v, key_mask, drop_scale, cotangent


SHAPES = [  # (leading dims, S, T, heads, width): the encoders' two axes, odd sizes
    ((2, 3), 60, 60, 8, 4),
    ((4, 5), 10, 10, 8, 4),
    ((3,), 17, 33, 2, 3),
    ((), 1, 5, 1, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
def test_kernel_matches_jax_attention_and_its_gradient(shape, masked, dropped):
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    lead, s, t, heads, width = shape
    q, k, v, key_mask, drop_scale, cotangent = _operands(
        len(lead) + s, lead, s, t, heads, width, masked and t > 1, dropped
    )

    def loss(attention):
        return lambda *qkv: jnp.sum(attention(*qkv, key_mask, drop_scale) * cotangent)

    got_value, got = jax.value_and_grad(loss(cpu_attention.attention), (0, 1, 2))(q, k, v)
    want_value, want = jax.value_and_grad(loss(_heads_first), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        cpu_attention.attention(q, k, v, key_mask, drop_scale),
        _heads_first(q, k, v, key_mask, drop_scale),
        atol=ATOL,
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5 * ATOL)


def test_fully_masked_row_attends_uniformly_without_query_gradient():
    """Every key masked: the weights are uniform (as the plain formula gives with the
    lowest-float logits) and the logits are constants, so q and k get no gradient."""
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    q, k, v, _, _, cotangent = _operands(1, (2,), 5, 5, 2, 4, False, False)
    none = jnp.zeros((2, 5), bool)
    out = cpu_attention.attention(q, k, v, none)
    uniform = jnp.broadcast_to(v.mean(-3, keepdims=True), out.shape)
    np.testing.assert_allclose(out, uniform, atol=1e-6)
    np.testing.assert_allclose(_heads_first(q, k, v, none), uniform, atol=1e-6)

    def grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, none) * cotangent)
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    (dq, dk, dv), (_, _, dv_jax) = grads(cpu_attention.attention), grads(_heads_first)
    np.testing.assert_array_equal(dq, 0.0)
    np.testing.assert_array_equal(dk, 0.0)
    np.testing.assert_allclose(dv, dv_jax, atol=1e-6)
    np.testing.assert_array_equal(grads(_heads_first)[0], 0.0)  # the JAX path agrees


def test_kernel_under_vmap_jit_and_shard_map():
    """Batched by vmap, compiled once, and inside shard_map with gradients averaged over
    the mesh (the trainer's form): the same numbers as the unbatched kernel."""
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    q, k, v, key_mask, _, cotangent = _operands(2, (4,), 12, 12, 2, 4, True, False)
    one = jax.jit(lambda q, k, v, m: cpu_attention.attention(q, k, v, m))
    batched = jax.vmap(one)(q, k, v, key_mask)
    for i in range(4):
        np.testing.assert_allclose(batched[i], one(q[i], k[i], v[i], key_mask[i]), atol=1e-6)
    assert one._cache_size() == 1  # the four per-example calls: one trace, one compile

    def grad_q(q):
        loss = lambda q: jnp.sum(cpu_attention.attention(q, k, v, key_mask) * cotangent)
        return jax.grad(loss)(q)

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            lambda q: jax.lax.pmean(grad_q(q), "data"), mesh=mesh, in_specs=P(), out_specs=P()
        )
    )
    np.testing.assert_allclose(sharded(q), grad_q(q), atol=1e-6)


def test_encoder_same_on_both_attention_paths(monkeypatch):
    """A whole encoder (both axes, padding, dropout on) through the kernel and through
    the pure-JAX attention (`CAASL_CPU_KERNELS=off`): outputs and parameter gradients
    agree to float32 rounding."""
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    encoder = Encoder(EncoderConfig(dim=16, num_layers=2, num_heads=4, dropout=0.1), False)
    data = jax.random.normal(jax.random.key(0), (3, 12, 5, 2))
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [7], [1]])
    params = encoder.init(jax.random.key(1), data, mask)
    rngs = {"dropout": jax.random.key(2)}

    def run():
        def loss(p):
            return jnp.sum(jnp.sin(encoder.apply(p, data, mask, rngs=rngs)))

        return jax.value_and_grad(loss)(params)

    fused_value, fused_grads = run()
    monkeypatch.setenv(cpu_attention.SWITCH, "off")
    assert not cpu_attention.use_for_current_backend()
    plain_value, plain_grads = run()
    np.testing.assert_allclose(fused_value, plain_value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), fused_grads, plain_grads)


def test_self_attention_layer_uses_the_kernel_on_cpu(monkeypatch):
    """SelfAttention traces the custom call on the CPU and the pure-JAX code when the
    switch is off (then no custom call is in the program)."""
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    layer = SelfAttention(num_heads=2, dropout=0.0, deterministic=True)
    x = jnp.ones((6, 8))
    params = layer.init(jax.random.key(0), x)
    assert "caasl_attention_forward" in jax.jit(layer.apply).lower(params, x).as_text()
    monkeypatch.setenv(cpu_attention.SWITCH, "off")
    assert "caasl_attention" not in jax.jit(layer.apply).lower(params, x).as_text()
    assert networks.cpu_attention is cpu_attention


def test_other_float_types_use_the_jax_attention_and_the_kernel_names_them():
    """The kernel is float32 only: a bfloat16 network traces the pure-JAX attention,
    and a direct call names the type instead of failing inside XLA."""
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    assert not cpu_attention.use_for_current_backend(jnp.bfloat16)
    layer = SelfAttention(num_heads=2, dropout=0.0, deterministic=True)
    x = jnp.ones((6, 8), jnp.bfloat16)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), layer.init(jax.random.key(0), x))
    assert layer.apply(params, x).dtype == jnp.bfloat16
    assert "caasl_attention" not in jax.jit(layer.apply).lower(params, x).as_text()
    q = jnp.ones((5, 2, 4), jnp.bfloat16)
    with pytest.raises(TypeError, match="q must be float32, got bfloat16"):
        cpu_attention.attention(q, q, q)
    f = jnp.ones((5, 2, 4))
    with pytest.raises(ValueError, match="heads and width"):
        cpu_attention.attention(f, jnp.ones((5, 2, 3)), jnp.ones((5, 2, 3)))


def test_broadcast_dropout_scale_matches_jax_attention():
    if not cpu_attention.available():
        pytest.skip(cpu_attention.unavailable_reason())
    q, k, v, *_ = _operands(3, (2,), 5, 6, 2, 4, masked=False, dropped=False)
    drop = jax.random.uniform(jax.random.key(9), (1, 5, 6)) * 2.0  # one mask for all heads
    np.testing.assert_allclose(
        cpu_attention.attention(q, k, v, None, drop), _heads_first(q, k, v, None, drop),
        atol=ATOL,
    )  # fmt: skip


def test_library_name_depends_on_the_machine(monkeypatch, tmp_path):
    """A kernel folder shared by machines (CAASL_KERNEL_CACHE on a shared home) never
    hands one CPU's -march=native library to another."""
    from caasl_jax import compile_cache

    monkeypatch.setenv(cpu_attention.KERNEL_CACHE, str(tmp_path))
    here = cpu_attention._library_path("c++")
    monkeypatch.setattr(compile_cache, "this_machine_tag", lambda: "x86_64-other-cpu")
    assert cpu_attention._library_path("c++") != here
    assert here.parent == tmp_path


def test_damaged_cached_library_is_rebuilt(tmp_path):
    """A truncated or foreign file where the library should be is rebuilt, not left to
    disable the kernel in every later process."""
    if cpu_attention._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    script = (
        "from caasl_jax.kernels import cpu_attention as c\n"
        "path = c._library_path(c._compiler())\n"
        "path.parent.mkdir(parents=True, exist_ok=True)\n"
        "path.write_bytes(b'not a shared library')\n"
        "assert c.available(), c.unavailable_reason()\n"
        "assert path.read_bytes()[:4] == b'\\x7fELF'\n"
        "print('ok')\n"
    )
    env = {**os.environ, cpu_attention.KERNEL_CACHE: str(tmp_path / "kernels")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_failed_build_names_the_command(tmp_path):
    """A compiler that fails: the error names the command and keeps nothing behind."""
    with pytest.raises(RuntimeError, match="false .*-march=native.*failed"):
        cpu_attention._build("false", tmp_path / "kernels" / "attention-x.so")
    assert list((tmp_path / "kernels").iterdir()) == []


def test_no_compiler_falls_back_to_jax(tmp_path):
    """Without a compiler (PATH emptied, CXX unset) the kernel is unavailable with the
    reason, a network still runs, on the pure-JAX attention, and one warning says why."""
    script = (
        "from caasl_jax.kernels import cpu_attention as c\n"
        "import jax, jax.numpy as jnp\n"
        "from caasl_jax.agents.networks import SelfAttention\n"
        "import warnings\n"
        "assert not c.available() and 'no C++ compiler' in c.unavailable_reason()\n"
        "layer = SelfAttention(num_heads=2, dropout=0.0, deterministic=True)\n"
        "x = jnp.ones((6, 8))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    p = layer.init(jax.random.key(0), x)\n"
        "    assert 'caasl_attention' not in jax.jit(layer.apply).lower(p, x).as_text()\n"
        "    jax.jit(layer.apply).lower(p, jnp.ones((5, 8)))  # a second trace: no second warning\n"
        "said = [str(w.message) for w in caught if 'attention kernel' in str(w.message)]\n"
        "assert len(said) == 1 and 'no C++ compiler' in said[0], said\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(tmp_path), CAASL_KERNEL_CACHE=str(tmp_path / "kernels"))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    assert shutil.which("c++", path=str(tmp_path)) is None
