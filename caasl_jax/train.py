"""The fused, sharded CAASL training step and the host loop around it.

One call of the compiled `train_chunk` runs, on every device of a 1-D mesh ("data"),
K = iterations_per_call iterations of

    rollout:  B/n_dev environments (fresh hidden params) x T design steps with the
              policy, each step scored by the AVICI reward model inside env.step
    replay:   the finished episodes enter this device's episode replay shard
    learn:    U REDQ updates (G critic steps + 1 policy step each), minibatches drawn
              from the local shard, gradients averaged over devices with lax.pmean

as a `lax.scan` under `jax.jit(jax.shard_map(...))`, with the agent state and replay
donated. Parameters are replicated, environments and replay are sharded. The same
program runs on one CPU, every local GPU, or every device of every host after
`jax.distributed.initialize()` (caasl_jax.distributed; docs/distributed.md): the mesh
is then global, each process builds only the shards on its own devices, process 0
writes the logs, and all processes write their shards of each orbax checkpoint.

Randomness is a pure function of (seed, host-call index), so a run resumed from a
checkpoint continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caasl_jax import distributed
from caasl_jax import replay as replay_lib
from caasl_jax.agents.networks import CriticConfig, PolicyConfig
from caasl_jax.agents.redq import REDQ, REDQState
from caasl_jax.checks import CheckpointError, folder_problem
from caasl_jax.config import TrainConfig, from_dict, read_yaml_mapping, to_dict
from caasl_jax.digest import check_digest, record_digest
from caasl_jax.envs.core import Environment, empty_history
from caasl_jax.envs.registry import make_env
from caasl_jax.evaluate import agent_policy, heldout_params, random_policy, rollout_episodes
from caasl_jax.jsonl import keep_rows_up_to, to_line

AXIS = "data"
# jitted functions per (config, devices): a resumed or repeated run in the same
# process reuses the compiled program instead of tracing a new Trainer's methods
_COMPILED: dict[tuple, Any] = {}


# ----------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------


def action_kind(env: Environment) -> str:
    """'targets_values' for 2d-dimensional actions (linear), 'targets' for d (SERGIO)."""
    return "targets_values" if env.action_dim == 2 * env.d else "targets"


def build_agent(config: TrainConfig, env: Environment) -> REDQ:
    """The REDQ agent described by the config, for the env's action layout."""
    kind = action_kind(env)
    policy = PolicyConfig(
        encoder=config.policy.encoder, hidden=config.policy.hidden, action_kind=kind
    )
    critic = CriticConfig(
        encoder=config.critic.encoder,
        hidden=config.critic.hidden,
        action_kind=kind,
        num_critics=config.redq.num_critics,
    )
    return REDQ(policy, critic, config.redq)


def make_mesh(devices=None) -> Mesh:
    """1-D "data" mesh over `devices`, default every device of every process."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def tile_shard(shard, sharding: NamedSharding) -> jax.Array:
    """The global array whose every device holds `shard` along axis 0.

    shard: [C, ...] -> global [n_devices * C, ...], sharded by `sharding` (P(AXIS)).
    Each process materialises only the blocks of its own devices, so the global
    array never exists on one host.
    """
    block = np.asarray(shard)
    shape = (sharding.mesh.size * block.shape[0], *block.shape[1:])

    def local_block(index):
        start, stop, _ = index[0].indices(shape[0])
        return np.concatenate([block] * ((stop - start) // block.shape[0]))

    return jax.make_array_from_callback(shape, sharding, local_block)


def put_replicated(tree, mesh: Mesh):
    """The pytree replicated on every device of the mesh, equal to process 0's copy."""
    return jax.device_put(distributed.broadcast_from_primary(tree), NamedSharding(mesh, P()))


@dataclasses.dataclass(frozen=True)
class RewardModelScore:
    """Builds the reward's score function from (traced) reward-model parameters: the
    AVICI network (config an AviciConfig) or the exact posterior (an ExactPrior).

    Hashable by value, so equal configs share one compiled program.
    """

    config: Any

    def __call__(self, reward_params):
        from caasl_jax.reward.reward import make_score_fn

        return make_score_fn(reward_params, self.config)


