"""The fused training step, the host loop, checkpoints and resume, configs and the CLI."""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from caasl_jax import train as train_lib
from caasl_jax.checks import CheckpointError
from caasl_jax.cli import DefaultsHelpFormatter
from caasl_jax.cli import main as cli_main
from caasl_jax.config import TrainConfig, from_dict, load_config, to_dict
from caasl_jax.digest import record_digest

ROOT = Path(__file__).resolve().parents[1]


def tiny_reward_weights(path: Path) -> Path:
    from caasl_jax.reward.checkpoint import save_weights
    from caasl_jax.reward.model import AviciConfig, init_params

    config = AviciConfig(dim=8, layers=1, heads=2, key_size=4)
    return save_weights(path, init_params(jax.random.key(0), config, 3), config)


def tiny_config_dict(reward_path) -> dict:
    net = {
        "encoder": {"dim": 8, "num_layers": 1, "num_heads": 2, "ffn_multiplier": 2},
        "hidden": [16],
    }
    return {
        "env": "linear-d3",
        "env_overrides": {"n0": 4, "budget": 3},
        "reward_model": str(reward_path),
        "iterations": 4,
        "iterations_per_call": 2,
        "num_envs": 8,
        "updates_per_iteration": 2,
        "batch_size": 8,
        "replay_episodes": 64,
        "warmup_episodes": 16,  # the first iteration (8 episodes) skips its updates
        "policy": net,
        "critic": net,
        "redq": {"tau": 0.05, "policy_lr": 0.001, "critic_lr": 0.001},
        "eval_every": 1,
        "eval_envs": 4,
        "checkpoint_every": 1,
    }


def test_checkpoint_changed_in_place_is_refused(tmp_path):
    """Orbax restores a checkpoint whose bytes changed (same size, still decodable)
    without complaint: a policy evaluated to NaN returns, a resumed run trained on."""
    import orbax.checkpoint as ocp

    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(3)}
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    record_digest(manager, 1, tree)
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    restored = train_lib.restore_step(manager, 1, tree)
    np.testing.assert_array_equal(restored["w"], tree["w"])
    changed = {**tree, "w": tree["w"].copy()}
    changed["w"][1, 2] = np.nextafter(changed["w"][1, 2], np.float32(10))  # one bit
    shutil.rmtree(tmp_path / "checkpoints" / "1")  # rewritten behind the digest's back
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(1, args=ocp.args.StandardSave(changed))
    manager.wait_until_finished()
    with pytest.raises(CheckpointError, match="checkpoint 1 under .* is damaged: its contents"):
        train_lib.restore_step(manager, 1, tree)
    (tmp_path / "checkpoints.digests.json").write_text("[]")
    with pytest.raises(CheckpointError, match="checkpoints.digests.json is damaged"):
        train_lib.restore_step(manager, 1, tree)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    reward = tiny_reward_weights(folder / "reward.msgpack")
    data = tiny_config_dict(reward)
    return from_dict(TrainConfig, data), data, folder


def _params_leaves(state):
    # copies: a zero-copy numpy view would pin the buffer and block its donation
    return [np.array(x, copy=True) for x in jax.tree.leaves(state.agent.policy_params)]


