"""Evaluation: suites, baselines' designs, compiled-function reuse, policy files, errors."""

import json
import warnings

import jax
import numpy as np
import pytest
from test_train import tiny_config_dict, tiny_reward_weights

from caasl_jax import evaluate as ev
from caasl_jax import train as train_lib
from caasl_jax.cli import main as cli_main
from caasl_jax.config import TrainConfig, from_dict, load_config
from caasl_jax.envs.registry import make_env
from caasl_jax.reward.checkpoint import load_weights


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny policy (one host call) on linear-d3, n0 = 4, budget 3."""
    folder = tmp_path_factory.mktemp("eval")
    reward = tiny_reward_weights(folder / "reward.msgpack")
    config = from_dict(TrainConfig, tiny_config_dict(reward))
    run = folder / "run"
    train_lib.train(config, run, progress=False, max_calls=1)
    return run, config, reward


def test_suites_expand_to_the_appendix_c_sets():
    assert ev.expand_env_names(["linear-ood"]) == [
        "linear-ood-graph-d10",
        "linear-ood-mech-d10",
        "linear-ood-noise-d10",
        "linear-ood-hetero-d10",
        "linear-ood-shift-d10",
    ]
    assert ev.expand_env_names(["sergio-ood-d12"]) == [
        "sergio-ood-graph-d12",
        "sergio-ood-dropseq-d12",
        "sergio-ood-knockdown-d12",
        "sergio-ood-noisy-d12",
    ]
    assert ev.expand_env_names(["linear-dims"]) == [f"linear-d{d}" for d in (10, 12, 15, 20)]
    assert ev.expand_env_names(["linear-d10", "linear-dims:10,30"]) == ["linear-d10", "linear-d30"]
    for name in ev.expand_env_names(["linear-ood", "sergio-ood", "sergio-dims"]):
        make_env(name)  # every expanded name is registered
    with pytest.raises(ValueError, match="unknown environment set 'gauss-ood'"):
        ev.expand_env_names(["gauss-ood"])


def _designs(env, name, n_envs=64, seed=0):
    """Intervention masks [B, T, d] and values [B, T, d] of the design rows of a baseline."""
    params = ev.heldout_params(env, n_envs, seed)
    histories = ev.design_rollout(env)(ev.branch_index(name), (), params, ev.rollout_key(seed))
    rows = histories.data[:, env.n0 :]
    return np.asarray(rows[..., 1]), np.asarray(rows[..., 0])


def test_baselines_make_the_documented_designs():
    env = make_env("linear-d4", n0=3, budget=6)
    masks, _ = _designs(env, "observational")
    assert masks.sum() == 0
    masks, _ = _designs(env, "random-single")
    assert np.all(masks.sum(-1) == 1)
    assert set(np.argmax(masks, -1).ravel()) == set(range(4))
    masks, values = _designs(env, "random")
    # each variable is a target w.p. 1/2, independently: 64 * 6 designs per variable
    assert np.all(np.abs(masks.mean((0, 1)) - 0.5) < 0.1), masks.mean((0, 1))
    assert 0.3 < np.mean(masks.sum(-1) == 0) * 16 < 1.8  # P(no target) = 1/16
    # do-interventions: a target's recorded value is the chosen value, spread over the range
    targeted = values[masks == 1]
    assert targeted.std() > 0.3 and np.abs(targeted).max() <= env.value_scale


def test_sergio_random_baseline_targets_every_gene():
    """The release's SERGIO random baseline only picked the first d/2 genes; ours any gene."""
    env = make_env("sergio-d6")
    policy = ev.random_policy(env)
    actions = jax.vmap(policy, in_axes=(0, None))(jax.random.split(jax.random.key(0), 2000), None)
    assert actions.shape == (2000, env.action_dim) == (2000, 6)
    share = np.asarray((actions > 0).mean(0))
    assert np.all(np.abs(share - 0.5) < 0.05), share