def scored_env(env: Environment, score_builder, reward_params) -> Environment:
    """The environment with the reward plugged in: score_builder(reward_params)."""
    return env.with_score(score_builder(reward_params))


@struct.dataclass
class TrainState:
    """Everything that evolves during training (replay sharded, the rest replicated)."""

    agent: REDQState
    replay: replay_lib.ReplayState


# ----------------------------------------------------------------------------------
# the fused step
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Static pieces of a run: config, env, agent, mesh; builds the compiled step."""

    config: TrainConfig
    env: Environment
    agent: REDQ
    score_builder: Any  # reward_params -> score_fn(history, graph); see RewardModelScore
    mesh: Mesh

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def local(self, global_size: int, what: str) -> int:
        if global_size % self.n_devices:
            raise ValueError(
                f"{what} ({global_size}) must be divisible by the number of devices "
                f"({self.n_devices})"
            )
        return global_size // self.n_devices

    # --- state ----------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """Fresh agent (replicated) and empty replay (sharded over devices)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1)
        example = empty_history(self.env.n_rows, self.env.d)  # only its shape is read
        agent_state = self.agent.init(key, example, jnp.zeros((self.env.action_dim,)))
        capacity = self.local(self.config.replay_episodes, "replay_episodes")
        shard = replay_lib.init_replay(
            capacity,
            n0=self.env.n0,
            budget=self.env.budget,
            d=self.env.d,
            action_dim=self.env.action_dim,
            samples_per_step=self.env.samples_per_step,
        )
        shardings = self.state_sharding(TrainState(agent=agent_state, replay=shard))
        replay = jax.tree.map(
            lambda x, s: tile_shard(x, s) if x.ndim else jax.device_put(x, s),
            shard,
            shardings.replay,
        )
        return TrainState(agent=put_replicated(agent_state, self.mesh), replay=replay)

    def state_specs(self, state: TrainState):
        replay_specs = jax.tree.map(lambda x: P(AXIS) if x.ndim else P(), state.replay)
        return TrainState(agent=jax.tree.map(lambda _: P(), state.agent), replay=replay_specs)

    def state_sharding(self, state: TrainState):
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.state_specs(state))

    # --- per-device pieces ---------------------------------------------------------------
    def _rollout(self, policy_params, reward_params, key):
        """B/n_dev episodes on this device: (Episode[B_local], scores f32[B_local, 2])."""
        env = scored_env(self.env, self.score_builder, reward_params)
        n_local = self.local(self.config.num_envs, "num_envs")
        params_key, episode_key = jax.random.split(key)
        env_params = jax.vmap(env.sample_params)(jax.random.split(params_key, n_local))
        policy = agent_policy(self.agent, policy_params, "stochastic")
        history, actions, rewards = rollout_episodes(env, policy, env_params, episode_key)
        dones = jnp.broadcast_to(jnp.arange(env.budget) == env.budget - 1, rewards.shape)
        return replay_lib.Episode(history=history, actions=actions, rewards=rewards, dones=dones)

    def _learn(self, agent_state, replay, key):
        """U REDQ updates from the local replay shard; metrics averaged over devices."""
        cfg = self.config
        b_local = self.local(cfg.batch_size, "batch_size")
        device = jax.lax.axis_index(AXIS)

        def one_update(agent_state, update_key):
            sample_key, step_key = jax.random.split(update_key)
            batch = replay_lib.sample_transitions(
                replay, jax.random.fold_in(sample_key, device), (cfg.redq.utd, b_local)
            )
            return self.agent.update(agent_state, batch, step_key, axis_name=AXIS)

        agent_state, metrics = jax.lax.scan(
            one_update, agent_state, jax.random.split(key, cfg.updates_per_iteration)
        )
        return agent_state, jax.tree.map(jnp.mean, metrics)

    def _iteration(self, reward_params, carry: TrainState, key):
        cfg = self.config
        roll_key, learn_key = jax.random.split(key)
        device = jax.lax.axis_index(AXIS)
        episodes = self._rollout(
            carry.agent.policy_params, reward_params, jax.random.fold_in(roll_key, device)
        )
        replay = replay_lib.add_episodes(carry.replay, episodes)
        warmup_local = math.ceil(cfg.warmup_episodes / self.n_devices)
        ready = replay.size >= max(warmup_local, 1)
        metric_shapes = jax.eval_shape(self._learn, carry.agent, replay, learn_key)[1]

        def skip(agent_state, replay, key):
            return agent_state, jax.tree.map(
                lambda s: jnp.full(s.shape, jnp.nan, s.dtype), metric_shapes
            )

        agent_state, metrics = jax.lax.cond(
            ready, self._learn, skip, carry.agent, replay, learn_key
        )
        returns = episodes.rewards.sum(-1)
        metrics = {
            **metrics,
            "return_mean": jax.lax.pmean(returns.mean(), AXIS),
            "replay_episodes": replay.size * self.n_devices,
            "updated": ready,
        }
        return TrainState(agent=agent_state, replay=replay), metrics

    def _chunk(self, state: TrainState, reward_params, key):
        keys = jax.random.split(key, self.config.iterations_per_call)
        return jax.lax.scan(functools.partial(self._iteration, reward_params), state, keys)

    def cache_key(self) -> tuple:
        """Equal for trainers that build the same program (config and devices)."""
        return (
            json.dumps(to_dict(self.config), sort_keys=True),
            tuple(d.id for d in self.mesh.devices.flat),
            self.score_builder,
        )

    def compile_chunk(self, state: TrainState):
        """jit(shard_map(chunk)) with the train state donated; one per config and devices.

        (state, reward_params, key) -> (state, metrics with a leading [K] axis).
        """
        key = ("chunk", self.cache_key())
        if key not in _COMPILED:
            _COMPILED[key] = self._build_chunk(state)
        return _COMPILED[key]

    def _build_chunk(self, state: TrainState):
        specs = self.state_specs(state)
        sharded = jax.shard_map(
            self._chunk,
            mesh=self.mesh,
            in_specs=(specs, P(), P()),
            out_specs=(specs, P()),
            check_vma=False,
        )
        # explicit shardings: on one device XLA would otherwise hand back P() for the
        # replay, and the next call would compile again for the "new" sharding
        shardings = self.state_sharding(state)
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(
            sharded,
            donate_argnums=(0,),
            in_shardings=(shardings, replicated, replicated),
            out_shardings=(shardings, replicated),
        )

    def chunk_key(self, call_index: int) -> jax.Array:
        """The key of host call `call_index`: a pure function of (seed, index)."""
        return jax.random.fold_in(jax.random.key(self.config.seed), 1_000_003 + call_index)


