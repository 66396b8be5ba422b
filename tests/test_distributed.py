"""Multi-process training through jax.distributed, on two local CPU processes.

The fused step's mesh spans the devices of every process; with 2 processes x 2 CPU
devices the global program is the same as 1 process x 4 devices (device i rolls out
with fold_in(key, i) in both), so the two runs must agree up to the order of the
cross-device float sums.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from caasl_jax import distributed
from caasl_jax import train as train_lib
from caasl_jax.agents.redq import Transition
from caasl_jax.config import TrainConfig, from_dict
from caasl_jax.envs.core import History

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config_dict, tiny_reward_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# a guard against a deadlocked collective, not a speed limit: the three processes share
# 2 cores with the other pytest worker (130-210 s in CI; one run on a loaded VM passed
# 300 s while its processes were still training)
TIMEOUT_S = 900

# one process of a run: settings come from CAASL_* variables, read by train() itself.
# "split": one host call, then a resume from the checkpoint to the end (in the same
# process, so the compiled step is reused); "straight": uninterrupted, and then, with
# the 4 devices it has, the check below that one sharded REDQ update equals the
# same update on one device (a process of its own cost ~75 CPU-s on 2 cores). The score
# is the test reward of test_train (no AVICI model) to keep compilation short.
WORKER_SCRIPT = textwrap.dedent(
    """
    import sys

    import jax
    import numpy as np

    sys.path.insert(0, sys.argv[1])
    from test_distributed import assert_sharded_update_matches_one_device
    from test_train import intervened_values_score, tiny_config_dict
    from caasl_jax import train as train_lib
    from caasl_jax.config import TrainConfig, from_dict

    reward, run_dir, out, mode = sys.argv[2:6]
    config = from_dict(TrainConfig, tiny_config_dict(reward))
    run = lambda **kw: train_lib.train(
        config, run_dir, progress=False, score_builder=intervened_values_score, **kw
    )
    if mode == "split":
        assert run(max_calls=1)["calls_done"] == 1
        summary = run(resume=True)
    else:
        summary = run()
        assert_sharded_update_matches_one_device(reward)
    state = summary["state"]
    assert jax.device_count() == 4, jax.devices()
    # every local copy of the replicated agent is the same; keep the first
    agent = []
    for leaf in jax.tree.leaves(state.agent):
        copies = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert all(np.array_equal(c, copies[0]) for c in copies[1:])
        agent.append(copies[0])
    # this process's block of the sharded replay, in global device order
    shards = sorted(state.replay.values.addressable_shards, key=lambda s: s.index[0].start or 0)
    np.savez(
        out,
        *agent,
        replay=np.concatenate([np.asarray(s.data) for s in shards]),
        replay_start=shards[0].index[0].start or 0,
        process=jax.process_index(),
        calls=summary["calls_done"],
    )
    print("WORKER OK", jax.process_index(), jax.process_count(), jax.local_device_count())
    """
)


def assert_sharded_update_matches_one_device(reward_path) -> None:
    """One REDQ update of a global batch sharded over 4 devices == the same batch on 1.

    Needs 4 devices, so the single-process reference worker (1 process x 4 CPU devices)
    calls it, saving a process of its own. Batch 24 = 6 per device: above
    the CPU micro-batch of 4, so the chunked gradient accumulation (with a padded last
    chunk) runs inside shard_map. Random transitions of the env's shapes: what a rollout
    puts in them is the two-process test's and test_redq's business.
    """
    assert len(jax.devices()) == 4, jax.devices()
    config = from_dict(TrainConfig, {**tiny_config_dict(reward_path), "batch_size": 24})
    trainer, _ = train_lib.make_trainer(config)
    assert trainer.n_devices == 4
    agent, env = trainer.agent, trainer.env
    one = train_lib.make_trainer(config, devices=jax.devices()[:1])[0]
    st = one.init_state()
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    length = jax.random.randint(k1, (1, 24), env.n0, env.n_rows)
    data = jax.random.normal(k2, (1, 24, env.n_rows, env.d, 2))

    def history(n):
        rows = (jnp.arange(env.n_rows) < n[..., None])[..., None, None]
        return History(jnp.where(rows, data, 0.0), n)

    batch = Transition(
        obs=history(length),
        action=jax.random.uniform(k3, (1, 24, env.action_dim), minval=-1, maxval=1),
        reward=jax.random.normal(k1, (1, 24)),
        next_obs=history(length + 1),
        done=(length + 1 == env.n_rows).astype(jnp.float32),
    )
    key = jax.random.key(5)
    single, _ = jax.jit(agent.update)(st.agent, batch, key)
    batch_spec = jax.tree.map(lambda x: P(None, train_lib.AXIS), batch)
    sharded_update = jax.shard_map(
        lambda s, b, k: agent.update(s, b, k, axis_name=train_lib.AXIS),
        mesh=trainer.mesh,
        in_specs=(P(), batch_spec, P()),
        out_specs=P(),
        check_vma=False,
    )
    replicated = jax.sharding.NamedSharding(trainer.mesh, P())
    on_mesh = lambda tree: jax.device_put(tree, replicated)  # noqa: E731
    multi, _ = jax.jit(sharded_update)(on_mesh(st.agent), on_mesh(batch), on_mesh(key))
    for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(multi), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, *, local_devices, coordinator=None, num_processes=1, process_id=0):
    """Start one training process; CAASL_* variables carry the distributed settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CAASL_") and key != "XLA_FLAGS"
    }
    env.update(JAX_PLATFORMS="cpu", CAASL_LOCAL_DEVICES=str(local_devices))
    if coordinator is not None:
        env.update(
            CAASL_COORDINATOR=coordinator,
            CAASL_NUM_PROCESSES=str(num_processes),
            CAASL_PROCESS_ID=str(process_id),
            CAASL_CONNECT_TIMEOUT="240",
        )
    process = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    # what a process that joins a run must say before it waits (checked by `finish`)
    process.joining_line = (
        f"caasl: process {process_id} of {num_processes} waits up to 240 s" if coordinator else ""
    )
    return process


