"""benchmarks/report.py renders the measured JSON; the benchmarks check their arguments
(no benchmark is run here)."""

import pytest

from benchmarks import report


def _results(grad_s: float, act_s: float) -> dict:
    machine = {
        "processor": "x86_64",
        "cpu_count": 2,
        "jax": "0",
        "backend": "cpu",
        "platform": "linux",
    }
    step = lambda b, s, n=1: {  # noqa: E731
        "batch": b,
        "devices": n,
        "seconds": s,
        "histories_per_s": b / s,
        "peak_rss_gb": 2.0,
        "xla_temp_gb": 0.2,
    }
    train_row = lambda n, b: {  # noqa: E731
        "devices": n,
        "num_envs": 32,
        "batch_size": b,
        "rollout": {"seconds": 1.0, "transitions_per_s": 160.0},
        "update": {"seconds": 0.5},
        "fused": {"call_s": 10.0, "transitions_per_s": 80.0},
        "projected_paper_run_hours_single_device": 48.0,
    }
    return {
        "grad_step": {
            "release": {"grad_step_s": 48.3, "grad_step_peak_gb": 14.4, "act_1000_s": 45.7},
            "machine": machine,
            "act": {"batch": 1000, "seconds": act_s},
            "batch_sweep": [step(64, grad_s / 4), step(256, grad_s)],
            "device_sweep": [step(256, grad_s), step(256, grad_s / 1.5, 2)],
        },
        "train_small": {"results": [train_row(1, 32), train_row(2, 32)]},
        "train_paper": {"results": [train_row(1, 256)]},
        "env": {
            "env": "linear-d10",
            "n0": 50,
            "budget": 10,
            "results": [
                {"batch": 1000, "transitions_per_s": 1e6, "episode_transitions_per_s": 1.5e5}
            ],
        },
        "env_sergio": {
            "env": "sergio-d10",
            "n0": 50,
            "budget": 10,
            "results": [
                {"batch": 100, "transitions_per_s": 1e4, "episode_transitions_per_s": 5e3},
                {"batch": 1000, "transitions_per_s": 1e5, "episode_transitions_per_s": 1.86e4},
            ],
        },
        "replay": {
            "linear-d10": {
                "ours_bytes_per_transition": 337,
                "release_bytes_per_transition": {"histories_only": 9600},
                "reduction_vs_release_histories": 28.5,
                "ours_GB_at_1e7_transitions": 3.4,
            }
        },
    }


def test_render_reports_speedups_and_target_status():
    text = report.render(_results(grad_s=8.05, act_s=4.0), "now")
    assert "| 8.05 s, 2.00 GB peak RSS" in text
    assert "**6.0x** time" in text and "7.2x less memory" in text
    assert "**11.4x**" in text  # 45.7 / 4.0
    assert "(measured 8.05 s on one device, 5.37 s on 2: met)" in text
    assert "(2.00 GB: met)" in text
    assert "split over 2 CPU devices (`caasl train --local-devices 2`)" in text
    assert "| 5.37 s, 2.00 GB peak RSS | **9.0x** time |" in text  # 48.3 / 5.37
    assert "10x (met)" in text
    assert "| linear env episode (linear-d10), 1,000 envs, reward excluded | 4,600" in text
    assert "| 150,000 transitions/s | **33x** |" in text  # 1.5e5 / 4,600
    assert "| SERGIO env episode (sergio-d10), 1,000 envs, reward excluded | 930" in text
    assert "| 18,600 transitions/s | **20x** |" in text  # 1.86e4 / 930
    assert "| 100 | 10,000 | 5,000 |" in text  # the SERGIO batch table
    assert "| 256 | 8.05 | 31.8 | 2.00 | 0.200 |" in text  # no compile times recorded
    timed = _results(grad_s=8.05, act_s=4.0)
    for i, row in enumerate(timed["grad_step"]["batch_sweep"]):
        row["compile_s"] = 30.0 + i
    assert "| 256 | 8.05 | 31.8 | 31.0 | 2.00 | 0.200 |" in report.render(timed, "now")
    slow = report.render(_results(grad_s=20.0, act_s=6.0), "now")
    assert "(measured 20.00 s on one device, 13.33 s on 2: NOT met)" in slow
    assert "10x (NOT met)" in slow


def test_device_rows_pair_the_step_and_the_fused_call_by_device_count():
    results = _results(grad_s=8.05, act_s=4.0)
    results["train_small"]["results"] = [dict(results["train_small"]["results"][1])]  # 2 only
    text = report.render(results, "now")
    assert "| 1 | 8.05 | 31.8 | — | — |" in text
    assert "| 2 | 5.37 | 47.7 | 10.00 | 80 |" in text