def make_trainer(config: TrainConfig, devices=None, score_builder=None) -> tuple[Trainer, Any]:
    """(Trainer, reward_params replicated on the mesh); validates everything before any work.

    By default the reward is the reward model `config.reward_model_name` (AVICI weights,
    or "exact": the exact posterior of the env's prior). A custom
    `score_builder(reward_params) -> score_fn(history, graph)` (hashable, e.g. a
    module-level function) replaces it; its reward_params are then empty.
    """
    env = make_env(config.env, **config.env_overrides)
    if env.budget < 1:
        raise ValueError(
            f"config: training needs a budget of >= 1 design step per episode, got "
            f"{env.budget} (env_overrides)"
        )
    if score_builder is None:
        from caasl_jax.evaluate import reward_models_for

        models = reward_models_for(config.reward_model_name, {config.env: env})
        reward_params, reward_config = models[config.env]
        score_builder = RewardModelScore(reward_config)
    else:
        reward_params = {}
    trainer = Trainer(config, env, build_agent(config, env), score_builder, make_mesh(devices))
    trainer.local(config.num_envs, "num_envs")
    trainer.local(config.batch_size, "batch_size")
    trainer.local(config.replay_episodes, "replay_episodes")
    return trainer, put_replicated(reward_params, trainer.mesh)


# ----------------------------------------------------------------------------------
# evaluation during training
# ----------------------------------------------------------------------------------


