"""Pretraining: history sampling, loss, a tiny run that checkpoints, resumes and exports."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caasl_jax.checks import CheckpointError
from caasl_jax.cli import main as cli_main
from caasl_jax.envs.registry import make_env
from caasl_jax.reward.checkpoint import load_weights
from caasl_jax.reward.pretrain import (
    RUN_FILES,
    DesignMix,
    _config_from_args,
    args_error,
    bce_offdiag,
    build_parser,
    fresh_state,
    heldout_set,
    main,
    make_optimizer,
    make_train_chunk,
    plan_for_budget,
    random_action,
    replicated_sharding,
    restore_checkpoint,
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


def test_heldout_set_is_fixed_and_single_target():
    # the env and size of the tiny runs below: the compiled set is shared through the
    # test run's compilation cache
    env = make_env("linear-d3")
    data, mask, graph = heldout_set(env, jax.random.key(5), 4)
    assert len({np.asarray(g).tobytes() for g in graph}) == 4  # distinct systems
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
    # same settings: resumes at step 4 and does nothing more, but still exports
    export.unlink()
    assert main([*args, "--steps", "4"]) == 0
    assert export.read_bytes() == (out / "best.msgpack").read_bytes()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    latest = tmp_path / "latest.msgpack"
    assert main([*args, "--steps", "4", "--export-latest", str(latest)]) == 0
    _, _, latest_meta = load_weights(latest)
    assert latest_meta["step"] == 4 and "--export-latest" not in latest_meta["argv"]
    assert main(["--env", "linear-d3", "--evaluate-only", str(export), "--eval-envs", "4"]) == 0
    # a run killed after writing a new best.msgpack but before updating its --export
    # (which then holds the earlier best) still resumes with that --export ...
    (out / "best.msgpack").write_bytes(latest.read_bytes())
    assert main([*args, "--steps", "4"]) == 0
    assert export.read_bytes() == latest.read_bytes()
    assert not list(tmp_path.glob("*.partial")) and not list(out.glob("*.partial"))
    # ... but another file put at that path later is not the run's to replace
    export.write_bytes(b"someone else's weights")
    with pytest.raises(ValueError, match="exported.msgpack: exists; pass --overwrite"):
        main([*args, "--steps", "4"])
    assert export.read_bytes() == b"someone else's weights"
    export.write_bytes(latest.read_bytes())
    # on resume, --export may update the run's own export, never another file
    other = tmp_path / "other.msgpack"
    other.write_text("keep")
    with pytest.raises(ValueError, match="other.msgpack: exists; pass --overwrite"):
        main([*args[:4], "--export", str(other), *TINY, "--steps", "4"])
    assert other.read_text() == "keep"
    with pytest.raises(ValueError, match="is the run's own best.msgpack"):
        main([*args[:4], "--export", str(out / "best.msgpack"), *TINY, "--steps", "4"])
    # different settings refuse to mix runs
    with pytest.raises(ValueError, match="different settings"):
        main([*args, "--steps", "6", "--lr", "0.5"])
    # ... also when only the objective or the held-out set (which scored `best`) differs
    with pytest.raises(ValueError, match=r"different settings \(acyclicity, eval_seed\)"):
        main([*args, "--steps", "4", "--acyclicity", "5", "--eval-seed", "1"])
    # each checkpoint's digest is recorded, and a checkpoint that no longer matches it
    # is named instead of resumed from
    digests = out / "ckpt.digests.json"
    assert sorted(json.loads(digests.read_text())) == ["2", "4"]
    digests.write_text(json.dumps({"4": "0" * 64}))
    with pytest.raises(CheckpointError, match="checkpoint 4 under .* is damaged"):
        main([*args, "--steps", "4"])


def assert_resume_feeds_the_fresh_runs_program(argv, ckpt):
    """A fresh and a restored state sit on the step's own sharding and lower it to one
    program (a resume used to compile the step again and miss the compilation cache)."""
    import orbax.checkpoint as ocp

    args = build_parser().parse_args(argv)
    env = make_env(args.env)
    config = _config_from_args(args, args.env)
    tx, _ = make_optimizer(args.lr, args.warmup, args.steps, args.weight_decay)
    mix = DesignMix(max_designs=env.budget, p_single=args.p_single, p_multi=args.p_multi)
    chunk = make_train_chunk(env, config, tx, mix, args.batch, args.steps_per_call, 0.0)
    params, opt_state = fresh_state(jax.random.key(0), config, env.d, tx)
    with ocp.CheckpointManager(ckpt) as manager:
        restored = restore_checkpoint(manager, 2, params, opt_state)
    for state in ((params, opt_state), (restored["params"], restored["opt_state"])):
        assert all(x.sharding == replicated_sharding() for x in jax.tree.leaves(state))
    key = jax.random.key(1)
    fresh_program = chunk.lower(params, opt_state, key).as_text()
    resumed_program = chunk.lower(restored["params"], restored["opt_state"], key).as_text()
    assert resumed_program == fresh_program


def test_time_limit_checkpoints_where_it_stops_and_resume_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    args = ["--env", "linear-d3", "--out", str(out), *TINY, "--steps", "4", "--ckpt-every", "4"]
    # the limit is checked before each compiled call: one call (2 steps) runs
    assert main([*args, "--time-limit", "0.001"]) == 0
    assert sorted(p.name for p in (out / "ckpt").iterdir() if p.name.isdigit()) == ["2"]
    assert_resume_feeds_the_fresh_runs_program(args, out / "ckpt")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "bce": 0.1}\n{"step": 6, "bc')  # rows after the checkpoint
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and "eval_auprc" in log[1]
    # a damaged checkpoint is named, before any training, and the log is kept
    logged = (out / "log.jsonl").read_text()
    for f in (out / "ckpt" / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint 4 under .* is unreadable"):
        main(args)
    assert (out / "log.jsonl").read_text() == logged
    # a run that died before its first checkpoint starts over: its log is redone, not doubled
    shutil.rmtree(out / "ckpt")
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]


def test_exports_never_replace_a_file_silently(tmp_path, capsys):
    existing = tmp_path / "keep.msgpack"
    existing.write_text("keep")
    base = ["--env", "linear-d3", "--out", str(tmp_path / "run"), *TINY, "--steps", "2"]
    for option in ("--export", "--export-latest"):
        with pytest.raises(ValueError, match="exists; pass --overwrite"):
            main([*base, option, str(existing)])
    with pytest.raises(ValueError, match="does not exist"):
        main([*base, "--export", str(tmp_path / "no-such-folder" / "w.msgpack")])
    with pytest.raises(ValueError, match="is a folder"):
        main([*base, "--export", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="holds no pretraining run"):
        main([*base, "--export-latest", str(tmp_path / "new.msgpack")])
    assert existing.read_text() == "keep" and not (tmp_path / "run").exists()
    # the caasl command prints them as its other errors: one prefixed line, status 2
    assert cli_main(["pretrain-reward", *base, "--export", str(existing)]) == 2
    assert capsys.readouterr().err.startswith("caasl pretrain-reward: error: --export ")


@pytest.mark.parametrize(
    "files, error, message",
    [
        ({"best.msgpack": "keep", "log.jsonl": "keep"}, FileExistsError, "holds no pretraining"),
        (
            {"config.yaml": "keep", "run.json": '{"devices": 1}'},
            ValueError,
            r"is not a reward-pretraining run \(a `caasl train` run\)",
        ),
        ({"run.json": "garbage"}, ValueError, r"run\.json is damaged"),
        ({"run.json": "[1, 2]"}, ValueError, r"run\.json is damaged"),
    ],
)
def test_out_must_be_new_or_a_pretraining_run(tmp_path, files, error, message):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(error, match=message):
        main(["--env", "linear-d3", "--out", str(out), *TINY, "--steps", "2"])
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    a_file = out / next(iter(files))
    with pytest.raises(FileExistsError, match="is a file; give a folder"):
        main(["--env", "linear-d3", "--out", str(a_file), *TINY, "--steps", "2"])


def test_exports_never_replace_the_runs_own_files(tmp_path):
    out = tmp_path / "run"
    (out / "ckpt" / "2").mkdir(parents=True)
    files = {name: "keep" for name in RUN_FILES}
    files["run.json"] = json.dumps({"env": "linear-d3", "config": {}, "argv": []})
    for name, text in files.items():
        (out / name).write_text(text)
    base = ["--env", "linear-d3", "--out", str(out), *TINY, "--steps", "2", "--overwrite"]
    for option in ("--export", "--export-latest"):
        for name in RUN_FILES:
            with pytest.raises(ValueError, match=f"{option} .*: is the run's own {name}"):
                main([*base, option, str(out / name)])
        with pytest.raises(ValueError, match="lies in the run's own ckpt folder"):
            main([*base, option, str(out / "ckpt" / "2" / "w.msgpack")])
    assert {name: (out / name).read_text() for name in RUN_FILES} == files


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
        (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got 0"),
        (["--eval-envs", "0"], "argument --eval-envs: expected an integer >= 1, got 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--steps", "2", "--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--p-single", "0.8", "--p-multi", "0.4"], "sum <= 1"),
        (["--eval-every", "3"], "multiples of --steps-per-call"),
    ],
)
def test_bad_options_are_refused_before_any_file_is_written(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--env", "linear-d3", "--out", str(out), *TINY, *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "option", ["--lr", "--weight-decay", "--dropout", "--p-single", "--acyclicity", "--time-limit"]
)
def test_non_finite_float_options_are_named(option):
    for value in ("inf", "nan"):
        args = build_parser().parse_args([option, value])
        assert args_error(args) == f"{option} must be a finite number, got {value}"


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


def test_budget_plan_fits_the_steps_to_the_time_left_after_compiling():
    # evaluations after 3 and 6 calls: 1 s per call, so 13 s = 10 s compile + 3 calls
    plan = plan_for_budget([{"time_s": 13.0}, {"time_s": 16.0}], 3, 50, budget_s=300.0)
    assert (plan["call_s"], plan["compile_s"]) == (1.0, 10.0)
    assert plan["steps"] == int(0.9 * 290) * 50  # 10% of the rest left for evaluations
    assert plan["warmup"] == plan["steps"] // 10
    assert plan["eval_every"] % 50 == 0 and plan["eval_every"] == 26 * 50
    tiny = plan_for_budget([{"time_s": 30.0}, {"time_s": 60.0}], 3, 5, budget_s=20.0)
    assert tiny["steps"] == 10  # never fewer than 2 calls
    with pytest.raises(ValueError, match="logged 1 evaluations, needs 2"):
        plan_for_budget([{"time_s": 1.0}], 3, 50, budget_s=300.0)


def test_intervention_gain_is_what_the_design_rows_add():
    """Held-out `intervention_gain` = expected correct with the design rows minus with
    the n0 observational rows alone (the same systems, evaluated with budget 0)."""
    from caasl_jax.reward.pretrain import evaluate_weights

    setting = {"n0": 20, "budget": 5}
    full = evaluate_weights("linear-sparse-d5", "linear-sparse-d5", 8, 3, setting)
    alone = evaluate_weights("linear-sparse-d5", "linear-sparse-d5", 8, 3, {**setting, "budget": 0})
    assert full["intervention_gain"] == pytest.approx(
        full["expected_correct"] - alone["expected_correct"], abs=1e-4
    )
    assert abs(full["intervention_gain"]) > 1e-3  # the model reads the design rows
    assert alone["intervention_gain"] == pytest.approx(0.0, abs=1e-6)
