"""The prepared GPU pretraining script, run in its CPU smoke-test mode (QUICK=1).

A GPU lease is short and rare: a script that fails there (a renamed option, a file
the device tool cannot bring back) wastes it, so the whole pipeline runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_bash(command: list[str], **settings: str) -> subprocess.CompletedProcess:
    """Run a bash command from the repository root on the CPU, with these environment
    variables; python3 in it is this interpreter (the project's venv)."""
    env = {k: v for k, v in os.environ.items() if k != "QUICK"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env.update(JAX_PLATFORMS="cpu", **settings)
    return subprocess.run(
        ["bash", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _run_script(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    return _run_bash(
        ["scripts/gpu_pretrain.sh"],
        QUICK="1",
        DEADLINE_S="45",
        OUT=str(tmp_path / "out"),
        RUN_DIR=str(tmp_path / "runs" / "reward-gpu"),
        **settings,
    )


@pytest.mark.slow
def test_gpu_pretrain_script_calibrates_trains_exports_and_resumes(tmp_path):
    first = _run_script(tmp_path, STANDARDIZATION="none")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    # what the device tool brings back: at most 8 plain files, no folders
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files)
    plan = json.loads((out / "calibration.json").read_text())
    assert plan["steps"] > 0 and plan["steps"] % plan["steps_per_call"] == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    best = json.loads((out / "heldout.json").read_text())
    assert best == max(log, key=lambda r: r["eval_expected_correct"])
    assert 0 < best["step"] <= plan["steps"]
    assert (out / "linear-d10-gpu.msgpack").stat().st_size > 0
    from caasl_jax.reward.checkpoint import load_weights

    exported = load_weights(out / "linear-d10-gpu.msgpack")
    assert exported.config.standardization == "none"
    assert "intervention_gain" in exported.meta["heldout"] and "eval_intervention_gain" in best
    with tarfile.open(out / "run.tar") as tar:
        names = tar.getnames()
    assert "reward-gpu/run.json" in names
    checkpoints = {n.split("/")[2] for n in names if n.startswith("reward-gpu/ckpt/")}
    assert len(checkpoints) == 1  # the latest only (the run folder keeps two)

    other = _run_script(tmp_path, STANDARDIZATION="zscore")  # not the run's own
    assert other.returncode == 2 and "reads its input as none" in other.stderr
    # the run folder is there: resume with its own settings, no calibration
    second = _run_script(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = f"resuming {tmp_path / 'runs' / 'reward-gpu'}: {plan['steps']} steps"
    assert f"{resumed}, standardization none" in second.stdout
    assert "calibrated" not in second.stdout


def test_gpu_scripts_stop_when_jax_sees_no_gpu():
    done = _run_bash(["-c", "set -e; source scripts/gpu_site.sh; echo measured"])
    assert done.returncode == 2 and "measured" not in done.stdout
    assert "no GPU: JAX runs on cpu" in done.stderr