def make_evaluator(trainer: Trainer, reward_params):
    """evaluate(policy_params) -> held-out returns of the policy and of random designs.

    The held-out environments are the seed's "validation" split, disjoint from the
    "test" split `caasl evaluate` reports on; the random baseline runs once.
    """
    cfg = trainer.config
    cache_key = ("eval", trainer.cache_key())
    if cache_key not in _COMPILED:

        @functools.partial(jax.jit, static_argnames="baseline")
        def heldout_returns(policy_params, reward_params, baseline: bool):
            env = scored_env(trainer.env, trainer.score_builder, reward_params)
            params = heldout_params(trainer.env, cfg.eval_envs, cfg.seed, split="validation")
            if baseline:
                policy = random_policy(env)
            else:
                policy = agent_policy(trainer.agent, policy_params, "stochastic")
            key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
            return rollout_episodes(env, policy, params, key)[2].sum(-1)

        _COMPILED[cache_key] = heldout_returns
    heldout_returns = _COMPILED[cache_key]
    random_returns = heldout_returns(None, reward_params, baseline=True)
    random_mean = float(random_returns.mean())
    random_se = float(random_returns.std(ddof=1) / np.sqrt(cfg.eval_envs))

    def evaluate(policy_params) -> dict[str, float]:
        returns = heldout_returns(policy_params, reward_params, baseline=False)
        return {
            "eval_return": float(returns.mean()),
            "eval_return_se": float(returns.std(ddof=1) / np.sqrt(cfg.eval_envs)),
            "eval_random_return": random_mean,
            "eval_random_return_se": random_se,
        }

    return evaluate


# ----------------------------------------------------------------------------------
# run directory, checkpoints, host loop
# ----------------------------------------------------------------------------------


class RunDir:
    """Layout of a run directory: config.yaml, run.json (the device count),
    metrics.jsonl, eval.jsonl, tb/, checkpoints/ (latest states, for resuming) and best/
    (the policy parameters with the highest validation return so far)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    run_info = property(lambda self: self.path / "run.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    evals = property(lambda self: self.path / "eval.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "best")
    tensorboard = property(lambda self: self.path / "tb")
    plot = property(lambda self: self.path / "curves.png")

    def check_new(self, overwrite: bool) -> None:
        """FileExistsError if the run dir exists and is not empty, unless overwrite is on
        and it is a run dir (has config.yaml): --overwrite never deletes other folders."""
        problem = folder_problem(self.path)
        if problem is not None:
            raise FileExistsError(f"run directory {self.path} {problem}; choose another --run-dir")
        if not (self.path.exists() and any(self.path.iterdir())):
            return
        if not overwrite:
            raise FileExistsError(
                f"run directory {self.path} already exists and is not empty; use "
                f"`caasl train --resume {self.path}` to continue it, or --overwrite to "
                f"replace it"
            )
        if not self.config.is_file():
            raise FileExistsError(
                f"--overwrite replaces run directories only, and {self.path} is not one "
                f"(no config.yaml); remove it yourself or choose another --run-dir"
            )

    def check_resumable(self, n_devices: int) -> None:
        """FileNotFoundError unless the run dir has checkpoints to resume from;
        ValueError if it was trained on another number of devices."""
        if not self.checkpoints.exists():
            raise FileNotFoundError(f"cannot resume {self.path}: it has no checkpoints/")
        if self.run_info.is_file():  # runs from before it was recorded are not checked
            try:
                recorded = json.loads(self.run_info.read_text())["devices"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"cannot resume {self.path}: {self.run_info} is damaged ({error!r}); it "
                    'should read {"devices": N}, the number of devices the run trained on'
                ) from None
            if recorded != n_devices:
                raise ValueError(
                    f"cannot resume {self.path} on {n_devices} devices: it was trained on "
                    f"{recorded} (each device's replay shard is a ring buffer of its own); "
                    f"resume it on {recorded} devices"
                )

    def prepare_new(self, config: TrainConfig, overwrite: bool, n_devices: int) -> None:
        """Create the run dir; refuse to touch an existing non-empty one unless told to."""
        self.check_new(overwrite)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        self.run_info.write_text(json.dumps({"devices": n_devices}) + "\n")

    def load_config(self) -> TrainConfig:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml)")
        return from_dict(TrainConfig, read_yaml_mapping(self.config), f"run config {self.config}")


def _checkpoint_manager(run: RunDir, config: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(run.checkpoints.absolute(), options=options)


def _best_manager(run: RunDir):
    """Orbax manager of best/: the policy parameters at every improvement of eval_return.

    All are kept (policy parameters only, small), so that a resume which drops the
    improvements made after the resumed state still has the best one before it.
    Saves synchronously: with two managers saving in the background at once, a
    multi-process run timed out in orbax's cross-process barriers
    (tests/test_distributed.py).
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        best_fn=lambda metrics: metrics["eval_return"],
        best_mode="max",
        create=True,
        enable_async_checkpointing=False,
    )
    try:  # it reads every saved policy's metrics to know the best one
        return ocp.CheckpointManager(run.best.absolute(), options=options)
    except Exception as error:  # orbax raises many types for damaged files
        raise CheckpointError(
            f"{run.best} is damaged (orbax cannot read its checkpoints' metrics): "
            f"{_first_line(error)}"
        ) from error


