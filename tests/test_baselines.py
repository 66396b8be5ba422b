"""Likelihood-based baselines: bootstrapped-GIES posterior, DiffCBED, SS Finite, runner."""

import functools
import itertools

import gies.main
import gies.utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from gies.scores.gauss_int_l0_pen import GaussIntL0Pen
from gies.utils import replace_unprotected

from caasl_jax import evaluate as ev
from caasl_jax.baselines import LIKELIHOOD_BASELINES, check_supported, diffcbed, ss_finite
from caasl_jax.baselines import posterior as post
from caasl_jax.envs.linear import LinearParams
from caasl_jax.envs.registry import make_env

# the package's own versions of what `posterior.use_fast_gies` replaces
GIES_SEMI_DIRECTED_PATHS = gies.utils.semi_directed_paths
GIES_FORWARD_STEP = gies.main.forward_step


def _params(graph, weight, noise_std):
    graph = jnp.asarray(graph, jnp.float32)
    d = graph.shape[0]
    return LinearParams(
        graph=graph,
        weights=graph * weight,
        bias=jnp.zeros(d),
        noise_std=jnp.full(d, noise_std, jnp.float32),
    )


def _rows(env, params, key, designs):
    """Observational rows (n0) then interventional rows: designs = [(targets, value, n)]."""
    keys = jax.random.split(key, len(designs) + 1)
    zeros = jnp.zeros(env.d)
    x = [np.asarray(env.simulate(keys[0], params, zeros, zeros, env.n0))]
    t = [np.zeros((env.n0, env.d), bool)]
    for k, (targets, value, n) in zip(keys[1:], designs):
        mask = np.zeros(env.d, np.float32)
        mask[list(targets)] = 1.0
        values = jnp.full(env.d, value, jnp.float32)
        x.append(np.asarray(env.simulate(k, params, jnp.asarray(mask), values, n)))
        t.append(np.broadcast_to(mask > 0, (n, env.d)))
    return np.concatenate(x).astype(np.float64), np.concatenate(t)


# ------------------------------------------------------------------------------
# posterior
# ------------------------------------------------------------------------------


def test_pooled_score_is_the_uncentred_regression_and_keeps_single_sample_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    targets = np.zeros((40, 4), bool)
    targets[37, 1] = True  # three single-sample interventional groups
    targets[38, [0, 2]] = True
    targets[39, 3] = True
    interv = [list(k) for k in post.target_groups(targets)]
    score = post.PooledGaussianBIC(x, targets, interv)
    free = ~targets[:, 2]
    w, *_ = np.linalg.lstsq(x[free][:, [0, 3]], x[free, 2], rcond=None)
    var = np.mean((x[free, 2] - x[free][:, [0, 3]] @ w) ** 2)
    got_w, got_var = score.regression(2, {3, 0})
    np.testing.assert_allclose(got_w, w, rtol=1e-8)
    np.testing.assert_allclose(got_var, var, rtol=1e-8)
    expected = -0.5 * free.sum() * (1 + np.log(var)) - 0.5 * np.log(40) * 3
    np.testing.assert_allclose(score.local_score(2, {0, 3}), expected, rtol=1e-10)

    # the single row with target {1} informs node 2's score here ...
    moved = x.copy()
    moved[37, 2] += 5.0
    changed = post.PooledGaussianBIC(moved, targets, interv)
    assert changed.local_score(2, {0}) != score.local_score(2, {0})
    # ... while the gies package's own score centres that one-row environment to zero
    envs = [x[np.all(targets == targets[r], 1)] for r in (0, 37, 38, 39)]
    gies_score = GaussIntL0Pen(envs, [[], [1], [0, 2], [3]])
    np.testing.assert_allclose(gies_score.sample_cov[1], 0.0)


def _random_pdag(rng, d):
    """A random DAG with some edges made undirected (both entries set)."""
    dag = np.triu(rng.random((d, d)) < 0.4, 1)[np.ix_(perm := rng.permutation(d), perm)]
    undirected = dag & (rng.random((d, d)) < 0.5)
    return (dag | undirected.T).astype(float)