def finish(processes) -> None:
    """Wait for every process; fail with their output unless all printed WORKER OK."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0 and "WORKER OK" in out, out[-2000:] + err[-4000:]
        assert process.joining_line in err, err[-4000:]  # with CAASL_CONNECT_TIMEOUT


def agent_leaves(npz) -> list[np.ndarray]:
    return [npz[f"arr_{i}"] for i in range(len([k for k in npz.files if k.startswith("arr_")]))]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# one process of a run whose processes disagree: process i trains with seed i
MISMATCH_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.path.insert(0, sys.argv[1])
    from test_train import intervened_values_score, tiny_config_dict
    from caasl_jax import distributed
    from caasl_jax import train as train_lib
    from caasl_jax.config import TrainConfig, from_dict

    reward, run_dir = sys.argv[2:4]
    distributed.initialize()
    import jax

    config = from_dict(TrainConfig, {**tiny_config_dict(reward), "seed": jax.process_index()})
    try:
        train_lib.train(config, run_dir, progress=False, score_builder=intervened_values_score)
    except ValueError as error:
        assert "started with different settings" in str(error), error
        print("WORKER OK")
    """
)


def test_processes_started_with_different_settings_all_refuse(tmp_path):
    """Each used to train on its own settings and report its own numbers."""
    reward = tiny_reward_weights(tmp_path / "reward.msgpack")
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_SCRIPT)
    coordinator = f"127.0.0.1:{free_port()}"
    finish(
        [
            launch(
                script,
                [reward, tmp_path / "run"],
                local_devices=1,
                coordinator=coordinator,
                num_processes=2,
                process_id=p,
            )
            for p in range(2)
        ]
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    reward = tiny_reward_weights(tmp_path / "reward.msgpack")
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    out = {name: tmp_path / f"{name}.npz" for name in ("ref", "p0", "p1")}

    # 2 processes x 2 devices: one call, then a resume from the multi-process
    # checkpoint for the rest; alongside, 1 process x 4 devices uninterrupted
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [
        launch(
            script,
            [reward, tmp_path / "dist", out[f"p{p}"], "split"],
            local_devices=2,
            coordinator=coordinator,
            num_processes=2,
            process_id=p,
        )
        for p in range(2)
    ]
    processes.append(
        launch(script, [reward, tmp_path / "ref", out["ref"], "straight"], local_devices=4)
    )
    finish(processes)

    ref, p0, p1 = (np.load(out[name]) for name in ("ref", "p0", "p1"))
    assert (int(p0["process"]), int(p1["process"])) == (0, 1)
    assert int(p0["calls"]) == int(ref["calls"]) == 2
    # replicated parameters: bit-identical on both processes
    for x, y in zip(agent_leaves(p0), agent_leaves(p1), strict=True):
        np.testing.assert_array_equal(x, y)
    # ... and equal to the single-process run up to float summation order
    for x, y in zip(agent_leaves(p0), agent_leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    # each process fed and kept its own half of the replay: devices (0, 1) and (2, 3)
    half = ref["replay"].shape[0] // 2
    assert (int(p0["replay_start"]), int(p1["replay_start"])) == (0, half)
    np.testing.assert_allclose(p0["replay"], ref["replay"][:half], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(p1["replay"], ref["replay"][half:], rtol=2e-4, atol=2e-5)
    assert np.abs(p1["replay"]).sum() > 0  # episodes were stored

    # only process 0 logged: one line per iteration, no duplicates, same numbers
    dist_metrics, ref_metrics = (
        jsonl(tmp_path / "dist/metrics.jsonl"),
        jsonl(tmp_path / "ref/metrics.jsonl"),
    )
    assert [row["iteration"] for row in dist_metrics] == [1, 2, 3, 4]
    # the tiny config warms up for one iteration
    assert [row["updated"] for row in dist_metrics] == [0.0, 1.0, 1.0, 1.0]
    for a, b in zip(dist_metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(a["return_mean"], b["return_mean"], rtol=1e-4)
        assert a["updated"] == b["updated"]
        if a["updated"]:
            np.testing.assert_allclose(a["critic_loss"], b["critic_loss"], rtol=1e-3, atol=1e-5)
        else:  # no update: NaN metrics, which metrics.jsonl writes as null
            assert a["critic_loss"] is b["critic_loss"] is None
    dist_eval, ref_eval = jsonl(tmp_path / "dist/eval.jsonl"), jsonl(tmp_path / "ref/eval.jsonl")
    assert [row["call"] for row in dist_eval] == [0, 1]
    for a, b in zip(dist_eval, ref_eval, strict=True):
        np.testing.assert_allclose(a["eval_return"], b["eval_return"], rtol=1e-4, atol=1e-6)
    for name in ("curves.png", "config.yaml", "checkpoints"):
        assert (tmp_path / "dist" / name).exists()


@pytest.mark.parametrize(
    "kwargs, environ, expected",
    [
        ({}, {}, distributed.Settings()),
        (
            {},
            {
                "CAASL_COORDINATOR": "10.0.0.1:1234",
                "CAASL_NUM_PROCESSES": "4",
                "CAASL_PROCESS_ID": "3",
                "CAASL_LOCAL_DEVICES": "2",
            },
            distributed.Settings("10.0.0.1:1234", 4, 3, 2),
        ),
        # explicit arguments win over the environment
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": 0},
            {"CAASL_COORDINATOR": "other:2", "CAASL_NUM_PROCESSES": "8", "CAASL_PROCESS_ID": "5"},
            distributed.Settings("h:1", 2, 0),
        ),
        ({}, {"CAASL_DISTRIBUTED": "auto"}, distributed.Settings(auto=True)),
        ({"local_device_count": 4}, {}, distributed.Settings(local_device_count=4)),
        ({"auto": True}, {}, distributed.Settings(auto=True)),
        ({}, {"CAASL_CONNECT_TIMEOUT": "20"}, distributed.Settings(connect_timeout=20)),
        (
            {"connect_timeout": 5},
            {"CAASL_CONNECT_TIMEOUT": "20"},
            distributed.Settings(connect_timeout=5),
        ),
    ],
)
def test_settings_resolve_arguments_then_environment(kwargs, environ, expected):
    settings = distributed.resolve_settings(**kwargs, environ=environ)
    assert settings == expected
    assert settings.multi_process == (expected.coordinator is not None or expected.auto)


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        ({"coordinator": "h:1"}, {}, "needs all of coordinator, num_processes and process_id"),
        ({}, {"CAASL_PROCESS_ID": "0"}, "needs all of"),
        ({"coordinator": "h", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({"coordinator": "h:port", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({"coordinator": ":1234", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({"coordinator": "h:70000", "num_processes": 2, "process_id": 0}, {}, "port 1-65535"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id <"),
        ({}, {"CAASL_NUM_PROCESSES": "two"}, "CAASL_NUM_PROCESSES must be an integer"),
        ({"local_device_count": 0}, {}, "local device count must be >= 1"),
        ({}, {"CAASL_DISTRIBUTED": "yes"}, "CAASL_DISTRIBUTED must be 'auto'"),
        ({}, {"CAASL_CONNECT_TIMEOUT": "0"}, "connect timeout must be >= 1 s, got 0"),
        ({}, {"CAASL_CONNECT_TIMEOUT": "1m"}, "CAASL_CONNECT_TIMEOUT must be an integer"),
        ({"process_id": 9, "auto": True}, {}, "would ignore the coordinator"),
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": 0},
            {"CAASL_DISTRIBUTED": "auto"},
            "use one or the other",
        ),
    ],
)
def test_bad_settings_fail_clearly(kwargs, environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_settings(**kwargs, environ=environ)


def test_joining_message_says_who_waits_for_whom_and_how_long():
    settings = distributed.resolve_settings("h:1", 3, 2, connect_timeout=40, environ={})
    assert distributed.joining_message(settings).startswith(
        "caasl: process 2 of 3 waits up to 40 s for all 3 processes at h:1 to join"
    )
    auto = distributed.joining_message(distributed.Settings(auto=True))
    assert "cluster auto-detection) waits up to 300 s" in auto


def test_second_process_zero_is_refused_while_the_port_is_taken():
    """A duplicate process 0 used to wait 300 s for JAX's registration timeout, then
    abort with a native stack trace."""
    with socket.socket() as holder:  # stands in for the first process 0's coordinator
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAASL_")}
        env["JAX_PLATFORMS"] = "cpu"
        result = subprocess.run(
            [sys.executable, "-c", "from caasl_jax.cli import console_main; console_main()",
             "train", "--config", "small", "--run-dir", "unused",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
             "--connect-timeout", "60"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"coordinator port {port} is already in use" in result.stderr
    assert not (Path(ROOT) / "unused").exists()