def best_eval_return(best_manager) -> float:
    """Validation return of the policy in best/ (-inf when there is none yet)."""
    step = best_manager.best_step()
    return -math.inf if step is None else float(best_manager.metrics(step)["eval_return"])


def restore_state(manager, trainer: Trainer, template: TrainState) -> tuple[TrainState, int]:
    """The latest checkpoint restored with the template's shardings; (state, calls done)."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint found under {manager.directory}")
    return _restore(manager, step, template, trainer.state_sharding(template)), int(step)


def _restore(manager, step: int, template, shardings):
    """Checkpoint `step` of `manager` as arrays shaped like `template`, placed by `shardings`."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, shardings
    )
    return restore_step(manager, step, abstract)


def restore_step(manager, step: int, target):
    """Checkpoint `step` of an orbax manager, restored into the structure, shapes and
    placement of `target` (arrays or ShapeDtypeStructs). A damaged checkpoint raises a
    CheckpointError that names it, instead of orbax's own exception; so does one whose
    contents differ from the digest recorded when it was saved (`caasl_jax.digest`)."""
    import orbax.checkpoint as ocp

    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(
            f"checkpoint {step} under {manager.directory} is unreadable, or was written "
            f"for other settings (network sizes, env, devices): {_first_line(error)}"
        ) from error
    check_digest(manager, step, restored)  # damage that orbax reads without complaint
    return restored


def _first_line(error: Exception, limit: int = 300) -> str:
    """The start of an error's text (orbax's can run to pages of tensorstore specs)."""
    text = (str(error).splitlines() or [repr(error)])[0]
    text = text.split(" See full TensorStore details")[0]  # a bound method's repr follows
    return text if len(text) <= limit else text[:limit] + " ..."