def test_chunk_compiles_once_and_learns_after_warmup(tiny):
    config, _, _ = tiny
    trainer, reward_params = train_lib.make_trainer(config)
    state = trainer.init_state()
    before = _params_leaves(state)
    chunk = trainer.compile_chunk(state)
    keys = [trainer.chunk_key(call) for call in range(3)]
    calls = []
    with jax.transfer_guard("disallow"):  # no host transfer inside the step
        for key in keys:
            previous = jax.tree.leaves(state)
            state, metrics = chunk(state, reward_params, key)
            calls.append(metrics)
            # the train state is donated: its input buffers were reused for the output
            assert all(x.is_deleted() for x in previous)
    assert chunk._cache_size() == 1  # one compilation for every call
    # warm-up: 8 episodes after the first iteration < 16, so only the second updates
    first = jax.device_get(calls[0])
    assert first["updated"].tolist() == [False, True]
    assert np.isnan(first["critic_loss"][0]) and np.isfinite(first["critic_loss"][1])
    last = jax.device_get(calls[-1])
    assert last["updated"].all() and np.isfinite(last["critic_loss"]).all()
    assert int(state.replay.size) == 6 * config.num_envs
    after = _params_leaves(state)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_exact_reward_trains_and_is_refused_outside_its_prior(tiny):
    """reward_model "exact": the env's own exact posterior scores the rollouts inside
    the fused step; an env outside the prior it is exact for fails before any work."""
    _, data, _ = tiny
    config = from_dict(TrainConfig, {**data, "reward_model": "exact"})
    trainer, reward_params = train_lib.make_trainer(config)
    assert reward_params == {} and trainer.score_builder.config.edge_prob > 0
    state = trainer.init_state()
    chunk = trainer.compile_chunk(state)
    state, metrics = chunk(state, reward_params, trainer.chunk_key(0))
    returns = np.asarray(jax.device_get(metrics)["return_mean"])
    assert np.all(np.isfinite(returns)) and np.any(returns != 0.0)
    outside = {**data, "reward_model": "exact", "env": "linear-ood-graph-d3"}
    outside = from_dict(TrainConfig, outside)
    with pytest.raises(ValueError, match="reward model 'exact': exact posterior: graph_kind='sf'"):
        train_lib.make_trainer(outside)