def test_one_compiled_rollout_serves_all_baselines_and_the_policy(tiny_run):
    run, config, reward = tiny_run
    agent, policy_params, _ = ev.load_policy(run)
    env = make_env("linear-d3", **config.env_overrides)
    reward_params, reward_config = load_weights(reward)[:2]
    # start from empty caches: another test in this worker may have compiled the same
    # (env, agent) pair for inputs placed or sharded differently
    ev.design_rollout.cache_clear()
    ev._stepwise_jit.cache_clear()
    summaries = {}
    for name in ("random", "random-single", "observational", "caasl"):
        summaries[name] = ev.evaluate_design(
            env, name, reward_params, reward_config, 6, 0, agent=agent, policy_params=policy_params
        )
    summaries["det"] = ev.evaluate_design(
        env, "caasl", reward_params, reward_config, 6, 0, agent, policy_params, "deterministic"
    )
    assert ev.design_rollout(env, agent)._cache_size() == 1
    assert ev._stepwise_jit(env, reward_config)._cache_size() == 1
    # the branches really are different designs
    assert summaries["observational"]["return"] != summaries["random"]["return"]
    assert summaries["caasl"]["return"] != summaries["det"]["return"]
    # deterministic under the seed, different under another seed
    again = ev.evaluate_design(
        env, "random", reward_params, reward_config, 6, 0, agent=agent, policy_params=policy_params
    )
    assert again == summaries["random"]
    other = ev.evaluate_design(
        env, "random", reward_params, reward_config, 6, 1, agent=agent, policy_params=policy_params
    )
    assert other["return"] != summaries["random"]["return"]


@pytest.mark.parametrize("name", ["linear-d10", "sergio-d10"])
def test_shipped_policy_was_trained_by_its_packaged_config(name):
    """POLICY_CARD.md says `caasl train --config <name>-cpu` made each shipped policy: its
    stored config must be that file, so the networks a rerun trains (e.g. SERGIO's
    log2-CPM inputs) are the shipped ones. Changing one means retraining the other."""
    _, _, shipped = ev.load_policy(name)
    assert shipped == load_config(f"{name}-cpu")


