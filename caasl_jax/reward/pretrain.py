"""Pretraining the AVICI reward model on histories drawn from our environments.

    caasl pretrain-reward --env linear-d10 --out runs/reward-linear-d10 [options]

Each training step draws `batch` fresh systems from the environment prior inside the
compiled step and builds, per system, a history of the env's n0 observational rows
plus a random number 0..T of design rows from random designs, as a design policy
would produce them: with probability p_single one random target, with probability
p_multi a random subset of targets (each variable with a random rate in
[0.1, 0.5]), otherwise no target (an observational sample); values uniform in
[-1, 1] (the policy's action range). Rows beyond the drawn number are padding and
are masked.

Loss: binary cross-entropy over the off-diagonal entries, averaged over d(d-1) and
the batch (AVICI's loss). Optional acyclicity penalty (--acyclicity W): W times the
spectral radius of the edge-probability matrix estimated by power iteration
(NO-BEARS, Lee et al. 2019), with a fixed weight instead of AVICI's dual ascent.

Optimiser: AdamW with linear warm-up then cosine decay, global-norm clip 1.0.
Several steps run per host call inside `lax.scan`. With more than one local device
the step runs under `jax.shard_map` over a 1-D "data" mesh, each device drawing its
own share of the batch and the gradients averaged with `lax.pmean`.

Held-out evaluation every --eval-every steps on --eval-envs fixed systems (seeded by
--eval-seed): history = n0 observational rows + T single-target random
do-interventions; reports the mean expected correct entries (of d^2, diagonal
included), AUPRC, expected SHD, SHD, edge F1 and AUROC. The best parameters by
expected correct entries are written to <out>/best.msgpack (load with
`caasl_jax.reward.checkpoint.load_weights`), and copied to --export if given (at
each new best and when the command ends, in one rename; <out>/export.json records
that file and the contents written there, which the run may then replace when it
resumes; any other existing file needs --overwrite).

Orbax checkpoints every --ckpt-every steps under <out>/ckpt; rerunning the same
command resumes from the latest one (the config must match; see <out>/run.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from caasl_jax.checks import file_path_problem, folder_problem
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.digest import record_digest
from caasl_jax.files import write_atomically
from caasl_jax.jsonl import keep_rows_up_to, to_line
from caasl_jax.metrics import batch_metrics, expected_correct_entries
from caasl_jax.reward.checkpoint import save_weights
from caasl_jax.reward.model import AviciConfig, edge_logits, edge_probs, init_params, param_count
from caasl_jax.reward.standardize import standardization_for_env


# --------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class DesignMix:
    """Random design policy used to build training histories."""

    max_designs: int  # T: 0..T design rows per history
    p_single: float = 0.5
    p_multi: float = 0.4  # remaining probability: observational design rows


def _with_values(targets: jax.Array, key: jax.Array, action_dim: int) -> jax.Array:
    """Action f32[action_dim]: +-1 target flags, then uniform [-1, 1] values if any."""
    flags = jnp.where(targets, 1.0, -1.0)
    extra = action_dim - targets.shape[0]
    if extra == 0:  # e.g. SERGIO: the action is the knockout targets only
        return flags
    values = jax.random.uniform(key, (extra,), minval=-1.0, maxval=1.0)
    return jnp.concatenate([flags, values])


def random_action(key: jax.Array, d: int, mix: DesignMix, action_dim: int | None = None):
    """A random design action f32[action_dim] (default 2d): variable i is a target when
    a_i > 0; any further entries (the values a_{d+i}) uniform in [-1, 1]."""
    kind_key, single_key, rate_key, subset_key, value_key = jax.random.split(key, 5)
    kind = jax.random.uniform(kind_key)
    single = jax.nn.one_hot(jax.random.randint(single_key, (), 0, d), d) > 0
    rate = jax.random.uniform(rate_key, minval=0.1, maxval=0.5)
    subset = jax.random.bernoulli(subset_key, rate, (d,))
    targets = jnp.where(
        kind < mix.p_single, single, jnp.where(kind < mix.p_single + mix.p_multi, subset, False)
    )
    return _with_values(targets, value_key, action_dim or 2 * d)


def single_target_action(key: jax.Array, d: int, action_dim: int | None = None) -> jax.Array:
    """Random single-target design f32[action_dim] (the evaluation's random baseline)."""
    target_key, value_key = jax.random.split(key)
    target = jax.nn.one_hot(jax.random.randint(target_key, (), 0, d), d) > 0
    return _with_values(target, value_key, action_dim or 2 * d)


def rollout_history(env, key: jax.Array, env_params, action_fn, n_designs) -> tuple:
    """History of env.n0 observational rows plus `n_designs` (<= T) design rows.

    action_fn(key) -> f32[2d]. Returns (data f32[N, d, 2] with zero padding, mask bool[N]).
    """
    reset_key, loop_key = jax.random.split(key)
    history, state = env.reset(reset_key, env_params)

    def body(state, step_key):
        act_key, env_key = jax.random.split(step_key)
        _, state, _, _, _ = env.step(env_key, state, action_fn(act_key), env_params)
        return state, None

    if env.budget > 0:
        state, _ = jax.lax.scan(body, state, jax.random.split(loop_key, env.budget))
    n_rows = state.history.data.shape[0]
    mask = jnp.arange(n_rows) < env.n0 + n_designs * env.samples_per_step
    data = jnp.where(mask[:, None, None], state.history.data, 0.0)
    return data, mask


def sample_training_batch(env, key: jax.Array, batch: int, mix: DesignMix):
    """batch fresh (data f32[B, N, d, 2], mask bool[B, N], graph f32[B, d, d])."""

    def one(k):
        param_key, n_key, hist_key = jax.random.split(k, 3)
        env_params = env.sample_params(param_key)
        n_designs = jax.random.randint(n_key, (), 0, mix.max_designs + 1)
        data, mask = rollout_history(
            env,
            hist_key,
            env_params,
            lambda a: random_action(a, env.d, mix, env.action_dim),
            n_designs,
        )
        return data, mask, env_params.graph.astype(jnp.float32)

    return jax.vmap(one)(jax.random.split(key, batch))


def heldout_set(env, key: jax.Array, n_envs: int):
    """Fixed evaluation set: n0 obs + T single-target random do rows per system."""

    def one(k):
        param_key, hist_key = jax.random.split(k)
        env_params = env.sample_params(param_key)
        data, mask = rollout_history(
            env,
            hist_key,
            env_params,
            lambda a: single_target_action(a, env.d, env.action_dim),
            env.budget,
        )
        return data, mask, env_params.graph.astype(jnp.float32)

    return jax.jit(jax.vmap(one))(jax.random.split(key, n_envs))


# --------------------------------------------------------------------------- loss
def bce_offdiag(logits: jax.Array, graph: jax.Array) -> jax.Array:
    """Mean BCE over off-diagonal entries. logits, graph f32[B, d, d] -> scalar."""
    d = logits.shape[-1]
    per = -(graph * jax.nn.log_sigmoid(logits) + (1.0 - graph) * jax.nn.log_sigmoid(-logits))
    off = 1.0 - jnp.eye(d)
    return jnp.mean(jnp.sum(per * off, (-1, -2)) / (d * (d - 1)))


def spectral_radius(probs: jax.Array, iters: int = 10) -> jax.Array:
    """Power-iteration estimate of the spectral radius of nonnegative f32[..., d, d]."""
    u = jnp.ones(probs.shape[:-1], probs.dtype)
    v = jnp.ones(probs.shape[:-1], probs.dtype)
    for _ in range(iters):
        u = jnp.einsum("...i,...ij->...j", u, probs)
        v = jnp.einsum("...ij,...j->...i", probs, v)
        u = u / (jnp.linalg.norm(u, axis=-1, keepdims=True) + 1e-12)
        v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    num = jnp.einsum("...i,...ij,...j->...", u, probs, v)
    return num / (jnp.einsum("...i,...i->...", u, v) + 1e-12)


def loss_fn(params, config: AviciConfig, data, mask, graph, dropout_key, acyclicity: float):
    logits = edge_logits(params, data, mask, config, dropout_key=dropout_key)
    loss = bce_offdiag(logits, graph)
    aux = {"bce": loss}
    if acyclicity > 0:
        d = graph.shape[-1]
        probs = jax.nn.sigmoid(logits) * (1.0 - jnp.eye(d))
        penalty = jnp.mean(spectral_radius(probs))
        loss = loss + acyclicity * penalty
        aux["acyclicity"] = penalty
    return loss, aux


# --------------------------------------------------------------------------- train step
def make_optimizer(lr: float, warmup: int, total: int, weight_decay: float, clip: float = 1.0):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, warmup), max(total, warmup + 1), end_value=0.05 * lr
    )
    tx = optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay)
    )
    return tx, schedule


