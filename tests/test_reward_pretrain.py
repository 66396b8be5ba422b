"""Pretraining: history sampling, loss, a tiny run that checkpoints, resumes and exports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.envs.registry import make_env
from caasl_jax.reward.checkpoint import load_weights
from caasl_jax.reward.pretrain import (
    DesignMix,
    bce_offdiag,
    heldout_set,
    main,
    random_action,
    sample_training_batch,
    single_target_action,
    spectral_radius,
)

TINY = ["--dim", "8", "--layers", "1", "--heads", "2", "--key-size", "4", "--widening", "1",
        "--batch", "4", "--steps-per-call", "2", "--eval-every", "2", "--ckpt-every", "2",
        "--eval-envs", "4", "--warmup", "1", "--no-progress"]


@pytest.fixture(scope="module")
def env():
    return make_env("linear-d3", n0=5, budget=4)


def test_training_histories_have_n0_plus_0_to_T_rows(env):
    data, mask, graph = jax.jit(
        lambda k: sample_training_batch(env, k, 64, DesignMix(max_designs=env.budget))
    )(jax.random.key(0))
    assert data.shape == (64, env.n_rows, 3, 2) and graph.shape == (64, 3, 3)
    lengths = np.asarray(mask.sum(1))
    assert lengths.min() >= env.n0 and lengths.max() <= env.n0 + env.budget
    assert len(set(lengths.tolist())) > 2  # the number of design rows varies
    assert np.all(np.asarray(mask)[:, : env.n0])  # observational rows always present
    data = np.asarray(data)
    assert np.all(data[~np.asarray(mask)] == 0.0)  # padding is zero
    assert np.all(data[:, : env.n0, :, 1] == 0.0)  # observational rows have no targets
    n_targets = data[np.asarray(mask)][:, :, 1].sum(-1)
    assert {0, 1} <= set(n_targets.astype(int).tolist()) and n_targets.max() >= 2  # mixed designs


def test_heldout_set_is_fixed_and_single_target(env):
    data, mask, graph = heldout_set(env, jax.random.key(5), 3)
    assert len({np.asarray(g).tobytes() for g in graph}) == 3  # distinct systems
    assert np.all(np.asarray(mask))
    assert np.all(np.asarray(data)[:, env.n0 :, :, 1].sum(-1) == 1.0)


def test_bce_ignores_the_diagonal_and_spectral_radius():
    graph = jnp.array([[[0.0, 1.0], [0.0, 0.0]]])
    logits = jnp.array([[[50.0, 30.0], [-30.0, 50.0]]])
    assert float(bce_offdiag(logits, graph)) < 1e-6
    mat = jnp.array([[0.0, 2.0], [0.5, 0.5]])  # a cycle: largest eigenvalue (0.5+sqrt(4.25))/2
    expected = (0.5 + np.sqrt(4.25)) / 2
    assert float(spectral_radius(mat, iters=30)) == pytest.approx(expected, abs=1e-3)
    dag = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    assert float(spectral_radius(dag, iters=30)) == pytest.approx(0.0, abs=1e-3)


def test_tiny_run_checkpoints_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "exported.msgpack"
    args = ["--env", "linear-d3", "--out", str(out), "--export", str(export), *TINY]
    assert main([*args, "--steps", "4"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert all(np.isfinite(r["bce"]) and 0 < r["eval_auprc"] <= 1 for r in log)
    assert sorted(p.name for p in (out / "ckpt").iterdir() if p.name.isdigit()) == ["2", "4"]
    params, config, meta = load_weights(export)
    assert config.dim == 8 and meta["env"] == "linear-d3"
    # same settings: resumes at step 4 and does nothing more
    assert main([*args, "--steps", "4"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    latest = tmp_path / "latest.msgpack"
    assert main([*args, "--steps", "4", "--export-latest", str(latest)]) == 0
    _, _, latest_meta = load_weights(latest)
    assert latest_meta["step"] == 4 and "--export-latest" not in latest_meta["argv"]
    assert main(["--env", "linear-d3", "--evaluate-only", str(export), "--eval-envs", "4"]) == 0
    # different settings refuse to mix runs
    with pytest.raises(SystemExit, match="different settings"):
        main([*args, "--steps", "6", "--lr", "0.5"])


def test_random_actions_fit_the_env_action_size():
    mix = DesignMix(max_designs=3)
    keys = jax.random.split(jax.random.key(0), 200)
    linear = jax.vmap(lambda k: random_action(k, 5, mix))(keys)  # targets + values
    sergio = jax.vmap(lambda k: random_action(k, 5, mix, action_dim=5))(keys)  # targets only
    assert linear.shape == (200, 10) and sergio.shape == (200, 5)
    n_targets = np.asarray((sergio > 0).sum(1))
    assert {0, 1} <= set(n_targets.tolist()) and n_targets.max() >= 2
    assert np.all(np.abs(linear) <= 1.0)
    single = jax.vmap(lambda k: single_target_action(k, 5, 5))(keys)
    assert np.all(np.asarray((single > 0).sum(1)) == 1)