def test_resume_is_bit_identical(tiny, tmp_path):
    config, _, _ = tiny
    straight = train_lib.train(config, tmp_path / "a", progress=False)
    train_lib.train(config, tmp_path / "b", progress=False, max_calls=1)
    resumed = train_lib.train(config, tmp_path / "b", resume=True, progress=False)
    for x, y in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = lambda run: (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines("b")] == [1, 2, 3, 4]
    for name in ("curves.png", "eval.jsonl", "config.yaml", "checkpoints", "best"):
        assert (tmp_path / "b" / name).exists()
    assert list((tmp_path / "b" / "tb").iterdir())
    best = [train_lib.load_trained_policy(tmp_path / run, "best")[1] for run in ("a", "b")]
    for x, y in zip(*map(jax.tree.leaves, best), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_best_holds_the_policy_with_the_best_validation_return(tiny, tmp_path):
    _, data, _ = tiny
    config = from_dict(TrainConfig, {**data, "iterations": 8})  # 4 evaluations
    run = tmp_path / "run"
    summary = train_lib.train(config, run, progress=False)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    best_row = max(evals, key=lambda row: row["eval_return"])
    assert summary["best_eval"] == {
        "eval_return": best_row["eval_return"],
        "iteration": best_row["iteration"],
    }
    manager = train_lib._best_manager(train_lib.RunDir(run))
    running_max = np.maximum.accumulate([row["eval_return"] for row in evals])
    improved = [
        row["call"] + 1
        for i, row in enumerate(evals)
        if i == 0 or running_max[i] > running_max[i - 1]
    ]
    assert manager.all_steps() == improved  # every improvement is kept
    assert manager.best_step() == best_row["call"] + 1
    assert train_lib.best_eval_return(manager) == best_row["eval_return"]
    trainer, reward_params = train_lib.make_trainer(config)
    _, params, _ = train_lib.load_trained_policy(run, "best")
    evaluate = train_lib.make_evaluator(trainer, reward_params)
    assert evaluate(params)["eval_return"] == best_row["eval_return"]
    _, latest, _ = train_lib.load_trained_policy(run)
    assert evaluate(latest)["eval_return"] == evals[-1]["eval_return"]
    with pytest.raises(ValueError, match="unknown checkpoint 'bset'"):
        train_lib.load_trained_policy(run, "bset")


def test_resume_keeps_the_best_policy_from_before_the_resumed_state(tiny, tmp_path):
    """A crash after an improvement but before the next state checkpoint: the resume
    drops that improvement (it is redone) and keeps the best one before it."""
    _, data, _ = tiny
    config = from_dict(TrainConfig, {**data, "iterations": 8, "keep_checkpoints": 3})
    run = tmp_path / "run"
    train_lib.train(config, run, progress=False, max_calls=3)  # states saved at 1, 2, 3
    improved = max(train_lib._best_manager(train_lib.RunDir(run)).all_steps())  # to be dropped
    assert improved >= 2, "the test needs an improvement after the first call"
    for step in range(improved, 4):  # as if the run died before saving call `improved`
        shutil.rmtree(run / "checkpoints" / str(step))
    train_lib.train(config, run, resume=True, progress=False, max_calls=0)
    manager = train_lib._best_manager(train_lib.RunDir(run))
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [row["call"] for row in evals] == list(range(improved - 1))
    assert max(manager.all_steps()) <= improved - 1
    assert train_lib.best_eval_return(manager) == max(row["eval_return"] for row in evals)
    train_lib.train(config, run, resume=True, progress=False)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    manager = train_lib._best_manager(train_lib.RunDir(run))
    assert train_lib.best_eval_return(manager) == max(row["eval_return"] for row in evals)


def test_existing_run_is_not_overwritten(tiny, tmp_path):
    config, _, _ = tiny
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        train_lib.train(config, run, progress=False)
    # --overwrite replaces run directories only, and this one has no config.yaml
    with pytest.raises(FileExistsError, match="replaces run directories only"):
        train_lib.train(config, run, overwrite=True, progress=False, max_calls=0)
    assert (run / "precious.txt").read_text() == "keep me"


def test_corrupt_checkpoint_gives_clear_error(tiny, tmp_path):
    config, _, _ = tiny
    run = tmp_path / "run"
    train_lib.train(config, run, progress=False, max_calls=1)
    for folder in ("checkpoints", "best"):  # each save's digest (caasl_jax/digest.py)
        assert list(json.loads((run / f"{folder}.digests.json").read_text())) == ["1"]
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        train_lib.train(config, run, resume=True, progress=False)
    # the command prints that one line: no "Event loop is closed" tracebacks of the
    # reads orbax left in flight (one per array, from tensorstore's threads)
    command = [sys.executable, "-m", "caasl_jax.cli", "export-policy", str(run), "p.msgpack"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
    last_line = done.stderr.strip().splitlines()[-1]  # after orbax's own log lines
    assert last_line.startswith("caasl export-policy: error: checkpoint 1 under ")
    assert not (tmp_path / "p.msgpack").exists()
    # damaged metrics in best/ are named too (orbax reads them all to find the best)
    for f in (run / "best").rglob("*"):
        if f.is_file() and "metrics" in f.relative_to(run / "best").parts:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="best is damaged"):
        train_lib.load_trained_policy(run, "best")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_envz": 3}, "unknown key\\(s\\) 'num_envz'"),
        ({"redq": {"gama": 0.9}}, "config.redq: unknown key\\(s\\) 'gama'"),
        ({"iterations": 5}, "multiple of iterations_per_call"),
        ({"num_envs": "many"}, "expected int"),
        ({"env": "linear-d1"}, "d must be an integer >= 2"),
        ({"env": "nonsense-d5"}, "unknown environment"),
        ({"reward_model": "no-such-model"}, "unknown reward model"),
        ({"warmup_episodes": 65}, "warmup_episodes must be in 0 .. replay_episodes \\(64\\)"),
        ({"num_envs": True}, "num_envs: expected int, got True"),
        ({"env_overrides": {"budget": 0}}, "training needs a budget of >= 1 design step"),
    ],
)
def test_bad_configs_fail_before_work(tiny, change, message):
    _, data, _ = tiny
    with pytest.raises(ValueError, match=message):
        train_lib.make_trainer(from_dict(TrainConfig, {**data, **change}))


