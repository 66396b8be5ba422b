"""The linear-SCM environments, their priors and the registry."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.envs import (
    LinearSCMEnv,
    append_rows,
    empty_history,
    erdos_renyi_dag,
    is_acyclic,
    make_env,
    sample_graph,
    scale_free_dag,
)
from caasl_jax.envs.graphs import erdos_renyi_edge_prob, topological_depth

D = 6


def _action(d, targets, values):
    """f32[2d] action with the given 0/1 targets and values."""
    return jnp.concatenate([jnp.where(jnp.asarray(targets) > 0, 1.0, -1.0), jnp.asarray(values)])


@pytest.fixture(scope="module")
def env():
    return LinearSCMEnv(d=D, n0=8, budget=3)


def test_reset_and_step_shapes(env):
    params = env.sample_params(jax.random.key(0))
    history, state = env.reset(jax.random.key(1), params)
    chex.assert_shape(history.data, (8 + 3, D, 2))
    assert int(history.length) == 8
    assert history.mask.tolist() == [True] * 8 + [False] * 3
    assert float(jnp.abs(history.data[8:]).sum()) == 0.0
    action = _action(D, [1, 0, 0, 0, 0, 1], jnp.full(D, 0.5))
    history, state, reward, done, info = env.step(jax.random.key(2), state, action, params)
    assert int(history.length) == 9 and int(state.step) == 1 and not bool(done)
    np.testing.assert_array_equal(history.data[8, :, 1], [1, 0, 0, 0, 0, 1])
    assert float(reward) == 0.0  # no score function plugged in


def test_budget_ends_episode_and_extra_steps_are_noops(env):
    params = env.sample_params(jax.random.key(0))
    _, state = env.reset(jax.random.key(1), params)
    action = jnp.zeros((2 * D,))
    dones = []
    for i in range(env.budget + 1):
        history, state, _, done, _ = env.step(jax.random.key(10 + i), state, action, params)
        dones.append(bool(done))
    assert dones == [False, False, True, True]
    assert int(history.length) == env.n_rows and int(state.step) == env.budget


def test_a_budget_of_zero_makes_every_step_a_noop():
    env = make_env("linear-d3", n0=1, budget=0, samples_per_step=2)  # no room for 2 rows
    params = env.sample_params(jax.random.key(0))
    history, state = env.reset(jax.random.key(1), params)
    after, _, reward, done, _ = env.step(jax.random.key(2), state, jnp.ones((6,)), params)
    assert bool(done) and float(reward) == 0.0
    np.testing.assert_array_equal(after.data, history.data)
    assert int(after.length) == 1


def test_jit_vmap_over_1000_params_and_single_trace():
    env = make_env("linear-d10")
    keys = jax.random.split(jax.random.key(0), 1000)
    params = jax.vmap(env.sample_params)(keys)
    chex.assert_shape(params.graph, (1000, 10, 10))
    _, states = jax.jit(jax.vmap(env.reset))(keys, params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(keys, states, actions, params):
        return jax.vmap(env.step)(keys, states, actions, params)

    actions = jax.random.uniform(jax.random.key(1), (1000, 20), minval=-1, maxval=1)
    for t in range(3):
        history, states, _, _, _ = step(
            jax.random.split(jax.random.key(t), 1000), states, actions, params
        )
    assert history.length.tolist() == [53] * 1000
    assert jnp.isfinite(history.data).all()


def test_same_key_same_episode():
    env = make_env("linear-ood-hetero-d5", n0=10, budget=4)
    policy = lambda key, history: jax.random.uniform(key, (10,), minval=-1, maxval=1)
    run = jax.jit(lambda key: env.rollout(key, env.sample_params(key), policy))
    (h1, a1, _), (h2, a2, _) = run(jax.random.key(7)), run(jax.random.key(7))
    np.testing.assert_array_equal(h1.data, h2.data)
    np.testing.assert_array_equal(a1, a2)
    h3, _, _ = run(jax.random.key(8))
    assert not np.array_equal(h1.data, h3.data)


def test_reward_is_score_improvement():
    env = LinearSCMEnv(d=3, n0=4, budget=2).with_score(
        lambda h, g: h.length.astype(jnp.float32) * 2.0
    )
    params = env.sample_params(jax.random.key(0))
    _, state = env.reset(jax.random.key(1), params)
    assert float(state.score) == 8.0
    _, state, reward, _, _ = env.step(jax.random.key(2), state, jnp.zeros(6), params)
    assert float(reward) == 2.0


def test_do_intervention_fixes_target_and_leaves_non_descendants():
    env = LinearSCMEnv(d=D)
    # chain 0 -> 1 -> 2, plus an isolated 3 -> 4 edge; node 5 isolated
    graph = jnp.zeros((D, D)).at[0, 1].set(1).at[1, 2].set(1).at[3, 4].set(1)
    params = env.sample_params(jax.random.key(0)).replace(graph=graph, weights=graph * 1.5)
    targets = jnp.zeros(D).at[1].set(1.0)
    n = 20000
    obs = env.simulate(jax.random.key(1), params, jnp.zeros(D), jnp.zeros(D), n)
    do = env.simulate(jax.random.key(2), params, targets, jnp.full(D, 2.0), n)
    assert np.all(np.asarray(do[:, 1]) == 2.0)
    # the child of the target moves to 1.5 * 2, the non-descendants keep their law
    np.testing.assert_allclose(do[:, 2].mean(), 3.0, atol=0.03)
    for j in (0, 3, 4, 5):
        np.testing.assert_allclose(do[:, j].mean(), obs[:, j].mean(), atol=0.03)
        np.testing.assert_allclose(do[:, j].std(), obs[:, j].std(), rtol=0.05)


def test_shift_intervention_adds_to_the_mechanism():
    env = LinearSCMEnv(d=3, intervention="shift")
    graph = jnp.zeros((3, 3)).at[0, 1].set(1)
    params = env.sample_params(jax.random.key(0)).replace(graph=graph, weights=graph * -1.0)
    shift = env.simulate(jax.random.key(1), params, jnp.array([1.0, 0, 0]), jnp.full(3, 1.0), 20000)
    np.testing.assert_allclose(shift[:, 0].mean(), 1.0, atol=0.02)
    np.testing.assert_allclose(shift[:, 1].mean(), -1.0, atol=0.02)
    assert shift[:, 0].std() > 0.1  # still noisy, unlike a do-intervention


def test_regression_recovers_weights():
    env = make_env("linear-d8")
    params = env.sample_params(jax.random.key(3))
    x = np.asarray(env.simulate(jax.random.key(4), params, jnp.zeros(8), jnp.zeros(8), 50000))
    graph, weights = np.asarray(params.graph), np.asarray(params.weights)
    for j in range(8):
        parents = np.flatnonzero(graph[:, j])
        if parents.size == 0:
            continue
        coef, *_ = np.linalg.lstsq(x[:, parents], x[:, j], rcond=None)
        np.testing.assert_allclose(coef, weights[parents, j], atol=0.03)


@pytest.mark.parametrize("kind", ["er", "sf"])
def test_graph_priors_are_dags_with_expected_density(kind):
    d, k = 10, 3
    graphs = jax.vmap(lambda key: sample_graph(key, d, kind, k))(
        jax.random.split(jax.random.key(0), 2000)
    )
    assert bool(jax.vmap(is_acyclic)(graphs).all())
    assert set(np.unique(graphs).tolist()) == {0.0, 1.0}
    edges = float(graphs.sum((1, 2)).mean())
    if kind == "er":
        expected = erdos_renyi_edge_prob(d, k) * d * (d - 1) / 2
        np.testing.assert_allclose(edges, expected, rtol=0.02)
    else:  # node t sends min(t, k) edges: 0 + 1 + 2 + 3 * 7 = 24 at d = 10
        assert np.all(np.asarray(graphs.sum((1, 2))) == sum(min(t, k) for t in range(d)))
        in_degree = np.asarray(graphs.sum(1)).ravel()
        assert in_degree.max() >= 7  # hubs: heavy-tailed in-degree
    # random node order: every position is sometimes a root and sometimes not
    roots = np.asarray(graphs.sum(1) == 0).mean(0)
    assert np.all(roots > 0.02) and np.all(roots < 0.98)


@pytest.mark.parametrize("n", [1, 9])  # n < d sweeps, n >= d solves in closed form
def test_sampling_matches_ancestral_order(n):
    env = LinearSCMEnv(d=7)
    params = env.sample_params(jax.random.key(5))
    targets, values = jnp.zeros(7).at[2].set(1), jnp.full(7, 0.7)
    x = np.asarray(env.simulate(jax.random.key(6), params, targets, values, n))
    eps = np.asarray(env._standard_noise(jax.random.key(6), (n, 7)))
    w, std = np.asarray(params.weights), np.asarray(params.noise_std)
    expected = np.zeros((n, 7))
    for j in np.argsort(np.asarray(topological_depth(params.graph))):
        expected[:, j] = 0.7 if j == 2 else expected @ w[:, j] + std[j] * eps[:, j]
    np.testing.assert_allclose(x, expected, atol=1e-5)


def test_topological_depth_of_a_chain():
    chain = jnp.zeros((4, 4)).at[2, 0].set(1).at[0, 3].set(1).at[3, 1].set(1)
    assert topological_depth(chain).tolist() == [1, 3, 0, 2]
    assert not bool(is_acyclic(chain.at[1, 2].set(1)))


def test_heteroskedastic_noise_scale_depends_on_parents():
    env = LinearSCMEnv(d=2, heteroskedastic=True, fourier_length_scale=1.0)
    graph = jnp.zeros((2, 2)).at[0, 1].set(1)
    params = env.sample_params(jax.random.key(0)).replace(
        graph=graph, weights=graph * 0.0, noise_std=jnp.array([1.0, 0.3])
    )
    x = np.asarray(env.simulate(jax.random.key(1), params, jnp.zeros(2), jnp.zeros(2), 50000))
    scales = np.asarray(env._noise_scale(jnp.asarray(x), params))[:, 1]
    assert scales.std() / scales.mean() > 0.1
    # x1 is pure noise here: dividing by the parent-dependent scale makes it standard
    np.testing.assert_allclose((x[:, 1] / scales).std(), 1.0, atol=0.02)
    high = scales > np.median(scales)
    rms = lambda s: np.sqrt((s**2).mean())
    np.testing.assert_allclose(
        x[high, 1].std() / x[~high, 1].std(), rms(scales[high]) / rms(scales[~high]), rtol=0.03
    )
    homo = LinearSCMEnv(d=2)
    params_h = homo.sample_params(jax.random.key(0))
    np.testing.assert_array_equal(homo._noise_scale(jnp.asarray(x), params_h), params_h.noise_std)


def test_gumbel_noise_is_standardised_and_skewed():
    env = LinearSCMEnv(d=2, noise="gumbel")
    eps = np.asarray(env._standard_noise(jax.random.key(0), (200000,)))
    np.testing.assert_allclose([eps.mean(), eps.std()], [0.0, 1.0], atol=0.01)
    assert ((eps - eps.mean()) ** 3).mean() > 0.5  # Gumbel skewness is about 1.14


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("linear-ood-graph-d10", "graph_kind", "sf"),
        ("linear-ood-mech-d12", "weight_mean", 0.1),
        ("linear-ood-noise-d10", "noise", "gumbel"),
        ("linear-ood-hetero-d10", "heteroskedastic", True),
        ("linear-ood-shift-d10", "intervention", "shift"),
        ("linear-d20", "d", 20),
        ("linear-sparse-d5", "edges_per_node", 1.0),
        ("linear-d37", "d", 37),
    ],
)
def test_registry_variants(name, field, value):
    assert getattr(make_env(name), field) == value


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("linear-d1", {}, "d must be an integer >= 2"),
        ("linear-d10", {"budget": -1}, "budget must be"),
        ("linear-d10", {"noise": "cauchy"}, "unknown noise 'cauchy'"),
        (
            "linear-d10",
            {"n_zero": 3},
            r"unknown setting\(s\) \['n_zero'\] for 'linear-d10'; known: d, n0,",
        ),
        ("linear-ood-foo-d10", {}, "unknown linear variant 'ood-foo'"),
        ("quadratic-d10", {}, "unknown environment"),
        ("linear", {}, "unknown environment"),
        ("linear-ood-graph-d10", {"d": 5}, "the name sets d = 10; ask for 'linear-ood-graph-d5'"),
        ("linear-d10", {"noise_concentration": 0}, "noise_concentration must be a finite"),
        ("linear-d10", {"noise_rate": -1.0}, "noise_rate must be a finite number > 0"),
        ("linear-d10", {"value_scale": float("nan")}, "value_scale must be a finite"),
        ("linear-ood-hetero-d10", {"fourier_features": 0}, "fourier_features must be"),
        ("linear-ood-graph-d10", {"edges_per_node": 0.4}, "scale-free graphs attach"),
        ("sergio-ood-graph-d10", {"edges_per_node": 0.4}, "scale-free graphs attach"),
        # settings from a config file arrive as strings; each error names the setting
        ("linear-d10", {"edges_per_node": "3"}, "edges_per_node must be a finite number"),
        ("linear-d10", {"weight_mean": float("nan")}, "weight_mean must be a finite number"),
        ("linear-d10", {"n0": True}, "n0 must be an integer >= 1, got True"),
        ("linear-d10", {"score_fn": 3}, "score_fn must be None or a callable"),
        ("sergio-d10", {"dt": "0.01"}, "dt must be a finite number, got '0.01'"),
        ("sergio-d10", {"basal_range": 5}, r"basal_range must be \(low, high\), got 5"),
    ],
)
def test_registry_rejects_bad_input(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_env(name, **overrides)


def test_wrong_action_shape_is_rejected(env):
    params = env.sample_params(jax.random.key(0))
    _, state = env.reset(jax.random.key(1), params)
    with pytest.raises(ValueError, match=r"action must have shape \(12,\)"):
        env.step(jax.random.key(2), state, jnp.zeros(D), params)


def test_numpy_integer_sizes_become_python_ints():
    env = make_env("linear-d5", n0=np.int64(20), budget=np.int32(4))
    assert type(env.n0) is int and type(env.budget) is int
    assert env == make_env("linear-d5", n0=20, budget=4)
    assert hash(env) == hash(make_env("linear-d5", n0=20, budget=4))
    ranges = make_env("sergio-d5", basal_range=np.array([1, 2]), interaction_range=[1, 4])
    assert ranges.basal_range == (1.0, 2.0) and ranges.interaction_range == (1.0, 4.0)


def test_numpy_scalar_settings_become_python_numbers():
    """np.float32 / np.int64 settings from a NumPy sweep used to be refused."""
    env = make_env("linear-ood-hetero-d5", value_scale=np.float32(2.0), noise_rate=np.int64(2),
                   fourier_features=np.int64(50), heteroskedastic=np.bool_(True))  # fmt: skip
    plain = make_env("linear-ood-hetero-d5", value_scale=2.0, noise_rate=2, fourier_features=50)
    assert env == plain and hash(env) == hash(plain)
    assert type(env.value_scale) is float and type(env.fourier_features) is int
    sergio = make_env("sergio-d5", n_cell_types=np.int64(5), langevin_steps=np.int32(5),
                      hill=np.float32(2.0))  # fmt: skip
    assert sergio == make_env("sergio-d5", hill=2.0) and type(sergio.n_cell_types) is int


@pytest.mark.parametrize(
    "name, field",
    [("linear-d4", "weight_mean"), ("linear-d4", "value_scale"), ("linear-d4", "noise_rate"),
     ("linear-ood-hetero-d4", "fourier_length_scale"),
     ("linear-ood-hetero-d4", "fourier_output_scale")],
)  # fmt: skip
def test_continuous_prior_settings_can_be_traced(name, field):
    env = make_env(name)

    def episode(value, key):
        traced = dataclasses.replace(env, **{field: value})
        params = traced.sample_params(key)
        _, state = traced.reset(key, params)
        return traced.step(key, state, jnp.ones(traced.action_dim), params)[0].data

    data = jax.vmap(episode)(jnp.array([0.5, 2.0]), jax.random.split(jax.random.key(0), 2))
    assert data.shape == (2, env.n_rows, 4, 2) and bool(jnp.all(jnp.isfinite(data)))


@pytest.mark.parametrize(
    "name, field", [("linear-d4", "edges_per_node"), ("linear-d4", "noise_concentration"),
                    ("sergio-d4", "hill")],
)  # fmt: skip
def test_a_traced_static_setting_is_named(name, field):
    env = make_env(name)
    with pytest.raises(ValueError, match=f"{field} is a static setting and cannot be traced"):
        jax.vmap(lambda v: dataclasses.replace(env, **{field: v}))(jnp.array([1.0, 2.0]))


def test_a_state_of_another_environment_is_named(env):
    longer = LinearSCMEnv(d=D, n0=20, budget=3)
    params = longer.sample_params(jax.random.key(0))
    _, state = longer.reset(jax.random.key(1), params)
    message = rf"state.history must have shape \({env.n_rows}, {D}, 2\)"
    with pytest.raises(ValueError, match=message):
        env.step(jax.random.key(2), state, jnp.zeros(2 * D), params)


def test_params_of_another_d_or_a_batch_are_named(env):
    other = LinearSCMEnv(d=D - 1, n0=8, budget=3).sample_params(jax.random.key(0))
    with pytest.raises(ValueError, match=rf"params.graph must have shape \({D}, {D}\)"):
        env.reset(jax.random.key(1), other)
    params = env.sample_params(jax.random.key(0))
    _, state = env.reset(jax.random.key(1), params)
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), params)
    with pytest.raises(ValueError, match=r"got \(2, 6, 6\); .* a batch \(vmap over it\)"):
        env.step(jax.random.key(2), state, jnp.zeros(2 * D), batch)
    # a plain list is an action too
    history, *_ = env.step(jax.random.key(2), state, [0.5] * (2 * D), params)
    assert int(history.length) == 9


def test_rows_that_do_not_fit_are_dropped():
    h = append_rows(empty_history(3, 2), jnp.ones((2, 2)), jnp.zeros((2, 2)))
    full = append_rows(h, 2 * jnp.ones((1, 2)), jnp.ones((1, 2)))
    assert int(full.length) == 3
    after = append_rows(full, 3 * jnp.ones((1, 2)), jnp.ones((1, 2)))
    assert int(after.length) == 3
    np.testing.assert_array_equal(after.data, full.data)
    two = append_rows(h, 3 * jnp.ones((2, 2)), jnp.ones((2, 2)))  # only one row is free
    assert int(two.length) == 2
    np.testing.assert_array_equal(two.data, h.data)


def test_a_one_node_graph_has_no_edges():
    np.testing.assert_array_equal(erdos_renyi_dag(jax.random.key(0), 1), jnp.zeros((1, 1)))
    # scale-free graphs count edges_per_node as sample_graph does: rounded
    np.testing.assert_array_equal(
        scale_free_dag(jax.random.key(0), 6, 1.6), sample_graph(jax.random.key(0), 6, "sf", 1.6)
    )
    assert float(scale_free_dag(jax.random.key(0), 6, 1.6).sum()) == 0 + 1 + 2 * 4