def replicated_sharding() -> NamedSharding:
    """The placement of the pretraining state: replicated over the trainer's 1-D "data"
    mesh of the local devices. The step is jitted with it, a fresh state is put there
    and a restored one comes back there, so every call (fresh, resumed, or fed the
    step's own outputs) finds the one compiled program; an uncommitted fresh state
    after committed outputs used to compile the step a second time."""
    from caasl_jax.train import make_mesh

    return NamedSharding(make_mesh(jax.local_devices()), PartitionSpec())


def make_train_chunk(env, config, tx, mix: DesignMix, batch: int, steps: int, acyclicity: float):
    """chunk(params, opt_state, key) -> (params, opt_state, metrics) running `steps` steps.

    With several local devices it runs under shard_map (batch split over devices,
    gradients pmean-ed); `batch` is the global batch size. Inputs and outputs are
    placed by `replicated_sharding()`.
    """
    replicated = replicated_sharding()
    n_dev = replicated.mesh.size
    if batch % n_dev:
        raise ValueError(f"batch {batch} must be divisible by the {n_dev} local devices")
    per_device = batch // n_dev

    def one_step(axis, carry, step_key):
        params, opt_state = carry
        if axis is not None:
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis))
        data_key, drop_key = jax.random.split(step_key)
        data, mask, graph = sample_training_batch(env, data_key, per_device, mix)
        drop = drop_key if config.dropout > 0 else None
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, config, data, mask, graph, drop, acyclicity
        )
        if axis is not None:
            grads = jax.lax.pmean(grads, axis)
            aux = jax.lax.pmean(aux, axis)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        aux = {**aux, "grad_norm": optax.global_norm(grads)}
        return (params, opt_state), aux

    def chunk(axis, params, opt_state, key):
        (params, opt_state), aux = jax.lax.scan(
            functools.partial(one_step, axis), (params, opt_state), jax.random.split(key, steps)
        )
        return params, opt_state, jax.tree.map(jnp.mean, aux)

    if n_dev == 1:
        body = functools.partial(chunk, None)
    else:
        rep = PartitionSpec()
        body = jax.shard_map(
            functools.partial(chunk, replicated.mesh.axis_names[0]),
            mesh=replicated.mesh,
            in_specs=(rep, rep, rep),
            out_specs=(rep, rep, rep),
            check_vma=False,
        )
    return jax.jit(body, donate_argnums=(0, 1), in_shardings=replicated, out_shardings=replicated)