def test_fast_semi_directed_paths_match_the_gies_package():
    assert GIES_SEMI_DIRECTED_PATHS is not post.semi_directed_paths
    rng = np.random.default_rng(0)
    for _ in range(40):
        pdag = _random_pdag(rng, 7)
        for fro, to in itertools.permutations(range(7), 2):
            ours = sorted(post.semi_directed_paths(fro, to, pdag))
            assert ours == sorted(GIES_SEMI_DIRECTED_PATHS(fro, to, pdag)), (fro, to, pdag)


def test_fast_insert_operators_match_the_gies_package(monkeypatch):
    """Same operators, same order, same score changes on random PDAGs (7 nodes, some
    with large undirected neighbourhoods, so that subsets get pruned and marked)."""
    monkeypatch.setattr(gies.utils, "semi_directed_paths", GIES_SEMI_DIRECTED_PATHS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 7))
    checked = 0
    for _ in range(60):
        pdag = _random_pdag(rng, 7)
        score = post.PooledGaussianBIC(x, np.zeros_like(x, bool), [[]])
        sets = post._pdag_sets(pdag)
        for fro, to in zip(*np.where((pdag + pdag.T + np.eye(7)) == 0)):
            reference = gies.main.score_valid_insert_operators(fro, to, pdag, score)
            ours = post._valid_insert_operators(fro, to, sets, score)
            assert [op[:3] for op in ours] == [op[:3] for op in reference]
            assert [op[3].tolist() for op in ours] == [op[3].tolist() for op in reference]
            checked += len(ours)
    assert checked > 1000


def test_gies_finds_the_same_graphs_with_the_fast_search(monkeypatch):
    env = make_env("linear-d10")
    params = jax.vmap(env.sample_params)(jax.random.split(jax.random.key(3), 6))
    for i in range(6):
        designs = [((i % 10,), 1.0, 1), (((i + 3) % 10, (i + 5) % 10), -1.0, 1), ((7,), 0.5, 5)]
        p = jax.tree.map(lambda a, i=i: a[i], params)
        x, targets = _rows(env, p, jax.random.key(i), designs)
        monkeypatch.setattr(gies.utils, "semi_directed_paths", GIES_SEMI_DIRECTED_PATHS)
        monkeypatch.setattr(gies.main, "forward_step", GIES_FORWARD_STEP)
        monkeypatch.setattr(post, "use_fast_gies", lambda: None)
        reference, _ = post.fit_gies(x, targets)
        monkeypatch.undo()
        assert reference.sum() > 0
        fast, _ = post.fit_gies(x, targets)
        assert gies.utils.semi_directed_paths is post.semi_directed_paths
        assert gies.main.forward_step is post.fast_forward_step
        np.testing.assert_array_equal(fast, reference)


def test_random_extension_keeps_the_essential_graph_and_varies_orientation():
    chain = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])  # 0 - 1 - 2, no v-structure allowed
    seen = set()
    for s in range(20):
        dag = post.random_extension(np.random.default_rng(s), chain)
        assert np.array_equal((dag + dag.T) > 0, chain > 0)
        assert not (dag[0, 1] and dag[2, 1])  # no new v-structure at 1
        seen.add(dag.tobytes())
    assert len(seen) == 3  # all three members of the MEC occur