def test_a_reward_model_for_another_env_family_is_flagged(tiny):
    _, data, _ = tiny
    config = from_dict(
        TrainConfig, {**data, "env": "sergio-d5", "reward_model": "linear-sparse-d5"}
    )
    with pytest.warns(UserWarning, match="'zscore', but 'sergio-d5' data call for 'log2_cpm'"):
        train_lib.make_trainer(config)


def test_packaged_configs_load_and_set_overrides(tmp_path):
    small = load_config("small", ["redq.gamma=0.5", "num_envs=16", "policy.hidden=[8, 8]"])
    assert small.redq.gamma == 0.5 and small.num_envs == 16 and small.policy.hidden == (8, 8)
    for name in ("linear-d10", "sergio-d10"):
        config = load_config(name)
        assert config.num_envs == 1000 and config.batch_size == 4096
        assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        load_config("nope")
    for text, message in (("a: [1", "is not valid YAML"), ("- 1\n- 2", "must hold a mapping")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"bad.yaml {message}"):
            load_config(str(bad))
    # the small default's reward model ships with the package
    trainer, _ = train_lib.make_trainer(load_config("small"))
    assert trainer.env.d == 5 and trainer.env.n_rows == 25
    # a config that names no reward model gets the shipped weights named like its env
    # (the default used to name weights that do not exist)
    assert TrainConfig().reward_model_name == "linear-sparse-d5"
    assert TrainConfig(env="sergio-d10").reward_model_name == "sergio-d10"
    assert TrainConfig(env="linear-d7", reward_model="x.msgpack").reward_model_name == "x.msgpack"
    with pytest.raises(ValueError, match="reward_model 'auto' needs shipped weights named like"):
        train_lib.make_trainer(TrainConfig(env="linear-d7"))


def test_cli_train_and_resume(tiny, tmp_path, capsys, monkeypatch):
    import tensorboardX

    purge_steps = []

    class RecordingWriter(tensorboardX.SummaryWriter):
        def __init__(self, logdir, purge_step=None):
            purge_steps.append(purge_step)
            super().__init__(logdir, purge_step=purge_step)

    monkeypatch.setattr(tensorboardX, "SummaryWriter", RecordingWriter)
    _, data, _ = tiny
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(data))
    run = tmp_path / "cli-run"
    args = ["train", "--config", str(config_file), "--run-dir", str(run), "--max-calls", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "validation return (last evaluation)" in out
    assert re.search(r"best validation return: CAASL -?[0-9.]+ at iteration 2, kept in", out)
    assert cli_main(args) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text()) == {"devices": 1}
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"call": 0, "critic_lo')  # torn by a kill mid-write: resume skips it
    assert cli_main(["train", "--resume", str(run)]) == 0
    # the resumed run redoes from iteration 3 (1 call of 2 iterations kept): TensorBoard
    # drops the first run's points from there
    assert purge_steps == [None, 3]
    assert cli_main(["train", "--config", str(config_file), "--set", "batch_size=-3"]) == 2


def test_help_shows_each_default_also_without_help_text():
    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1, help="step size")
    parser.add_argument("--out", help="folder")
    parser.add_argument("--flag", action="store_true")
    text = parser.format_help()
    assert re.search(r"--repeats REPEATS\s+default: 3\n", text)
    assert "step size (default: 0.1)" in text
    assert re.search(r"--out OUT\s+folder\n", text) and text.count("default") == 2