def fresh_state(key: jax.Array, config: AviciConfig, d: int, tx) -> tuple:
    """(params, opt_state) of a new run, placed by `replicated_sharding()`."""
    params = init_params(key, config, d)
    return jax.device_put((params, tx.init(params)), replicated_sharding())


def restore_checkpoint(manager, step: int, params, opt_state) -> dict:
    """Checkpoint `step` of an orbax manager: {"params", "opt_state", "elapsed", "best"}.

    params and opt_state (a fresh state) give the structure and the placement, so the
    restored state feeds the same compiled programs as a fresh one. A damaged
    checkpoint raises ValueError ("... is unreadable").
    """
    from caasl_jax.train import restore_step

    target = {
        "params": params,
        "opt_state": opt_state,
        "elapsed": np.zeros(()),
        "best": np.zeros(()),
    }
    return restore_step(manager, step, target)


def make_heldout_probs(config: AviciConfig, data: jax.Array, mask: jax.Array, chunk: int = 50):
    """params -> edge probabilities f32[B, d, d] of held-out histories data f32[B, N, d, 2],
    mask bool[B, N], computed `chunk` histories at a time (one compilation)."""

    @jax.jit
    def probs_of(params, x, m):
        return edge_probs(params, x, m, config)

    def probs(params) -> jax.Array:
        return jnp.concatenate(
            [
                probs_of(params, data[i : i + chunk], mask[i : i + chunk])
                for i in range(0, data.shape[0], chunk)
            ]
        )

    return probs