def test_policy_file_round_trip_and_errors(tiny_run, tmp_path, capsys):
    run, config, reward = tiny_run
    path = ev.export_policy(run, tmp_path / "policy.msgpack")
    agent, params, loaded_config = ev.load_policy(path)
    _, run_params, _ = ev.load_policy(run)
    assert loaded_config == config
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params,
                              run_params)  # fmt: skip
    assert all(jax.tree.leaves(chex_equal))
    with pytest.raises(FileExistsError):
        ev.export_policy(run, path)
    # the file evaluates exactly like the run directory
    out_file, out_run = tmp_path / "from_file", tmp_path / "from_run"
    common = ["--env", "linear-d3", "--baselines", "--n-envs", "4", "--no-progress"]
    assert cli_main(["evaluate", "--policy", str(path), *common, "--out", str(out_file)]) == 0
    assert cli_main(["evaluate", "--policy", str(run), *common, "--out", str(out_run)]) == 0
    from_file = json.loads((out_file / "results.json").read_text())["results"]
    from_run = json.loads((out_run / "results.json").read_text())["results"]
    assert from_file == from_run
    # corrupt / foreign files: a clear error and nothing written
    capsys.readouterr()
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\x00not a policy")
    out_bad = tmp_path / "bad"
    assert cli_main(["evaluate", "--policy", str(garbage), *common, "--out", str(out_bad)]) == 2
    assert "not a caasl-jax policy file" in capsys.readouterr().err
    assert not out_bad.exists()
    assert cli_main(["evaluate", "--policy", str(reward), *common, "--out", str(out_bad)]) == 2
    assert "not a caasl-jax policy file" in capsys.readouterr().err
    assert not out_bad.exists()
    # an existing result is not overwritten silently
    before = (out_run / "results.json").read_text()
    assert cli_main(["evaluate", "--policy", str(run), *common, "--out", str(out_run)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out_run / "results.json").read_text() == before
    # a run folder is never an --out, not even with --overwrite
    run_files = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert cli_main(["evaluate", "--policy", str(run), *common, "--out", str(run),
                     "--overwrite"]) == 2  # fmt: skip
    assert "holds a run (it has run.json)" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == run_files


def test_suite_rejects_bad_input_before_any_work(tiny_run, tmp_path):
    run, _, reward = tiny_run
    with pytest.raises(ValueError, match="unknown linear variant 'ood-wrong'"):
        ev.evaluate_suite(["linear-d3", "linear-ood-wrong-d3"], [str(run)], n_envs=2)
    with pytest.raises(ValueError, match="neither a run directory"):
        ev.evaluate_suite(["linear-d3"], ["randm"], n_envs=2, reward_model=str(reward))
    with pytest.raises(ValueError, match="reward model is required"):
        ev.evaluate_suite(["linear-d3"], ["random"], n_envs=2)
    with pytest.raises(ValueError, match="cannot act on sergio-d3"):
        ev.evaluate_suite(["sergio-d3"], [str(run)], n_envs=2)
    with pytest.raises(ValueError, match="unknown policy mode"):
        ev.evaluate_suite(["linear-d3"], [str(run)], mode="greedy")


def test_write_results_long_format(tmp_path):
    results = {"e": {"random": {"return": {"mean": [0.0, 1.5], "stderr": [0.0, 0.25]}}}}
    json_path, csv_path = ev.write_results(tmp_path, results, {"seed": 3})
    assert json.loads(json_path.read_text()) == {"meta": {"seed": 3}, "results": results}
    assert csv_path.read_text().splitlines() == [
        "env,policy,metric,step,mean,stderr",
        "e,random,return,0,0.0,0.0",
        "e,random,return,1,1.5,0.25",
    ]


def test_likelihood_baselines_are_left_out_where_no_likelihood_exists():
    envs = {name: make_env(name) for name in ("linear-d3", "linear-ood-hetero-d3", "sergio-d3")}
    skipped = ev.not_applicable(envs, ["diffcbed", "ss-finite"])
    assert [(env, name) for env, name, _ in skipped] == [
        ("linear-ood-hetero-d3", "diffcbed"),
        ("linear-ood-hetero-d3", "ss-finite"),
        ("sergio-d3", "diffcbed"),
        ("sergio-d3", "ss-finite"),
    ]
    assert "likelihood" in skipped[-1][2]
    assert ev.not_applicable(envs, []) == []


def test_validation_and_test_environments_are_disjoint():
    """The trainer picks its best checkpoint on the "validation" split; `caasl evaluate`
    reports on "test": the two must be different environments under one seed."""
    env = make_env("linear-d4")
    test = ev.heldout_params(env, 3, 0)
    validation = ev.heldout_params(env, 3, 0, split="validation")
    pairs = zip(jax.tree.leaves(test), jax.tree.leaves(validation), strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    same = ev.heldout_params(env, 3, 0, split="test")
    for a, b in zip(jax.tree.leaves(test), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="unknown held-out split 'valid'"):
        ev.heldout_params(env, 3, 0, split="valid")


def test_train_usage_errors_are_bad_input(tmp_path, capsys):
    """caasl train's own usage errors exit 2 with one line, like every other bad input."""
    assert cli_main(["train", "--resume", str(tmp_path), "--set", "x=1"]) == 2
    assert capsys.readouterr().err == (
        "caasl train: error: --resume continues the run in its own folder with its own "
        "config; drop --set\n"
    )
    assert cli_main(["train"]) == 2
    assert capsys.readouterr().err == (
        "caasl train: error: give --config NAME_OR_FILE (e.g. small) or --resume RUN_DIR\n"
    )


def test_export_policy_checks_its_path_before_loading(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    target = afile / "p.msgpack"
    # the run does not exist: the path is refused before the policy is looked for
    assert cli_main(["export-policy", str(tmp_path / "no-run"), str(target)]) == 2
    assert capsys.readouterr().err == (
        f"caasl export-policy: error: {target} lies under {afile}, which is a file\n"
    )
    assert afile.read_text() == "keep"


def test_evaluate_refuses_a_zero_budget(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "--policy", "random", "--reward-model", "linear-d10", "--env",
            "linear-d10", "--env-set", "budget=0", "--baselines", "--n-envs", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == (
        "caasl evaluate: error: linear-d10: evaluation needs a budget of >= 1 design step "
        "per episode, got budget=0 (env settings: --env-set / env_overrides)\n"
    )
    assert not out.exists()


def test_damaged_progress_files_are_refused_before_any_rollout(tmp_path):
    """Only the progress files this evaluation would resume are read: DiffCBED is left
    out on SERGIO, so that garbage file is not this evaluation's."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for env_name in ("linear-d10", "sergio-d10"):
        (ck / f"{env_name}--diffcbed.msgpack").write_bytes(b"garbage")
    logged = []
    with pytest.raises(ValueError) as error:
        ev.evaluate_suite(
            ["sergio-d10", "linear-d10"],
            ["random", "diffcbed"],
            n_envs=2,
            reward_model="linear-d10",
            checkpoint_dir=ck,
            log=logged.append,
        )
    assert str(error.value).startswith(
        f"{ck / 'linear-d10--diffcbed.msgpack'}: not a caasl-jax design-loop progress file"
    )
    assert str(error.value).endswith("; delete it or choose another --checkpoint-dir")
    assert not [line for line in logged if "return" in line]  # no rollout ran
    # a progress file (of any run: which one is checked on resuming) passes
    from caasl_jax.baselines.runner import save_progress

    save_progress(ck / "ok.msgpack", "another run", 1, {"x": np.zeros(2)}, {})
    ev.check_progress_files([ck / "ok.msgpack", ck / "missing.msgpack"])


def test_evaluate_out_inside_a_run_is_refused(tiny_run, capsys):
    """Not only the run folder itself: --out never lies inside it, --overwrite or not."""
    run = tiny_run[0]
    run_files = sorted(p.relative_to(run) for p in run.rglob("*"))
    common = ["evaluate", "--policy", str(run), "--env", "linear-d3", "--baselines",
              "--n-envs", "2", "--no-progress", "--overwrite"]  # fmt: skip
    for out in (run / "checkpoints", run / "best", run / "new" / "eval"):
        assert cli_main([*common, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"caasl evaluate: error: --out {out} lies inside the run ")
        assert f"the run {run.resolve()};" in err
        assert err.count("\n") == 1
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == run_files


def test_suite_checks_its_inputs_before_loading_the_policy(tiny_run, tmp_path, monkeypatch):
    """Only the policy's config is read for the checks; its parameters load (slowly)
    after them."""
    run = str(tiny_run[0])
    monkeypatch.setattr(ev, "load_policy", lambda spec: pytest.fail("policy loaded too early"))
    with pytest.raises(ValueError, match="linear-d3: evaluation needs a budget .* budget=0"):
        ev.evaluate_suite(["linear-d3"], [run], n_envs=2, env_overrides={"budget": 0})
    with pytest.raises(ValueError, match="cannot act on sergio-d3"):
        ev.evaluate_suite(["sergio-d3"], [run], n_envs=2)
    (tmp_path / "linear-d3--diffcbed.msgpack").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a caasl-jax design-loop progress file"):
        ev.evaluate_suite(["linear-d3"], [run, "diffcbed"], n_envs=2, checkpoint_dir=tmp_path)


def test_a_reward_model_for_another_env_family_is_flagged():
    """caasl train warned about this mismatch; caasl evaluate did not."""
    with pytest.warns(UserWarning, match="'log2_cpm', but 'linear-d3' data call for 'zscore'"):
        ev.evaluate_suite(["linear-d3"], ["random"], n_envs=2, reward_model="sergio-d10")


def test_raw_and_zscored_real_values_are_one_family():
    from caasl_jax.reward.standardize import warn_if_other_family

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_other_family("linear-raw-d10", "none", "linear-d3")  # raw values: no warning
        warn_if_other_family("linear-zscore-d10", "zscore", "linear-ood-graph-d5")
    with pytest.warns(UserWarning, match="'none', but 'sergio-d3' data call for 'log2_cpm'"):
        warn_if_other_family("linear-raw-d10", "none", "sergio-d3")


def test_exact_reward_model_scores_each_env_with_its_own_prior(monkeypatch):
    """--reward-model exact: step 0 of the evaluation is the exact posterior's score of
    the n0 observational rows; an env outside its prior is named before any rollout."""
    from caasl_jax.reward.exact import ExactPrior, exact_edge_posterior

    overrides = {"n0": 6, "budget": 2}
    results, meta = ev.evaluate_suite(
        ["linear-d3"], ["observational"], n_envs=3, reward_model="exact",
        env_overrides=overrides, log=None,
    )  # fmt: skip
    assert meta["reward_model"] == "exact"
    env = make_env("linear-d3", **overrides)
    params = ev.heldout_params(env, 3, 0)
    histories = ev.design_rollout(env, None)(
        ev.branch_index("observational", "stochastic"), (), params, ev.rollout_key(0)
    )
    prior = ExactPrior.of_env(env)
    expected = []
    for b in range(3):
        graph = np.asarray(params.graph[b], np.float64)
        x = np.asarray(histories.data[b, : env.n0, :, 0], np.float64)
        p = exact_edge_posterior(x, np.zeros_like(x, bool), prior)
        expected.append(np.sum(graph * p + (1 - graph) * (1 - p)))
    got = results["linear-d3"]["observational"]["expected_correct"]["mean"][0]
    assert got == pytest.approx(np.mean(expected), abs=1e-3)

    def no_rollouts(*args, **kwargs):
        raise AssertionError("a rollout started before the reward model was checked")

    monkeypatch.setattr(ev, "design_rollout", no_rollouts)
    with pytest.raises(ValueError, match="linear-ood-graph-d3: reward model 'exact': exact"):
        ev.evaluate_suite(
            ["linear-d3", "linear-ood-graph-d3"], ["random"], n_envs=2, reward_model="exact"
        )