def test_figures_from_another_machine_are_named():
    results = _results(grad_s=8.05, act_s=4.0)
    assert "; except" not in report.render(results, "now")
    gpu = {**results["grad_step"]["machine"], "cpu_count": 16, "backend": "gpu"}
    results["train_paper"]["results"][0]["machine"] = gpu
    assert "; except train_paper (x86_64, 16 cores, jax 0 (gpu));" in report.render(results, "now")


def test_attention_path_is_named_per_benchmark_when_they_differ():
    results = _results(grad_s=8.05, act_s=4.0)
    assert "; the networks' attention: pure JAX." in report.render(results, "now")
    results["grad_step"]["machine"]["attention"] = "fused CPU kernel"
    for row in results["train_small"]["results"] + results["train_paper"]["results"]:
        row["machine"] = dict(results["grad_step"]["machine"])
    assert "; the networks' attention: fused CPU kernel." in report.render(results, "now")
    results["train_small"]["results"][1]["machine"]["attention"] = "pure JAX"
    assert report.attention_text(results) == (
        "the networks' attention: grad_step fused CPU kernel, "
        "train_small fused CPU kernel and pure JAX, train_paper fused CPU kernel"
    )


def test_from_json_without_saved_results_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="grad_step"):
        report.load_results()


def _baseline_runtime() -> dict:
    timing = lambda s: {"median_s": s}  # noqa: E731
    step = lambda rows: {  # noqa: E731
        "rows": rows,
        "posterior_refit": timing(1.0),
        "diffcbed": timing(3.0),
        "ss_finite": timing(0.01),
    }
    return {
        "measured_at": "2026-12-01T06:25:13+00:00",
        "envs": {
            "linear-d10": {
                "caasl_forward": {"batch_100": {"per_env_s": 0.005}},
                "after_step_0": step(50),
                "after_step_9": step(59),
                "end_to_end": {
                    "diffcbed": {"per_step_per_env_s": 2.5, "n_envs": 2, "workers": 2},
                    "ss-finite": {"per_step_per_env_s": 0.5, "n_envs": 2, "workers": 2},
                },
            }
        },
    }


def test_baselines_are_reported_next_to_caasl_when_measured():
    results = _results(grad_s=8.05, act_s=4.0)
    assert "Likelihood-based design" not in report.render(results, "now")
    text = report.render({**results, "baseline_runtime": _baseline_runtime()}, "now")
    assert "(measured 2026-12-01 06:25 UTC, `python -m benchmarks.baseline_runtime`" in text
    assert "| DiffCBED | 4.00 s / 4.00 s | 2.50 s (2 envs, 2 workers) | 500x slower |" in text
    assert "| SS Finite | 1.01 s / 1.01 s | 0.50 s (2 envs, 2 workers) | 100x slower |" in text


def test_measurement_times_come_from_the_stamps_file(tmp_path, monkeypatch):
    # a fresh checkout rewrites file times, so they must not date the figures
    stamps = ["2026-11-29T10:45:00+00:00", "2026-11-28T23:18:30+00:00"]
    assert report.measured_between(stamps) == "between 2026-11-28 23:18 and 2026-11-29 10:45 UTC"
    assert report.measured_between(stamps[:1]) == "2026-11-29 10:45 UTC"
    monkeypatch.setattr(report, "STAMPS_FILE", tmp_path / "measured_at.json")
    assert report.load_stamps() == {}
    committed = report.json.loads((report.RESULTS_DIR / "measured_at.json").read_text())
    assert set(report.BENCHMARKS) <= set(committed)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--act-histories", "0"], "--act-histories: expected an integer >= 1, got 0"),
        (["--batch-sizes", "32", "x"], "expected an integer >= 1, got 'x'"),
        (["--device-batch", "30", "--devices", "1", "4"], "does not split over [4] devices"),
        (["--rows", "."], "--rows . is a folder; give a file path"),
    ],
)
def test_grad_step_rejects_bad_sizes_before_starting_any_measurement(argv, message, capsys):
    from benchmarks import grad_step

    with pytest.raises(SystemExit) as exit_info:
        grad_step.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_checks_its_output_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "run_benchmark", lambda name: pytest.fail("measured"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out, message in ((tmp_path, "is a folder"), (afile / "R.md", "which is a file")):
        with pytest.raises(SystemExit):
            report.main(["--only", "replay", "--out", str(out)])
        assert message in capsys.readouterr().err
    assert afile.read_text() == "keep"