def mean_metrics(probs: jax.Array, graph: jax.Array) -> dict[str, float]:
    """Every project metric averaged over systems (probs, graph f32[B, d, d])."""
    return {k: float(jnp.mean(v)) for k, v in jax.jit(batch_metrics)(probs, graph).items()}


def make_evaluator(config: AviciConfig, heldout, n0: int, chunk: int = 50):
    """params -> mean held-out metrics of heldout = (data, mask, graph), plus
    `intervention_gain`: the expected correct entries the design rows add to the first
    n0 (observational) rows, i.e. the return random designs earn under this model (a
    model that ignores interventional rows gives a design policy nothing to learn)."""
    data, mask, graph = heldout
    probs = make_heldout_probs(config, data, mask, chunk)
    observational = mask & (jnp.arange(mask.shape[-1]) < n0)
    observational_probs = make_heldout_probs(config, data, observational, chunk)

    def evaluate(params) -> dict[str, float]:
        metrics = mean_metrics(probs(params), graph)
        before = jnp.mean(jax.vmap(expected_correct_entries)(observational_probs(params), graph))
        return {**metrics, "intervention_gain": metrics["expected_correct"] - float(before)}

    return evaluate


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="caasl pretrain-reward",
        description="Pretrain the AVICI reward model on histories from a caasl-jax environment.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--env", default="linear-d10", help="environment name (registry)")
    p.add_argument(
        "--env-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment setting override, e.g. --env-set n0=20 (repeatable)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder: new (or empty), or a pretraining run to resume (default "
        "runs/reward-<env>)",
    )
    p.add_argument("--steps", type=positive_int, default=20000, help="total optimisation steps")
    p.add_argument("--batch", type=positive_int, default=64, help="global histories per step")
    p.add_argument(
        "--steps-per-call", type=positive_int, default=10, help="steps per compiled call"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--warmup", type=int, default=500, help="linear warm-up steps, then cosine decay"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--dim", type=positive_int, default=64, help="token width")
    p.add_argument("--layers", type=positive_int, default=2, help="L (the network has 2L blocks)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--key-size", type=positive_int, default=16, help="width per head")
    p.add_argument("--widening", type=positive_int, default=4, help="feed-forward width / dim")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout rate while training")
    p.add_argument(
        "--standardization",
        default="auto",
        choices=["auto", "zscore", "log2_cpm", "none"],
        help="auto: log2_cpm for sergio envs, zscore otherwise",
    )
    p.add_argument(
        "--p-single", type=float, default=0.5, help="share of single-target random designs"
    )
    p.add_argument(
        "--p-multi",
        type=float,
        default=0.4,
        help="share of multi-target random designs (the rest observational)",
    )
    p.add_argument("--acyclicity", type=float, default=0.0, help="acyclicity penalty weight")
    p.add_argument(
        "--eval-every", type=positive_int, default=500, help="steps between held-out evaluations"
    )
    p.add_argument("--eval-envs", type=positive_int, default=100, help="held-out systems")
    p.add_argument("--eval-seed", type=int, default=12345, help="seed of the held-out systems")
    p.add_argument("--ckpt-every", type=positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and training data")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    p.add_argument(
        "--export",
        default=None,
        help="also copy the best weights to this path (a resumed run keeps updating the "
        "file it exported to)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="let --export / --export-latest replace a file that exists before the run",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--export-latest",
        default=None,
        metavar="PATH",
        help="with the run's own options: write the latest checkpoint's weights (with its "
        "held-out metrics) to PATH and exit, without training",
    )
    p.add_argument(
        "--evaluate-only",
        default=None,
        metavar="WEIGHTS",
        help="only evaluate a weights file (msgpack, or a shipped name such as "
        "linear-d10) on the held-out set of --env and print JSON",
    )
    return p


