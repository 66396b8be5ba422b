"""experiments/: every figure config is valid, and the README table is what the scripts made."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402
import results_table  # noqa: E402

from caasl_jax.envs.registry import make_env  # noqa: E402
from caasl_jax.evaluate import BASELINES, available_policies, expand_env_names  # noqa: E402

FIGURES = sorted(p.stem for p in common.CONFIGS.glob("*.yaml"))


def test_every_figure_has_a_script_and_a_valid_config():
    assert set(FIGURES) >= set(results_table.FIGURES)
    for name in FIGURES:
        assert (common.HERE / f"{name}.py").is_file(), name
        config = common.load_figure_config(name)
        for env in expand_env_names(config.envs):
            make_env(env, **config.env_overrides)
        assert config.policy in available_policies(), (name, config.policy)
        assert set(config.baselines) <= {*BASELINES, "diffcbed", "ss-finite"}, name


def test_config_typos_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CONFIGS", tmp_path)
    (tmp_path / "fig.yaml").write_text("title: t\nenvs: [linear-d3]\nn_env: 5\n")
    with pytest.raises(ValueError, match=r"unknown keys \['n_env'\]"):
        common.load_figure_config("fig")
    with pytest.raises(ValueError, match="no experiment config 'nope'"):
        common.load_figure_config("nope")


def test_final_step_table():
    summary = {m: {"mean": [0.0, 2.0], "stderr": [0.0, 0.5]} for m in ("return", "shd")}
    table = common.final_step_table({"e": {"caasl": summary}}, metrics=("return", "shd"))
    assert table.splitlines()[2] == "| e | caasl | 2.00 ± 0.50 | 2.00 ± 0.50 |"


def test_readme_table_equals_the_committed_results():
    by_figure, n_envs = results_table.load_results()
    assert {"fig3_linear", "fig4_linear_ood"} <= set(by_figure), "run the experiments first"
    readme = results_table.README.read_text()
    block = readme.split(results_table.BEGIN, 1)[1].split(results_table.END, 1)[0]
    assert block.strip() == results_table.results_table(by_figure, n_envs)


def test_results_table_marks_the_best_design():
    def summary(final):
        return {"return": {"mean": [0.0, final], "stderr": [0.0, 0.1]}}

    table = results_table.results_table(
        {"fig3_linear": {"linear-d10": {"caasl": summary(2.0), "random": summary(3.0)}}}
    )
    assert table.splitlines()[-1] == "| fig3 | linear-d10 | 2.00 ± 0.10 | **3.00 ± 0.10** |"
    few = {"fig3_linear": {"linear-d10": {"caasl": summary(2.0)}}}
    assert "| fig3 (5 envs) |" in results_table.results_table(few, {"fig3_linear": 5})


def test_baseline_progress_is_resumed_or_discarded_but_nothing_else_touched(tmp_path):
    progress = tmp_path / common.PROGRESS_DIR
    assert common.progress_files(progress) == []
    progress.mkdir()
    saved = progress / "linear-d10--diffcbed.msgpack"
    saved.write_bytes(b"x")
    (progress / "linear-d10--ss-finite.msgpack.partial").write_bytes(b"x")
    assert common.progress_files(progress) == [saved]
    common.discard_progress(progress)
    assert not progress.exists()
    # a folder holding anything else (say, a training run's orbax checkpoints) is refused
    progress.mkdir()
    (progress / "metrics.jsonl").write_text("{}")
    with pytest.raises(ValueError, match="not baseline progress"):
        common.discard_progress(progress)
    assert (progress / "metrics.jsonl").exists()


def test_progress_of_another_run_is_refused_not_discarded(tmp_path):
    out = tmp_path / "fig3"
    (out / common.PROGRESS_DIR).mkdir(parents=True)
    saved = out / common.PROGRESS_DIR / "linear-d10--diffcbed.msgpack"
    saved.write_bytes(b"hours of GIES refits")
    # a quick rerun without the likelihood baselines would end by discarding it
    with pytest.raises(ValueError, match="holds baseline progress of another run"):
        common.run_figure("fig3_linear_likelihood", ["--out", str(out), "--baselines", "random"])
    assert saved.read_bytes() == b"hours of GIES refits"


def test_overwrite_resumes_progress_and_only_restart_discards_it(tmp_path):
    out = tmp_path / "fig3"
    (out / common.PROGRESS_DIR).mkdir(parents=True)
    saved = out / common.PROGRESS_DIR / "linear-d10--diffcbed.msgpack"
    saved.write_bytes(b"hours of GIES refits")
    # --overwrite (needed to replace earlier results) used to discard the progress too,
    # so rerunning an interrupted "--overwrite" command lost it; now it resumes it
    argv = ["--out", str(out), "--baselines", "random", "--overwrite"]
    with pytest.raises(ValueError, match="pass --restart to discard it"):
        common.run_figure("fig3_linear_likelihood", argv)
    assert saved.read_bytes() == b"hours of GIES refits"
    # --restart over earlier results needs --overwrite, checked before discarding
    (out / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds results \\(results.json\\)"):
        common.run_figure("fig3_linear_likelihood", ["--out", str(out), "--restart"])
    assert saved.exists()
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match="design 'no-such-design'"):
        common.run_figure(
            "fig3_linear_likelihood",
            ["--out", str(out), "--baselines", "no-such-design", "--restart"],
        )
    assert not saved.exists()


def test_figure_scripts_refuse_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    assert common.figure_main("no_such_figure", []) == 2
    assert capsys.readouterr().err.startswith("no_such_figure: error: no experiment config")
    with pytest.raises(SystemExit):
        common.parse_args("fig3_linear", ["--n-envs", "0"])
    assert "--n-envs: expected an integer >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(common, "CONFIGS", tmp_path)
    for body, message in (
        ("title: t\nenvs: [linear-d10]\nbaselines: random\n", "baselines must be a list"),
        ("title: t\nenvs: [linear-d10]\nn_envs: '2'\n", "n_envs must be an integer >= 1"),
        ("title: t\nenvs: [linear-d10]\nmetrics: [return, shdd]\n", "unknown metrics ['shdd']"),
    ):
        (tmp_path / "bad.yaml").write_text(body)
        assert common.figure_main("bad", []) == 2
        assert message in capsys.readouterr().err


def test_reward_reference_scores_every_predictor_on_the_heldout_set(tmp_path, capsys):
    import reward_reference

    out = tmp_path / "ref.json"
    argv = ["--env", "linear-d3", "--weights", "linear-sparse-d5", "--n-envs", "3",
            "--particles", "4", "--out", str(out)]  # fmt: skip
    assert reward_reference.main(argv) == 0
    table = reward_reference.json.loads(out.read_text())
    predictors = table["predictors"]
    assert len(predictors) == 9 and table["eval_envs"] == 3
    for scores in predictors.values():
        assert 0.0 <= scores["expected_correct"] <= 9.0
    # a 0/1 prediction's expected correct entries are the d^2 entries minus its SHD
    # with every reversed edge counted twice (once in SHD)
    best = "exact posterior, thresholded at 0.5 (the best any predictor can do)"
    for name in ("bootstrapped GIES, thresholded at 0.5", "empty graph", best):
        shd, correct = predictors[name]["shd"], predictors[name]["expected_correct"]
        assert 9.0 - 2 * shd - 1e-5 <= correct <= 9.0 - shd + 1e-5
    assert predictors["empty graph"]["expected_correct"] == 9.0 - predictors["empty graph"]["shd"]
    with pytest.raises(SystemExit):  # an existing result is kept
        reward_reference.main(argv)
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reward_reference.main(["--env", "sergio-d10", "--out", str(tmp_path / "x.json")])
    assert "the GIES posterior: needs a likelihood" in capsys.readouterr().err
    for bad_out, message in ((tmp_path, "is a folder"), (out / "x.json", "which is a file")):
        with pytest.raises(SystemExit):  # before the GIES fits
            reward_reference.main([*argv[:-2], "--out", str(bad_out), "--overwrite"])
        assert message in capsys.readouterr().err


def test_reward_reference_leaves_out_the_exact_posterior_where_the_prior_is_not_its_own(
    tmp_path,
):
    import reward_reference

    out = tmp_path / "sf.json"
    argv = ["--env", "linear-ood-graph-d3", "--weights", "linear-sparse-d5", "--n-envs", "2",
            "--particles", "2", "--out", str(out)]  # fmt: skip
    assert reward_reference.main(argv) == 0
    table = reward_reference.json.loads(out.read_text())
    assert "graph_kind='sf' is not supported" in table["exact_posterior_skipped"]
    assert "exact_posterior_seconds" not in table
    assert len(table["predictors"]) == 5
    assert not any(name.startswith("exact") for name in table["predictors"])