@pytest.mark.parametrize(
    "graph, designs",
    [
        # v-structure 0 -> 2 <- 1 and 2 -> 3: observational data orient everything
        ([[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], []),
        # chain 0 -> 1 -> 2: interventions on 0 (one group) and single rows on {2}, {1, 2}
        ([[0, 1, 0], [0, 0, 1], [0, 0, 0]], [((0,), 2.0, 150), ((2,), -1.0, 1), ((1, 2), 1.0, 1)]),
    ],
)
def test_bootstrap_posterior_concentrates_on_the_true_i_mec(graph, designs):
    d = len(graph)
    env = make_env(f"linear-d{d}", n0=1500)
    params = _params(graph, 1.0, 0.5)
    x, targets = _rows(env, params, jax.random.key(0), designs)
    fits = post.fit_posterior(x, targets, n_particles=30, seed=1)
    family = [list(k) for k in post.target_groups(targets)]
    truth = replace_unprotected(np.asarray(graph), family)
    hits = sum(np.array_equal(e, truth) for e in fits["essential"])
    assert hits >= 27, (hits, truth)
    same_dag = sum(np.array_equal(g, np.asarray(graph)) for g in fits["dag"])
    assert same_dag >= 27  # fully identified here, so the DAG is the truth too
    w = fits["weights"][:, np.asarray(graph) > 0]
    np.testing.assert_allclose(np.median(w, 0), 1.0, atol=0.1)
    np.testing.assert_allclose(np.median(fits["noise_var"], 0), 0.25, rtol=0.2)


@pytest.mark.parametrize("intervention", ["do", "shift"])
def test_particle_likelihood_matches_scipy(intervention):
    rng = np.random.default_rng(3)
    n_particles, n, d = 4, 6, 5
    dag = np.triu(rng.random((n_particles, d, d)) < 0.5, 1).astype(np.float32)
    weights = dag * rng.normal(size=dag.shape).astype(np.float32)
    noise_var = rng.uniform(0.1, 1.0, (n_particles, d)).astype(np.float32)
    particles = post.Particles(
        dag=jnp.asarray(dag),
        weights=jnp.asarray(weights),
        noise_var=jnp.asarray(noise_var),
        essential=jnp.asarray(dag),
    )
    x = rng.normal(size=(n, d)).astype(np.float32)
    targets = (rng.random((n, d)) < 0.3).astype(np.float32)
    values = rng.normal(size=(n, d)).astype(np.float32)
    got = post.log_likelihood(particles, x, targets, values, intervention)
    expected = np.zeros((n_particles, n))
    for p, i, j in itertools.product(range(n_particles), range(n), range(d)):
        mean = x[i] @ weights[p][:, j]
        if intervention == "shift":
            mean += targets[i, j] * values[i, j]
        elif targets[i, j]:
            continue  # a do-target's value is not modelled
        expected[p, i] += scipy.stats.norm.logpdf(x[i, j], mean, np.sqrt(noise_var[p, j]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("intervention", ["do", "shift"])
def test_design_likelihood_is_the_row_likelihood_of_a_shared_design(intervention):
    rng = np.random.default_rng(4)
    n_particles, n, d = 5, 12, 6
    dag = np.triu(rng.random((n_particles, d, d)) < 0.5, 1).astype(np.float32)
    particles = post.Particles(
        dag=jnp.asarray(dag),
        weights=jnp.asarray(dag * rng.normal(size=dag.shape).astype(np.float32)),
        noise_var=jnp.asarray(rng.uniform(0.05, 1.0, (n_particles, d)).astype(np.float32)),
        essential=jnp.asarray(dag),
    )
    x = 2.0 * rng.normal(size=(n, d)).astype(np.float32)
    targets = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    values = jnp.asarray(rng.normal(size=d).astype(np.float32))
    rows = post.log_likelihood(
        particles, x, jnp.broadcast_to(targets, x.shape), jnp.broadcast_to(values, x.shape),
        intervention,
    )  # fmt: skip
    shared = post.design_log_likelihood(particles, x, targets, values, intervention)
    np.testing.assert_allclose(shared, rows, rtol=1e-5, atol=1e-3)


def test_particle_simulation_cuts_incoming_edges_of_do_targets():
    weights = jnp.array([[0.0, 2.0, 0.0], [0.0, 0.0, -1.5], [0.0, 0.0, 0.0]])
    noise_var = jnp.array([1.0, 0.01, 0.01])
    eps = jax.random.normal(jax.random.key(0), (4000, 3))
    do_1 = post.simulate_particle(weights, noise_var, eps, jnp.array([0.0, 1, 0]), jnp.full(3, 0.7))
    np.testing.assert_allclose(do_1[:, 1], 0.7)  # set to its value, parent ignored
    np.testing.assert_allclose(do_1[:, 2], -1.5 * 0.7 + 0.1 * eps[:, 2], atol=1e-5)
    shift_1 = post.simulate_particle(
        weights, noise_var, eps, jnp.array([0.0, 1, 0]), jnp.full(3, 0.7), "shift"
    )
    np.testing.assert_allclose(shift_1[:, 1], 2.0 * eps[:, 0] + 0.1 * eps[:, 1] + 0.7, atol=1e-5)


# ------------------------------------------------------------------------------
# both methods on a graph where one intervention settles everything
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_hypotheses():
    """0 -> 1 plus an isolated node 2; 200 observational rows leave 0 - 1 unoriented."""
    env = make_env("linear-d3", n0=200)
    params = _params([[0, 1, 0], [0, 0, 0], [0, 0, 0]], 1.5, 0.4)
    x, targets = _rows(env, params, jax.random.key(1), [])
    particles = post.particles_from_numpy(post.fit_posterior(x, targets, 30, seed=0))
    forward = int(np.sum(np.asarray(particles.dag)[:, 0, 1]))
    assert 5 <= forward <= 25  # both orientations are in the posterior
    return env, particles


def _action(env, targets, value=1.0):
    mask = np.isin(np.arange(env.d), targets)
    return jnp.concatenate([jnp.where(mask, 1.0, -1.0), jnp.full(env.d, value)])


def test_diffcbed_prefers_the_resolving_intervention(two_hypotheses):
    env, particles = two_hypotheses
    key = jax.random.key(2)
    resolving = diffcbed.eig(env, particles, key, _action(env, [0]))
    isolated = diffcbed.eig(env, particles, key, _action(env, [2]))
    assert resolving > isolated + 0.2
    assert abs(isolated) < 0.05
    action, best = diffcbed.design(env, particles, jax.random.key(3))
    targets, _ = env.design(action)
    assert targets[0] + targets[1] >= 1  # it intervenes on the undirected edge
    assert best > isolated + 0.2


def test_ss_finite_prefers_the_resolving_intervention(two_hypotheses):
    env, particles = two_hypotheses
    config = ss_finite.SSFiniteConfig()
    mi = ss_finite.set_mutual_information(
        env, particles, jax.random.key(2), [[[0]], [[1]], [[2]]], config
    )
    assert mi[0] > mi[2] + 0.2 and mi[1] > mi[2] + 0.1
    action, _ = ss_finite.design(env, particles, jax.random.key(3))
    targets, _ = env.design(action)
    assert targets[2] == 0 and targets[0] + targets[1] == 1


# ------------------------------------------------------------------------------
# constraints and pieces
# ------------------------------------------------------------------------------


def test_designs_respect_target_and_value_constraints(two_hypotheses):
    _, particles = two_hypotheses
    env = make_env("linear-d3", value_scale=2.5)
    config = diffcbed.DiffCBEDConfig(epochs=20, anneal_epochs=15, n_outer=4)
    for seed in range(3):
        action, _ = diffcbed.design(env, particles, jax.random.key(seed), config)
        assert action.shape == (env.action_dim,)
        assert set(np.unique(np.asarray(action[: env.d]))) <= {-1.0, 1.0}
        assert np.all(np.abs(action[env.d :]) <= 1.0)
        _, values = env.design(action)
        assert np.all(np.abs(values) <= 2.5)
        action, _ = ss_finite.design(
            env, particles, jax.random.key(seed), ss_finite.SSFiniteConfig(max_targets=1)
        )
        targets, values = env.design(action)
        assert targets.sum() == 1
        np.testing.assert_allclose(values, 2.5)  # fixed at the top of the range


def test_straight_through_targets_are_binary_with_gradients():
    logits = jnp.array([0.3, -2.0, 4.0])

    def total(logits):
        return diffcbed.relaxed_targets(jax.random.key(0), logits, jnp.array(1.0), 8).sum()

    samples = diffcbed.relaxed_targets(jax.random.key(0), logits, jnp.array(1.0), 8)
    assert set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
    assert np.all(np.asarray(jax.grad(total)(logits)) > 0)
    temps = [
        float(diffcbed.temperature(jnp.array(e), diffcbed.DiffCBEDConfig()))
        for e in (0, 40, 80, 99)
    ]
    np.testing.assert_allclose(temps, [5.0, 2.75, 0.5, 0.5])


def test_separating_system_separates_every_undirected_edge():
    rng = np.random.default_rng(5)
    for _ in range(20):
        d = 7
        essential = (rng.random((5, d, d)) < 0.25).astype(np.float32)
        essential[:, np.arange(d), np.arange(d)] = 0
        union = ss_finite.undirected_union(essential)
        for k in (1, 2, None):
            system = ss_finite.separating_system(essential, k)
            assert all(len(s) <= (k or d) for s in system)
            for i, j in zip(*np.nonzero(np.triu(union, 1))):
                assert any((i in s) != (j in s) for s in system), (i, j, system)
    assert ss_finite.separating_system(np.zeros((2, 3, 3))) == [[0], [1], [2]]


def test_lazy_greedy_matches_plain_greedy_on_a_coverage_function():
    sets = [{0, 1, 2}, {2, 3}, {3, 4, 5, 6}, {0, 6}, {7}]
    calls = []

    def gain(selected, c):
        calls.append(c)
        covered = set().union(*(sets[i] for i in selected))
        return len(sets[c] - covered)

    chosen, gains = ss_finite.lazy_greedy(gain, len(sets), 3)
    assert chosen == [2, 0, 4] and gains == [4, 3, 1]


# ------------------------------------------------------------------------------
# the evaluate contract
# ------------------------------------------------------------------------------


def test_unsupported_envs_raise():
    with pytest.raises(ValueError, match="heteroskedastic"):
        check_supported(make_env("linear-ood-hetero-d3"))
    sergio = make_env("sergio-d3")
    params = ev.heldout_params(make_env("linear-d3"), 1, 0)
    with pytest.raises(ValueError, match="likelihood"):
        LIKELIHOOD_BASELINES["diffcbed"](sergio, params, jax.random.key(0), progress=False)


def test_settings_that_would_silently_observe_only_are_refused():
    from caasl_jax.baselines.diffcbed import DiffCBEDConfig
    from caasl_jax.baselines.ss_finite import SSFiniteConfig

    for bad, message in [
        (lambda: DiffCBEDConfig(epochs=0), "epochs must be an integer >= 1"),
        (lambda: DiffCBEDConfig(n_outer=0), "n_outer must be an integer >= 1"),
        (lambda: DiffCBEDConfig(lr=0.0), "lr must be > 0"),
        (lambda: SSFiniteConfig(n_datasets=0), "n_datasets must be an integer >= 1"),
        (lambda: SSFiniteConfig(value_action=2.0), r"value_action must be in \[-1, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()
    env = make_env("linear-d3")
    params = ev.heldout_params(env, 1, 0)
    with pytest.raises(ValueError, match="n_particles must be an integer >= 2, got 1"):
        LIKELIHOOD_BASELINES["diffcbed"](env, params, jax.random.key(0), n_particles=1)


@pytest.mark.parametrize("name", ["diffcbed", "ss-finite"])
def test_run_returns_rollout_shaped_histories(name):
    env = make_env("linear-sparse-d3", n0=6, budget=2, intervention="shift")
    params = ev.heldout_params(env, 2, 0)
    key = jax.random.key(4)
    reference = ev.rollout_episodes(env, ev.random_policy(env), params, key)[0]
    small = {
        "diffcbed": diffcbed.DiffCBEDConfig(epochs=10, anneal_epochs=8, n_outer=4),
        "ss-finite": ss_finite.SSFiniteConfig(n_datasets=4),
    }
    run = functools.partial(LIKELIHOOD_BASELINES[name], config=small[name], n_particles=4)
    histories = run(env, params, key, n_workers=2, progress=False)
    assert jax.tree.structure(histories) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(histories), jax.tree.leaves(reference)):
        assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(histories.length, env.n_rows)
    # same held-out systems, same observational rows as every other policy
    np.testing.assert_allclose(histories.data[:, : env.n0], reference.data[:, : env.n0], atol=1e-5)
    design_targets = np.asarray(histories.data[:, env.n0 :, :, 1])
    assert set(np.unique(design_targets)) <= {0.0, 1.0}
    # the process pool and the serial path give the same designs
    serial = run(env, params, key, n_workers=1, progress=False)
    np.testing.assert_allclose(serial.data, histories.data, atol=1e-5)


def _failing_design(env, particles, key, settings):
    raise ValueError("this design failed")


def test_a_failing_design_job_surfaces_its_error():
    from caasl_jax.baselines.runner import run_design_loop

    env = make_env("linear-sparse-d3", n0=6, budget=2)
    params = ev.heldout_params(env, 3, 0)
    for workers in (1, 2):
        with pytest.raises(ValueError, match="this design failed"):
            run_design_loop(env, params, jax.random.key(0), _failing_design, name="failing",
                            n_workers=workers, progress=False, n_particles=2)  # fmt: skip


def test_design_loop_resumes_from_its_checkpoint(tmp_path):
    from caasl_jax.baselines import _design_runner

    env = make_env("linear-sparse-d3", n0=6, budget=3)
    params = ev.heldout_params(env, 2, 0)
    key = jax.random.key(5)
    config = ss_finite.SSFiniteConfig(n_datasets=4)
    run = functools.partial(LIKELIHOOD_BASELINES["ss-finite"], env, params, key,
                            n_particles=3, n_workers=1, progress=False)  # fmt: skip
    uninterrupted = run(config=config)
    # a run that dies in its second design step (2 envs) leaves the first step's progress
    checkpoint = tmp_path / "progress.msgpack"
    calls = []

    def dying_design(env, particles, key, config):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return ss_finite.design(env, particles, key, config)

    dying = _design_runner("ss-finite", dying_design, ss_finite.SSFiniteConfig)
    with pytest.raises(KeyboardInterrupt):
        dying(env, params, key, n_particles=3, n_workers=1, progress=False, config=config,
              checkpoint=checkpoint)  # fmt: skip
    assert checkpoint.exists()
    calls.clear()

    def counted_design(env, particles, key, config):
        calls.append(1)
        return ss_finite.design(env, particles, key, config)

    resumed = _design_runner("ss-finite", counted_design, ss_finite.SSFiniteConfig)(
        env, params, key, n_particles=3, n_workers=1, progress=False, config=config,
        checkpoint=checkpoint,
    )  # fmt: skip
    assert len(calls) == 2 * 2  # only the two design steps left, for both envs
    np.testing.assert_array_equal(resumed.data, uninterrupted.data)
    np.testing.assert_array_equal(resumed.length, uninterrupted.length)
    # progress of another run (other settings) or a damaged file is refused, by name
    with pytest.raises(ValueError, match="another run"):
        run(config=ss_finite.SSFiniteConfig(n_datasets=5), checkpoint=checkpoint)
    other_env = make_env("linear-sparse-d3", n0=6, budget=3, intervention="shift")
    with pytest.raises(ValueError, match="another run"):  # same params, other env setting
        LIKELIHOOD_BASELINES["ss-finite"](other_env, params, key, n_particles=3, n_workers=1,
                                          progress=False, config=config, checkpoint=checkpoint)
    checkpoint.write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="not a caasl-jax design-loop progress file"):
        run(config=config, checkpoint=checkpoint)