def parse_env_overrides(items: list[str]) -> dict:
    """`--env-set key=value` strings -> {key: value}, values parsed as YAML."""
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--env-set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


def plan_for_budget(log_rows: list[dict], calls_between: int, steps_per_call: int, budget_s: float):
    """Steps of a run that fit `budget_s` seconds, from a calibration run's log.

    log_rows: the calibration's log.jsonl rows, evaluated after `calls_between` and
    2 * `calls_between` compiled calls (their time_s counts from the start, so the first
    holds the compilation). Of the budget left after compiling, 10% is kept for the
    run's evaluations.
    Returns {"call_s", "compile_s", "steps", "warmup" (10%), "eval_every" (a tenth of
    the run, a multiple of steps_per_call)} plus the inputs.
    """
    if len(log_rows) < 2:
        raise ValueError(f"the calibration run logged {len(log_rows)} evaluations, needs 2")
    first, second = log_rows[0]["time_s"], log_rows[1]["time_s"]
    call_s = max(second - first, 1e-6) / calls_between
    compile_s = max(first - calls_between * call_s, 0.0)
    calls = max(int(0.9 * (budget_s - compile_s) / call_s), 2)
    return {
        "call_s": call_s,
        "compile_s": compile_s,
        "steps_per_call": steps_per_call,
        "steps_per_s": steps_per_call / call_s,
        "budget_s": budget_s,
        "steps": calls * steps_per_call,
        "warmup": max(calls * steps_per_call // 10, 1),
        "eval_every": max(calls // 10, 1) * steps_per_call,
    }


def evaluate_weights(
    weights: str, env_name: str, n_envs: int, seed: int, env_overrides: dict | None = None
) -> dict:
    """Held-out metrics (means over n_envs systems) of a weights file or shipped name."""
    from caasl_jax.envs.registry import make_env
    from caasl_jax.reward.checkpoint import load_reward_model

    params, config = load_reward_model(weights)
    env = make_env(env_name, **(env_overrides or {}))
    heldout = heldout_set(env, jax.random.key(seed), n_envs)
    metrics = make_evaluator(config, heldout, env.n0)(params)
    return {"weights": weights, "env": env_name, "eval_envs": n_envs, "eval_seed": seed, **metrics}


def _config_from_args(args, env_name: str) -> AviciConfig:
    std = args.standardization
    if std == "auto":
        std = standardization_for_env(env_name)
    return AviciConfig(
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        key_size=args.key_size,
        widening=args.widening,
        dropout=args.dropout,
        standardization=std,
    )


#: under --out: the file this run's --export updates and the contents it wrote there
EXPORT_RECORD = "export.json"
#: the run's own files under --out, never an --export / --export-latest target
RUN_FILES = ("best.msgpack", "run.json", "log.jsonl", EXPORT_RECORD)
#: keys every pretraining run.json has held; a `caasl train` run's holds {"devices": N}
RUN_FILE_KEYS = ("env", "config", "argv")


def _export_target_problem(
    target: str | None, overwrite: bool, out: Path, keeps_own_export: bool = False
) -> str | None:
    """Why weights cannot be written to `target` (None if they can): never over the
    run's own files in `out`; an existing file needs overwrite, unless keeps_own_export
    (--export) and it is the run's earlier --export, which a resumed run keeps updating
    (`_is_own_export`)."""
    if target is None:
        return None
    path = Path(target)
    problem = file_path_problem(path) or _own_file_problem(path, out)
    if problem:
        return problem
    ours = keeps_own_export and _is_own_export(path, out)
    if path.exists() and not (overwrite or ours):
        return "exists; pass --overwrite to replace it"
    return None


def _own_file_problem(path: Path, out: Path) -> str | None:
    """Why `path` is one of the run's own files in `out` (RUN_FILES or under ckpt/), or None."""
    path = path.resolve()
    for name in RUN_FILES:
        if path == (out / name).resolve():
            return f"is the run's own {name}; give another path"
    if (out / "ckpt").resolve() in path.parents:
        return "lies in the run's own ckpt folder; give another path"
    return None


def _is_own_export(path: Path, out: Path) -> bool:
    """Whether the file at `path` is this run's --export: a copy of its best.msgpack, or
    the contents the run last wrote at that path, or those it wrote before (a run killed
    between writing best.msgpack and replacing its export leaves the previous ones)."""
    if not path.is_file():
        return False
    best = out / "best.msgpack"
    if best.is_file() and filecmp.cmp(path, best, False):
        return True
    record = _read_export_record(out)
    return record.get("path") == str(path.resolve()) and _sha256(path) in record["sha256"]


def _read_export_record(out: Path) -> dict:
    """{"path": the export file, "sha256": [digests of contents written there]} or {}."""
    try:
        record = json.loads((out / EXPORT_RECORD).read_text())
    except (OSError, ValueError):  # none yet, or damaged: then only best.msgpack counts
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), list) else {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export_copy(best: Path, target: str, out: Path) -> None:
    """Copy best.msgpack to the --export path in one rename, recording first (also in
    one rename) the path and the digests of what was there and what comes: a run killed
    at any point leaves old or new weights there, and its resume knows either as its own."""
    target = Path(target).resolve()
    weights = best.read_bytes()
    digests = [hashlib.sha256(weights).hexdigest()]
    if target.is_file():
        digests.insert(0, _sha256(target))
    record = json.dumps({"path": str(target), "sha256": digests})
    write_atomically(out / EXPORT_RECORD, record.encode())
    write_atomically(target, weights)


def _existing_run(out: Path) -> dict | None:
    """The run.json of the pretraining run in folder `out`, or None when `out` is new
    (absent or empty). FileExistsError if `out` is a file or holds something else;
    ValueError if its run.json is damaged or not a pretraining run's."""
    problem = folder_problem(out)
    if problem is not None:
        raise FileExistsError(f"--out {out} {problem}; give a folder")
    path = out / "run.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"--out {out} is not empty and holds no pretraining run (no run.json); "
                "use another --out"
            )
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable, or not JSON
        run = None
    if not isinstance(run, dict):
        raise ValueError(f"{path} is damaged (not a pretraining run file); use another --out")
    missing = [key for key in RUN_FILE_KEYS if key not in run]
    if missing:
        kind = " (a `caasl train` run)" if (out / "config.yaml").is_file() else ""
        raise ValueError(
            f"--out {out} is not a reward-pretraining run{kind}: its run.json has no "
            f"{', '.join(missing)}; use another --out"
        )
    return run