def test_cli_refuses_bad_counts_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--policy", "linear-d10", "--env", "linear-d10", "--n-envs", "0"])
    assert exit_info.value.code == 2
    assert "--n-envs: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["train", "--config", "small", "--devices", "3"]) == 2
    assert "--devices 3: only 1 devices are available" in capsys.readouterr().err
    assert cli_main(["export-policy", "linear-d10", str(tmp_path), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []
    # a config typo is named before jax.distributed waits for the other processes
    multi = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"]
    assert cli_main(["train", "--config", "small", "--set", "iteratons=2", *multi]) == 2
    assert "unknown key(s) 'iteratons'" in capsys.readouterr().err
    # a resumed run keeps its folder and config
    assert cli_main(["train", "--resume", "runs/x", "--run-dir", "runs/y", "--overwrite"]) == 2
    assert "drop --run-dir/--overwrite" in capsys.readouterr().err
    for argv, message in (
        (["train", "--config", "small", "--max-calls", "0"], "--max-calls: expected an integer"),
        (["envs", "--d", "1"], "--d: expected an integer >= 2, got 1"),
    ):
        with pytest.raises(SystemExit):
            cli_main(argv)
        assert message in capsys.readouterr().err
    # evaluate checks its output paths before any rollout, --overwrite or not
    afile = tmp_path / "afile"
    afile.write_text("keep")
    common = ["evaluate", "--policy", "linear-d10", "--env", "linear-d10", "--overwrite"]
    assert cli_main([*common, "--out", str(afile)]) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli_main([*common, "--out", str(out), "--checkpoint-dir", str(afile)]) == 2
    assert f"--checkpoint-dir {afile} is a file" in capsys.readouterr().err
    assert cli_main([*common, "--out", str(afile / "sub")]) == 2  # found only when writing
    assert f"--out {afile / 'sub'} lies under {afile}, a file" in capsys.readouterr().err
    assert afile.read_text() == "keep" and not out.exists()


def test_resume_refuses_another_device_count(tmp_path):
    run = train_lib.RunDir(tmp_path / "run")
    (run.checkpoints).mkdir(parents=True)
    run.run_info.write_text(json.dumps({"devices": 2}))
    run.check_resumable(2)
    with pytest.raises(ValueError, match="it was trained on 2 .* resume it on 2 devices"):
        run.check_resumable(1)
    run.run_info.write_text("{")
    with pytest.raises(ValueError, match="run.json is damaged"):
        run.check_resumable(2)
    with pytest.raises(FileExistsError, match="is a file"):
        train_lib.RunDir(run.run_info).check_new(overwrite=True)
    # it used to fail with a NotADirectoryError traceback when creating the folder
    with pytest.raises(FileExistsError, match=r"lies under .*run\.json, a file"):
        train_lib.RunDir(run.run_info / "sub").check_new(overwrite=False)


def intervened_values_score(reward_params):
    """Score = sum of the values set by do-interventions (test reward).

    The clearly best design sets every variable to the top of its range. (A reward
    for one particular variable would be unlearnable: the policy is equivariant to
    variable order, as it must be.)
    """

    def score(history, graph):
        return (history.targets * history.values * history.mask[:, None]).sum()

    return score


def test_policy_learns_the_clearly_best_intervention(tmp_path):
    """Through the whole fused trainer: do(x_i = +1) on every variable pays most."""
    net = {
        "encoder": {"dim": 8, "num_layers": 1, "num_heads": 2, "ffn_multiplier": 2},
        "hidden": [16],
    }
    config = from_dict(
        TrainConfig,
        {
            "env": "linear-d2",
            "env_overrides": {"n0": 2, "budget": 2},
            "iterations": 30,
            "iterations_per_call": 10,
            "num_envs": 16,
            "updates_per_iteration": 8,
            "batch_size": 32,
            "replay_episodes": 256,
            "warmup_episodes": 32,
            "policy": net,
            "critic": net,
            "eval_every": 3,
            "eval_envs": 64,
            "checkpoint_every": 3,
            "redq": {
                "gamma": 0.5,
                "tau": 0.05,
                "policy_lr": 3e-3,
                "critic_lr": 3e-3,
                "alpha_lr": 3e-3,
                "init_log_alpha": -2.0,
            },
        },
    )
    summary = train_lib.train(
        config, tmp_path / "run", progress=False, score_builder=intervened_values_score
    )
    result = summary["last_eval"]
    # random designs: values average 0; the best design earns d * budget = 4
    assert abs(result["eval_random_return"]) < 0.3
    assert result["eval_return"] > 2.5, result


def test_cli_evaluate_policy_and_baselines(tiny, tmp_path, capsys):
    config, _, _ = tiny
    run = tmp_path / "run"
    train_lib.train(config, run, progress=False, max_calls=1)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--policy",
        str(run),
        "--env",
        "linear-d3",
        "linear-ood-graph-d3",
        "--n-envs",
        "4",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"linear-d3", "linear-ood-graph-d3"}
    assert set(results["linear-d3"]) == {"caasl", "random", "random-single", "observational"}
    caasl = results["linear-d3"]["caasl"]
    budget = config.env_overrides["budget"]
    for metric in ("return", "shd", "expected_shd", "auprc", "edge_f1", "expected_correct"):
        assert len(caasl[metric]["mean"]) == budget + 1
    assert caasl["return"]["mean"][0] == 0.0
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "env,policy,metric,step,mean,stderr"
    # deterministic under the seed
    again_args = [
        "evaluate",
        "--policy",
        str(run),
        "--env",
        "linear-d3",
        "--baselines",
        "--n-envs",
        "4",
        "--out",
        str(tmp_path / "again"),
    ]
    assert cli_main(again_args) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["results"]
    assert again["linear-d3"]["caasl"] == caasl
    # a run's best/ folder is a policy too (here the only evaluated one: the latest)
    best_args = [*again_args[:-1], str(tmp_path / "best"), "--policy", str(run / "best")]
    assert cli_main(best_args) == 0
    best = json.loads((tmp_path / "best" / "results.json").read_text())["results"]
    assert best["linear-d3"]["caasl"] == caasl
    # bad input: clear error, nothing written
    capsys.readouterr()
    bad = [
        "evaluate",
        "--policy",
        str(run),
        "--env",
        "linear-d3",
        "nonsense-d3",
        "--out",
        str(tmp_path / "bad"),
    ]
    assert cli_main(bad) == 2
    assert "unknown environment 'nonsense-d3'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli_main([*again_args[:-1], str(tmp_path / "bad2"), "--policy", "garbage"]) == 2
    assert not (tmp_path / "bad2").exists()


def exploding_score(reward_params):
    """A reward that turns infinite at the second design step (a broken reward model)."""

    def score(history, graph):
        return jnp.where(history.length > history.data.shape[0] - 2, jnp.inf, 0.0)

    return score


def test_a_run_that_diverges_stops_and_saves_nothing_of_it(tiny, tmp_path):
    """Such a run used to go on to its end with NaN losses and save a NaN policy."""
    _, data, _ = tiny
    config = from_dict(TrainConfig, data)
    run = tmp_path / "run"
    with pytest.raises(train_lib.TrainingDiverged, match="diverged at iteration 1: return_mean"):
        train_lib.train(config, run, progress=False, score_builder=exploding_score)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[0]["return_mean"] is None
    assert not any((run / "checkpoints").iterdir()) and not any((run / "best").iterdir())


def test_divergence_counts_learner_metrics_only_after_warm_up():
    warming = {"call": 0, "iteration": 1, "updated": 0.0, "critic_loss": math.nan,
               "return_mean": 0.5, "replay_episodes": 8.0}  # fmt: skip
    assert train_lib.first_divergence([warming]) is None
    updated = {**warming, "iteration": 2, "updated": 1.0, "critic_loss": math.inf}
    assert train_lib.first_divergence([warming, updated]) == "iteration 2: critic_loss is inf"


def test_orbax_errors_are_cut_to_their_first_informative_line():
    error = ValueError(
        'DATA_LOSS: Error reading "x" in OCDBT database [source locations=...] See full '
        "TensorStore details: <bound method PyCapsule.spec of TensorStore({...})>\nmore"
    )
    assert train_lib._first_line(error) == (
        'DATA_LOSS: Error reading "x" in OCDBT database [source locations=...]'
    )