def _to_python(metrics: dict) -> list[dict]:
    """Metrics with a leading [K] axis -> K dicts of floats."""
    host = jax.device_get(metrics)
    k = len(next(iter(host.values())))
    return [{name: float(np.asarray(v)[i]) for name, v in host.items()} for i in range(k)]


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    devices=None,
    progress: bool = True,
    max_calls: int | None = None,
    score_builder=None,
) -> dict:
    """Train (or resume) a CAASL policy; returns a summary dict.

    Writes config.yaml, metrics.jsonl (one line per iteration), eval.jsonl, TensorBoard
    events under tb/, orbax checkpoints under checkpoints/, the policy with the best
    validation return under best/ and curves.png.
    `max_calls` stops early after that many host calls (used by tests).
    """
    from tqdm.auto import tqdm

    distributed.initialize()  # from CAASL_* variables; no-op if unset or already done
    settings = json.dumps([to_dict(config), max_calls, resume], sort_keys=True, default=str)
    if not distributed.same_everywhere(settings):
        raise ValueError(
            "the processes of this run were started with different settings (config, "
            "--set, --max-calls or --resume); start every process with the same command"
        )
    primary = distributed.is_primary()
    run = RunDir(run_dir)
    trainer, reward_params = make_trainer(config, devices, score_builder)  # fails fast
    _check_run_dir(run, trainer.n_devices, resume=resume, overwrite=overwrite)
    # before the run dir is created or replaced: a size the replay refuses must not
    # cost the old run (--overwrite) or leave a half-made one behind
    state = trainer.init_state()
    _create_run_dir(run, config, trainer.n_devices, resume=resume, overwrite=overwrite)
    manager = _checkpoint_manager(run, config)  # every process: each saves its shards
    best_manager = _best_manager(run)
    calls_done = 0
    if resume:
        state, calls_done = restore_state(manager, trainer, state)
        # improvements evaluated after the resumed state are redone below; every
        # process lists them before any deletes (orbax: all processes call delete)
        stale = [step for step in best_manager.all_steps() if step > calls_done]
        distributed.barrier("caasl-best-listed")
        for step in stale:
            best_manager.delete(step)
        if primary:
            keep_rows_up_to(run.metrics, "call", calls_done - 1)
            keep_rows_up_to(run.evals, "call", calls_done - 1)
    best_return = best_eval_return(best_manager)

    chunk = trainer.compile_chunk(state)
    evaluate = make_evaluator(trainer, reward_params)  # every process (one SPMD program)
    purge_step = calls_done * config.iterations_per_call + 1 if resume else None
    writer = _tensorboard(run, purge_step) if primary else None
    transitions_per_call = config.num_envs * trainer.env.budget * config.iterations_per_call
    last_call = (
        config.host_calls if max_calls is None else min(config.host_calls, calls_done + max_calls)
    )
    bar = tqdm(
        total=config.host_calls, initial=calls_done, disable=not (progress and primary), unit="call"
    )
    eval_row: dict = {}
    diverged = None
    with (
        _log_file(run.metrics, primary) as metrics_file,
        _log_file(run.evals, primary) as eval_file,
    ):
        for call in range(calls_done, last_call):
            start = time.perf_counter()
            state, metrics = chunk(state, reward_params, trainer.chunk_key(call))
            rows = _to_python(metrics)
            seconds = time.perf_counter() - start
            for i, row in enumerate(rows):
                row.update(call=call, iteration=call * config.iterations_per_call + i + 1)
                metrics_file.write(to_line(row))
                _log_scalars(writer, row, row["iteration"])
            speed = {
                "transitions_per_s": transitions_per_call / seconds,
                "grad_steps_per_s": config.updates_per_iteration
                * config.iterations_per_call
                / seconds,
            }
            _log_scalars(writer, speed, rows[-1]["iteration"])
            metrics_file.flush()
            diverged = first_divergence(rows)
            if diverged is not None:  # nothing of this call is evaluated or saved
                break
            if (call + 1) % config.eval_every == 0 or call + 1 == config.host_calls:
                eval_row = {
                    "call": call,
                    "iteration": rows[-1]["iteration"],
                    **evaluate(state.agent.policy_params),
                }
                eval_file.write(to_line(eval_row))
                eval_file.flush()
                _log_scalars(writer, eval_row, eval_row["iteration"])
                if eval_row["eval_return"] > best_return:
                    best_return = eval_row["eval_return"]
                    # digest first: a crash between the two must not leave a digest of
                    # an earlier save under this step (a resume re-saves dropped steps)
                    record_digest(best_manager, call + 1, state.agent.policy_params, primary)
                    best_manager.save(
                        call + 1,
                        args=_save_args(state.agent.policy_params),
                        metrics={"eval_return": best_return},
                    )
            if (call + 1) % config.checkpoint_every == 0 or call + 1 == last_call:
                record_digest(manager, call + 1, state, primary)
                manager.save(call + 1, args=_save_args(state))
            bar.set_postfix(
                ret=f"{rows[-1]['return_mean']:.2f}",
                tps=f"{speed['transitions_per_s']:.0f}",
                **(
                    {"eval": f"{eval_row['eval_return']:.2f}/{eval_row['eval_random_return']:.2f}"}
                    if eval_row
                    else {}
                ),
            )
            bar.update(1)
    bar.close()
    manager.wait_until_finished()
    best_manager.wait_until_finished()
    if writer is not None:
        writer.close()
    if primary:
        from caasl_jax.plots import plot_training_curves

        plot_training_curves(run.metrics, run.evals, run.plot)
    distributed.barrier("caasl-train-done")  # the plot exists when train() returns anywhere
    if diverged is not None:
        latest = manager.latest_step()
        kept = f"call {latest}" if latest is not None else "none saved yet"
        raise TrainingDiverged(
            f"training diverged at {diverged}; nothing from that call was saved (latest "
            f"checkpoint: {kept}), see {run.metrics}. Lower the learning rates or set "
            "redq.max_grad_norm"
        )
    best_step = best_manager.best_step()
    return {
        "run_dir": str(run.path),
        "calls_done": last_call,
        "last_eval": eval_row,
        # the policy in best/: its validation return and the iteration it was saved at
        "best_eval": None
        if best_step is None
        else {"eval_return": best_return, "iteration": best_step * config.iterations_per_call},
        "state": state,
    }