def _check_same_settings(out: Path, old: dict, run: dict) -> None:
    """ValueError naming the settings of `run` that differ from those of the run in
    `out` (its run.json `old`): a run resumes only with its own."""
    keys = (
        "env",
        "env_overrides",
        "config",
        "batch",
        "lr",
        "warmup",
        "steps",
        "weight_decay",
        "seed",
        "p_single",
        "p_multi",
        "acyclicity",
        "eval_envs",
        "eval_seed",
    )
    # runs started before these were recorded: --env-set, the held-out set's options
    defaults = {"env_overrides": {}, **{k: run[k] for k in ("eval_envs", "eval_seed")}}
    diff = [k for k in keys if old.get(k, defaults.get(k)) != run.get(k)]
    if diff:
        raise ValueError(
            f"{out} holds a run with different settings ({', '.join(diff)}); "
            "use another --out or the same options to resume"
        )


def args_error(args: argparse.Namespace) -> str | None:
    """The first option value that cannot work, as a message; None when all can
    (counts are checked by their argparse type)."""
    for name, value in vars(args).items():  # lr, weight decay, dropout, p-single, ...
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name.replace('_', '-')} must be a finite number, got {value}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if not args.lr > 0:
        return f"--lr must be > 0, got {args.lr}"
    for name in ("weight_decay", "acyclicity"):
        if not getattr(args, name) >= 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    if not (args.p_single >= 0 and args.p_multi >= 0 and args.p_single + args.p_multi <= 1):
        return (
            "--p-single and --p-multi must be >= 0 with a sum <= 1 (the rest of the designs "
            f"are observational), got {args.p_single} and {args.p_multi}"
        )
    if args.time_limit is not None and not args.time_limit > 0:
        return f"--time-limit must be > 0 seconds, got {args.time_limit}"
    if args.steps % args.steps_per_call:
        return "--steps must be a multiple of --steps-per-call"
    if args.eval_every % args.steps_per_call or args.ckpt_every % args.steps_per_call:
        return "--eval-every and --ckpt-every must be multiples of --steps-per-call"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `caasl pretrain-reward`. Returns a process exit status; bad input
    raises ValueError / FileNotFoundError naming it (the command prints one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    error = args_error(args)
    if error:
        parser.error(error)
    if args.evaluate_only:
        result = evaluate_weights(
            args.evaluate_only,
            args.env,
            args.eval_envs,
            args.eval_seed,
            parse_env_overrides(args.env_set),
        )
        print(json.dumps(result, indent=2))
        return 0
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from caasl_jax.envs.registry import make_env

    env_overrides = parse_env_overrides(args.env_set)
    env = make_env(args.env, **env_overrides)
    config = _config_from_args(args, args.env)
    out = Path(args.out or f"runs/reward-{args.env}").resolve()
    old_run = _existing_run(out)
    for option, target in (("--export", args.export), ("--export-latest", args.export_latest)):
        keeps = option == "--export"
        problem = _export_target_problem(target, args.overwrite, out, keeps_own_export=keeps)
        if problem:
            raise ValueError(f"{option} {target}: {problem}")
    if args.export_latest and old_run is None:  # before anything is written under out
        raise FileNotFoundError(f"--export-latest: {out} holds no pretraining run")
    run = {
        "env": args.env,
        "env_overrides": env_overrides,
        "config": config.to_dict(),
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "steps": args.steps,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "p_single": args.p_single,
        "p_multi": args.p_multi,
        "acyclicity": args.acyclicity,
        "eval_envs": args.eval_envs,
        "eval_seed": args.eval_seed,
        "devices": jax.local_device_count(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if old_run is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True))
    else:
        _check_same_settings(out, old_run, run)
    manager = ocp.CheckpointManager(
        out / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    latest = manager.latest_step()
    if args.export_latest and latest is None:  # before compiling anything
        raise FileNotFoundError(f"--export-latest: no checkpoint under {out / 'ckpt'}")

    mix = DesignMix(max_designs=env.budget, p_single=args.p_single, p_multi=args.p_multi)
    tx, schedule = make_optimizer(args.lr, args.warmup, args.steps, args.weight_decay)
    key = jax.random.key(args.seed)
    init_key, train_key = jax.random.split(key)
    params, opt_state = fresh_state(init_key, config, env.d, tx)
    chunk = make_train_chunk(env, config, tx, mix, args.batch, args.steps_per_call, args.acyclicity)
    heldout = heldout_set(env, jax.random.key(args.eval_seed), args.eval_envs)
    evaluate = make_evaluator(config, heldout, env.n0)

    log_path, best_path = out / "log.jsonl", out / "best.msgpack"
    best, step, elapsed = -np.inf, 0, 0.0
    if latest is not None:
        restored = restore_checkpoint(manager, latest, params, opt_state)
        params, opt_state = restored["params"], restored["opt_state"]
        elapsed, best = float(restored["elapsed"]), float(restored["best"])
        step = int(latest)
        print(f"resumed from {out / 'ckpt'} at step {step} (best {best:.2f})", flush=True)
    if not args.export_latest:  # rows logged after the checkpoint (or with none) are redone
        keep_rows_up_to(log_path, "step", step)
    print(f"reward model: {param_count(params):,} parameters, config {config}", flush=True)
    if args.export_latest:
        metrics = evaluate(params)
        meta = {
            "env": args.env,
            "env_overrides": env_overrides,
            "step": step,
            "train_time_s": round(elapsed, 1),
            "heldout": metrics,
            "eval_envs": args.eval_envs,
            "eval_seed": args.eval_seed,
            "argv": old_run["argv"],
            "exported": "latest checkpoint",
        }
        save_weights(args.export_latest, params, config, meta)
        print(json.dumps({"exported": str(args.export_latest), **meta}, indent=2))
        return 0

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True)
    t_start = time.time() - elapsed

    def save_checkpoint():  # of the loop's current step, params, opt_state and best
        state = {
            "params": params,
            "opt_state": opt_state,
            "elapsed": np.asarray(time.time() - t_start),
            "best": np.asarray(best),
        }
        record_digest(manager, step, state)  # restore_step checks it (caasl_jax.digest)
        manager.save(step, args=ocp.args.StandardSave(state))

    start_of_run = time.time()
    while step < args.steps:
        if args.time_limit is not None and time.time() - start_of_run > args.time_limit:
            break
        params, opt_state, aux = chunk(params, opt_state, jax.random.fold_in(train_key, step))
        step += args.steps_per_call
        bar.update(args.steps_per_call)
        bar.set_postfix(loss=f"{float(aux['bce']):.4f}", best=f"{best:.2f}")
        record = None
        if step % args.eval_every == 0 or step >= args.steps:
            metrics = evaluate(params)
            record = {
                "step": step,
                "time_s": round(time.time() - t_start, 1),
                "lr": float(schedule(step)),
                **{k: float(v) for k, v in aux.items()},
                **{f"eval_{k}": v for k, v in metrics.items()},
            }
            if metrics["expected_correct"] > best:
                best = metrics["expected_correct"]
                meta = {
                    "env": args.env,
                    "step": step,
                    "train_time_s": record["time_s"],
                    "heldout": metrics,
                    "eval_envs": args.eval_envs,
                    "eval_seed": args.eval_seed,
                    "argv": run["argv"],
                }
                save_weights(best_path, params, config, meta)
                if args.export:
                    _export_copy(best_path, args.export, out)
            record["best_expected_correct"] = best
            with open(log_path, "a") as f:
                f.write(to_line(record))
            bar.write(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
                )
            )
        if step % args.ckpt_every == 0 or step >= args.steps:
            save_checkpoint()
    if manager.latest_step() != step:  # stopped by --time-limit between checkpoints
        save_checkpoint()
    if args.export and best_path.is_file():  # also when this call found no new best
        _export_copy(best_path, args.export, out)
    manager.wait_until_finished()
    bar.close()
    return 0


if __name__ == "__main__":
    from caasl_jax.cli import console_main

    console_main(["pretrain-reward", *sys.argv[1:]])