class TrainingDiverged(ValueError):
    """The losses, the temperature or the return became NaN or infinite. A ValueError
    (the CLI's one-line error): the usual cause is a setting, e.g. a learning rate."""


def first_divergence(rows: list[dict]) -> str | None:
    """'iteration I: NAME is VALUE' for the first non-finite metric in one call's rows
    (learner metrics count only where `updated`: before warm-up they are NaN by design),
    or None."""
    for row in rows:
        for name, value in row.items():
            learner = name not in ("return_mean", "replay_episodes", "call", "iteration")
            if learner and not row["updated"]:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                return f"iteration {row['iteration']}: {name} is {value}"
    return None


def _check_run_dir(run: RunDir, n_devices: int, *, resume: bool, overwrite: bool) -> None:
    """Check the run dir on every process; a refusal on any process is raised on all of
    them (none is left waiting at a collective). The run dir must be on a filesystem
    every process sees."""
    error: Exception | None = None
    try:
        run.check_resumable(n_devices) if resume else run.check_new(overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as failure:
        error = failure
    if not distributed.agree(error is None):
        raise error or FileExistsError(f"run directory {run.path}: refused on another process")


def _create_run_dir(
    run: RunDir, config: TrainConfig, n_devices: int, *, resume: bool, overwrite: bool
) -> None:
    """Create (or, with overwrite, replace) the checked run dir of a new run, on process
    0 only; every process waits until it is there."""
    if not resume and distributed.is_primary():
        run.prepare_new(config, overwrite, n_devices)
    distributed.barrier("caasl-run-dir-ready")


class _NullFile:
    """Stands in for a log file on processes that do not write logs."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _log_file(path: Path, primary: bool):
    """`path` opened for appending on process 0; a no-op file elsewhere."""
    import contextlib

    return path.open("a") if primary else contextlib.nullcontext(_NullFile())


def _save_args(tree):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(tree)


def _tensorboard(run: RunDir, purge_step: int | None = None):
    """Event writer for tb/ (None without tensorboardX). purge_step: the first iteration
    a resumed run redoes; TensorBoard drops the earlier run's points from there on, as
    the JSON-lines logs are trimmed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional
        return None
    return SummaryWriter(str(run.tensorboard), purge_step=purge_step)


def _log_scalars(writer, row: dict, step: int) -> None:
    if writer is None:
        return
    for name, value in row.items():
        if name not in ("call", "iteration") and isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(name, value, step)


CHECKPOINT_CHOICES = ("latest", "best")


def load_trained_policy(run_dir: str | Path, checkpoint: str = "latest"):
    """(agent, policy_params, config) of a run's latest checkpoint or of its best/
    (highest validation return), on one device."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; choose one of {CHECKPOINT_CHOICES}")
    run = RunDir(run_dir)
    config = run.load_config()
    folder = run.checkpoints if checkpoint == "latest" else run.best
    if not folder.exists():
        raise FileNotFoundError(f"{run.path} has no {folder.name}/ to load a policy from")
    manager = _checkpoint_manager(run, config) if checkpoint == "latest" else _best_manager(run)
    with manager:  # closed on the way out, also when a restore fails
        if checkpoint == "best":
            step = manager.best_step()
            if step is None:
                raise FileNotFoundError(
                    f"{run.best} holds no policy yet: the run stopped before its first evaluation"
                )
        trainer, _ = make_trainer(config, devices=jax.local_devices()[:1])
        template = trainer.init_state()
        if checkpoint == "latest":
            state, _ = restore_state(manager, trainer, template)
            return trainer.agent, state.agent.policy_params, config
        policy_template = template.agent.policy_params
        shardings = trainer.state_sharding(template).agent.policy_params
        return trainer.agent, _restore(manager, step, policy_template, shardings), config
