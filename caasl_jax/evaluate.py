"""Rollouts of design policies and baselines over batches of environments.

A *design policy* here is any `policy(key, history) -> action f32[action_dim]`; the
trained CAASL policy and the baselines share this interface. Evaluation compiles one
rollout per (environment, agent architecture) in which the policy is a branch index
(`lax.switch`), so every baseline and every policy checkpoint of one architecture
reuse the same executable:

    rollout = design_rollout(env, agent)                       # compiled once
    histories = rollout(branch_index("random"), (), params, key)

`evaluate_suite` runs policies and baselines on named environments and suites
(`linear-ood`, `sergio-ood`, `linear-dims`, ...) and is what `caasl evaluate` and the
scripts in experiments/ call.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from caasl_jax.checks import check_positive_int, file_path_problem, folder_problem
from caasl_jax.envs.core import Environment, History

Policy = Callable[[jax.Array, History], jax.Array]
POLICY_MODES = ("stochastic", "deterministic")
POLICY_FORMAT = "caasl-jax-policy-v1"


def agent_policy(agent, policy_params, mode: str = "stochastic") -> Policy:
    """The CAASL policy of a REDQ agent as a design policy: sampled actions ("stochastic";
    dropout off unless the policy config sets act_with_dropout, as in the TD targets) or
    the mean action ("deterministic", dropout off)."""
    if mode not in POLICY_MODES:
        raise ValueError(f"unknown policy mode {mode!r}; choose one of {POLICY_MODES}")
    if mode == "stochastic":
        act = agent.acting_fn()
        return lambda key, history: act(policy_params, key, history.data, history.mask)[0]
    from caasl_jax.agents.networks import mode_action
    from caasl_jax.microbatch import vmap_in_chunks

    act = vmap_in_chunks(
        lambda params, data, mask: mode_action(agent.policy, params, data, mask),
        agent.config.microbatch,
    )
    return lambda key, history: act(policy_params, history.data, history.mask)


def random_policy(env: Environment) -> Policy:
    """Random designs: each variable is a target w.p. 1/2, values uniform in range."""
    return lambda key, history: jax.random.uniform(key, (env.action_dim,), minval=-1.0, maxval=1.0)


def random_single_target_policy(env: Environment) -> Policy:
    """One uniformly chosen target per step, with a uniform value."""

    def policy(key, history):
        target_key, value_key = jax.random.split(key)
        target = jax.random.randint(target_key, (), 0, env.d)
        targets = jnp.where(jnp.arange(env.d) == target, 1.0, -1.0)
        values = jax.random.uniform(value_key, (env.action_dim - env.d,), minval=-1.0, maxval=1.0)
        return jnp.concatenate([targets, values])

    return policy


def observational_policy(env: Environment) -> Policy:
    """No intervention at any step (every a_i <= 0)."""
    return lambda key, history: -jnp.ones((env.action_dim,), jnp.float32)


BASELINES: dict[str, Callable[[Environment], Policy]] = {
    "random": random_policy,
    "random-single": random_single_target_policy,
    "observational": observational_policy,
}


def rollout_episodes(env: Environment, policy: Policy, env_params: Any, key: jax.Array):
    """Roll out one episode per hidden-parameter set (leading axis [B] of env_params).

    Returns (final histories [B], actions f32[B, T, A], rewards f32[B, T]).
    """
    batch = jax.tree.leaves(env_params)[0].shape[0]
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k, p: env.rollout(k, p, policy))(keys, env_params)


def rollout_rewards(env: Environment, policy: Policy, env_params: Any, key: jax.Array):
    """Per-step rewards f32[B, T] of `policy` on the environments `env_params`."""
    return rollout_episodes(env, policy, env_params, key)[2]


#: disjoint held-out environment sets: "test" for `caasl evaluate` and experiments/,
#: "validation" for the trainer's periodic evaluation (and its best checkpoint), so
#: that choosing a checkpoint never looks at the environments it is reported on
HELDOUT_SPLITS = {"test": 0x5EED, "validation": 0x7A1D}


def heldout_params(env: Environment, n_envs: int, seed: int, split: str = "test") -> Any:
    """Fixed held-out hidden parameters (leading axis [n_envs]) of one split."""
    if split not in HELDOUT_SPLITS:
        raise ValueError(f"unknown held-out split {split!r}; choose one of {list(HELDOUT_SPLITS)}")
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), HELDOUT_SPLITS[split]), n_envs)
    return jax.vmap(env.sample_params)(keys)


# ----------------------------------------------------------------------------------
# one compiled rollout for every baseline and policy of an architecture
# ----------------------------------------------------------------------------------

#: branch order of `design_rollout`; the CAASL branches exist only with an agent
DESIGN_BRANCHES = (*BASELINES, "caasl-stochastic", "caasl-deterministic")


def branch_index(name: str, mode: str = "stochastic") -> jnp.ndarray:
    """The `design_rollout` branch of a baseline name, or of "caasl" in a policy mode."""
    label = f"caasl-{mode}" if name == "caasl" else name
    if label not in DESIGN_BRANCHES:
        raise ValueError(f"unknown design policy {name!r}; known: caasl, {', '.join(BASELINES)}")
    return jnp.asarray(DESIGN_BRANCHES.index(label), jnp.int32)


def switched_policy(env: Environment, agent, branch, policy_params) -> Policy:
    """The design policy selected by the traced int `branch` (see DESIGN_BRANCHES).

    Without an agent only the baseline branches exist, and a (traced, so unchecked)
    CAASL branch index would run the last baseline: `evaluate_design` refuses that case
    before tracing; direct callers must do the same.
    """
    branches = [make(env) for make in BASELINES.values()]
    if agent is not None:
        branches += [agent_policy(agent, policy_params, mode) for mode in POLICY_MODES]

    def policy(key, history):
        # clamp: without an agent the CAASL branches do not exist
        return jax.lax.switch(jnp.minimum(branch, len(branches) - 1), branches, key, history)

    return policy


@functools.lru_cache(maxsize=64)
def design_rollout(env: Environment, agent=None):
    """Jitted (branch i32[], policy_params, env_params [B], key) -> final histories [B].

    Cached per (env, agent architecture): baselines and checkpoints share one executable.
    Without an agent pass `()` as policy_params and only baseline branches exist.
    """

    def rollout(branch, policy_params, env_params, key):
        policy = switched_policy(env, agent, branch, policy_params)
        return rollout_episodes(env, policy, env_params, key)[0]

    return jax.jit(rollout)


# ----------------------------------------------------------------------------------
# step-wise evaluation: the posterior after every acquisition
# ----------------------------------------------------------------------------------


def stepwise_metrics(env: Environment, histories: History, graphs, reward_params, reward_config):
    """Metrics of the reward model's posterior after 0..T design steps (reward_config:
    an AviciConfig, or an ExactPrior for the exact posterior).

    histories: final histories [B]; graphs f32[B, d, d]. The posterior after step t
    reads the first n0 + t·k rows (the rest masked). Returns {metric: f32[B, T + 1]}.
    """
    from caasl_jax.metrics import all_metrics
    from caasl_jax.microbatch import map_examples
    from caasl_jax.reward.exact import ExactPrior
    from caasl_jax.reward.reward import posterior_edge_probs

    lengths = env.n0 + jnp.arange(env.budget + 1) * env.samples_per_step
    rows = jnp.arange(env.n_rows)

    def one(history, graph):
        def at(length):
            probs = posterior_edge_probs(reward_params, history.data, rows < length, reward_config)
            return all_metrics(probs, graph)

        return jax.vmap(at)(lengths)

    # exact posteriors take ~0.2 GB per d = 14 history: one env at a time
    microbatch = 1 if isinstance(reward_config, ExactPrior) else 0
    return map_examples(lambda hg: one(*hg), (histories, graphs), microbatch)


def summarize_stepwise(metrics: dict) -> dict[str, dict[str, list[float]]]:
    """{metric: f32[B, T+1]} -> {metric: {"mean": [...], "stderr": [...]}} per step.

    Adds "return": expected correct entries minus its value before any design.
    """
    metrics = dict(metrics)
    metrics["return"] = metrics["expected_correct"] - metrics["expected_correct"][:, :1]
    out = {}
    for name, values in metrics.items():
        values = jnp.asarray(values, jnp.float32)
        n = values.shape[0]
        stderr = values.std(0, ddof=1) / jnp.sqrt(n) if n > 1 else jnp.zeros(values.shape[1])
        out[name] = {
            "mean": [float(v) for v in values.mean(0)],
            "stderr": [float(v) for v in stderr],
        }
    return out


@functools.lru_cache(maxsize=32)
def _stepwise_jit(env: Environment, reward_config):
    """One compiled step-wise scorer per (env, reward model config), shared by all policies."""
    return jax.jit(lambda h, g, rp: stepwise_metrics(env, h, g, rp, reward_config))


def rollout_key(seed: int) -> jax.Array:
    """The rollout randomness of an evaluation: a function of the seed only."""
    return jax.random.fold_in(jax.random.key(seed), 11)


def score_histories(env: Environment, histories: History, params, reward_params, reward_config):
    """Step-wise summary ({metric: {"mean", "stderr"}}) of final histories [B]."""
    metrics = _stepwise_jit(env, reward_config)(histories, params.graph, reward_params)
    return summarize_stepwise(jax.device_get(metrics))


def evaluate_policy(
    env: Environment, policy: Policy, reward_params, reward_config, n_envs: int, seed: int
) -> dict:
    """Roll an arbitrary `policy` out on n_envs held-out environments and score every step.

    The environments and the rollout randomness depend only on (env, n_envs, seed), so
    every policy and baseline is judged on the same systems. (Baselines and trained
    policies go through `evaluate_design`, which reuses one compiled rollout.)
    """
    params = heldout_params(env, n_envs, seed)
    rollout = jax.jit(lambda params, key: rollout_episodes(env, policy, params, key)[0])
    histories = rollout(params, rollout_key(seed))
    return score_histories(env, histories, params, reward_params, reward_config)


def evaluate_design(
    env: Environment,
    name: str,
    reward_params,
    reward_config,
    n_envs: int,
    seed: int,
    agent=None,
    policy_params=(),
    mode: str = "stochastic",
) -> dict:
    """Step-wise summary of a baseline (by name) or of "caasl" (agent + params).

    All names share one compiled rollout per (env, agent); see `design_rollout`.
    """
    if name == "caasl" and agent is None:
        raise ValueError("evaluating 'caasl' needs the agent and its policy parameters")
    params = heldout_params(env, n_envs, seed)
    branch = branch_index(name, mode)
    histories = design_rollout(env, agent)(branch, policy_params, params, rollout_key(seed))
    return score_histories(env, histories, params, reward_params, reward_config)


# ----------------------------------------------------------------------------------
# named suites (paper appendix C) and trained policies on disk
# ----------------------------------------------------------------------------------

#: the OOD suites of appendix C, by variant, in the paper's panel order
ENV_SETS: dict[str, tuple[str, ...]] = {
    "linear-ood": (
        "linear-ood-graph",
        "linear-ood-mech",
        "linear-ood-noise",
        "linear-ood-hetero",
        "linear-ood-shift",
    ),
    "sergio-ood": (
        "sergio-ood-graph",
        "sergio-ood-dropseq",
        "sergio-ood-knockdown",
        "sergio-ood-noisy",
    ),
}
#: the dimensionality sweep of figures 5, 7 and 8
DIMENSION_SWEEP = (10, 12, 15, 20)

_SET_NAME = re.compile(r"^(?P<set>[a-z]+-ood)(?:-d(?P<d>\d+))?$")
_DIMS_NAME = re.compile(r"^(?P<family>[a-z]+)-dims(?::(?P<dims>\d+(?:,\d+)*))?$")


def expand_env_names(names: Sequence[str]) -> list[str]:
    """Environment names with suites expanded, duplicates dropped, order kept.

    `linear-ood` (d = 10) or `linear-ood-d15`: the appendix-C OOD set at that d;
    `linear-dims` (d = 10, 12, 15, 20) or `linear-dims:10,30,50`: the dimensionality
    sweep; anything else is an environment name (checked by `make_env`).
    """
    expanded = []
    for name in names:
        if match := _SET_NAME.match(name):
            if match["set"] not in ENV_SETS:
                raise ValueError(f"unknown environment set {name!r}; known: {', '.join(ENV_SETS)}")
            d = int(match["d"] or 10)
            expanded += [f"{variant}-d{d}" for variant in ENV_SETS[match["set"]]]
        elif match := _DIMS_NAME.match(name):
            dims = [int(x) for x in match["dims"].split(",")] if match["dims"] else DIMENSION_SWEEP
            expanded += [f"{match['family']}-d{d}" for d in dims]
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def _policy_template(agent, env: Environment):
    """Shapes of the policy parameters of `agent` (no FLOPs spent)."""

    def init(key):
        obs, _ = env.reset(key, env.sample_params(key))
        return agent.policy.init(key, obs.data, obs.mask)

    return jax.eval_shape(init, jax.random.key(0))


def export_policy(run_dir: str | Path, path: str | Path, overwrite: bool = False) -> Path:
    """Write a run's latest policy (config + policy parameters only) to one msgpack file;
    `run_dir` may also be a run's best/ folder (its best-validated policy).

    The file is what `load_policy` reads and what `caasl evaluate --policy FILE` takes;
    critics, optimiser state and replay stay in the run directory.
    """
    import numpy as np

    from caasl_jax.config import to_dict
    from caasl_jax.reward.checkpoint import write_tagged_msgpack
    from caasl_jax.train import load_trained_policy

    path = Path(path)
    problem = file_path_problem(path, create_folders=True)
    if problem is not None:
        raise ValueError(f"{path} {problem}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    _, policy_params, config = load_trained_policy(*_run_checkpoint(Path(run_dir)))
    tree = {
        "format": POLICY_FORMAT,
        "config": json.dumps(to_dict(config), sort_keys=True),
        "params": jax.tree.map(np.asarray, jax.device_get(policy_params)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tagged_msgpack(path, tree)


def _read_policy_file_config(path: Path):
    """(stored tree, config) of a file written by `export_policy`."""
    from caasl_jax.config import TrainConfig, from_dict
    from caasl_jax.reward.checkpoint import read_tagged_msgpack

    tree = read_tagged_msgpack(path, POLICY_FORMAT, "policy")
    return tree, from_dict(TrainConfig, json.loads(tree["config"]), f"{path} config")


def _read_policy_file(path: Path):
    """(agent, policy_params, config) from a file written by `export_policy`."""
    from caasl_jax.envs.registry import make_env
    from caasl_jax.train import build_agent

    tree, config = _read_policy_file_config(path)
    env = make_env(config.env, **config.env_overrides)
    agent = build_agent(config, env)
    template = _policy_template(agent, env)
    params = tree["params"]
    expected = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), template)
    found = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    if jax.tree.structure(expected) != jax.tree.structure(found) or expected != found:
        raise ValueError(f"{path}: policy parameters do not match the policy its config describes")
    return agent, params, config


POLICIES_DIR = Path(__file__).parent / "policies"


def available_policies() -> list[str]:
    """Names of the trained policies shipped in caasl_jax/policies/."""
    return sorted(p.stem for p in POLICIES_DIR.glob("*.msgpack"))


def is_policy_spec(spec: str | Path) -> bool:
    """True for a run directory, a run's best/ (even if missing: `load_policy` then
    says why), a policy file or a shipped policy name."""
    path = Path(spec)
    return path.exists() or _run_checkpoint(path)[1] == "best" or str(spec) in available_policies()


def _run_checkpoint(path: Path) -> tuple[Path, str]:
    """(run directory, "latest" | "best") for a run directory or a run's best/ folder."""
    from caasl_jax.train import RunDir

    if path.name == "best" and RunDir(path.parent).config.is_file():
        return path.parent, "best"
    return path, "latest"


def _policy_source(spec: str | Path) -> tuple[Path, str]:
    """(path, "latest" | "best" | "file") of a policy spec: a run directory, a run's
    best/, a policy file or a shipped policy's file; ValueError for anything else."""
    path = Path(spec)
    if path.is_dir() or _run_checkpoint(path)[1] == "best":
        return _run_checkpoint(path)
    if path.is_file():
        return path, "file"
    if str(spec) in available_policies():
        return POLICIES_DIR / f"{spec}.msgpack", "file"
    raise ValueError(
        f"{spec}: neither a run directory, a policy file nor a shipped policy "
        f"({', '.join(available_policies()) or 'none shipped'})"
    )


def load_policy(spec: str | Path):
    """(agent, policy_params, config) of a run directory's latest checkpoint, of a run's
    best/ folder (its policy with the highest validation return), of a policy file
    written by `export_policy`, or of a shipped policy by name (e.g. "linear-d10")."""
    path, kind = _policy_source(spec)
    if kind == "file":
        return _read_policy_file(path)
    from caasl_jax.train import load_trained_policy

    return load_trained_policy(path, kind)


def policy_config(spec: str | Path):
    """The TrainConfig of a policy spec (as `load_policy` takes), read without loading
    its parameters (fast: for checks before the load)."""
    path, kind = _policy_source(spec)
    if kind == "file":
        return _read_policy_file_config(path)[1]
    from caasl_jax.train import RunDir

    return RunDir(path).load_config()


# ----------------------------------------------------------------------------------
# suites of environments x designs, as `caasl evaluate` and experiments/ run them
# ----------------------------------------------------------------------------------


def likelihood_baselines() -> dict[str, Callable]:
    """DiffCBED / SS Finite (caasl_jax.baselines) when that module is available."""
    try:
        from caasl_jax.baselines import LIKELIHOOD_BASELINES
    except ImportError:
        return {}
    return dict(LIKELIHOOD_BASELINES)


def not_applicable(envs: dict[str, Environment], slow_designs) -> list[tuple[str, str, str]]:
    """(env, design, reason) for likelihood baselines on envs without a usable likelihood.

    As in the paper, DiffCBED and SS Finite are left out there (SERGIO,
    heteroskedastic noise) instead of failing the whole suite.
    """
    if not slow_designs:
        return []
    from caasl_jax.baselines.runner import check_supported

    skipped = []
    for env_name, env in envs.items():
        for name in slow_designs:
            try:
                check_supported(env, name)
            except ValueError as error:
                skipped.append((env_name, name, str(error)))
    return skipped


def check_budgets(envs: dict[str, Environment]) -> None:
    """ValueError naming an env without a design step (budget < 1): nothing to evaluate."""
    for name, env in envs.items():
        if env.budget < 1:
            raise ValueError(
                f"{name}: evaluation needs a budget of >= 1 design step per episode, got "
                f"budget={env.budget} (env settings: --env-set / env_overrides)"
            )


def progress_path(checkpoint_dir: str | Path, env_name: str, design: str) -> Path:
    """The file under `checkpoint_dir` that holds `design`'s progress on `env_name`."""
    return Path(checkpoint_dir) / f"{env_name}--{design}.msgpack"


def check_progress_files(paths) -> None:
    """Before any rollout: ValueError naming the first of `paths` that exists but is no
    design-loop progress file (garbage, another format, a folder). Whether it is this
    run's progress is checked only when it is resumed (`runner.load_progress`)."""
    from caasl_jax.baselines.runner import read_progress

    for path in paths:
        if path.exists():
            try:
                read_progress(path)
            except ValueError as error:
                raise ValueError(f"{error}; delete it or choose another --checkpoint-dir") from None


def reward_models_for(reward_name: str, envs: dict[str, Environment]) -> dict[str, tuple]:
    """{env name: (reward params, reward config)} that score each env: one AVICI model
    for all (warning where its standardisation does not fit an env's data), or for
    "exact" each env's own exact posterior (ValueError naming an env it cannot score)."""
    from caasl_jax.reward.checkpoint import EXACT_REWARD, load_reward_model
    from caasl_jax.reward.standardize import warn_if_other_family

    if str(reward_name) == EXACT_REWARD:
        models = {}
        for name, env in envs.items():
            try:
                models[name] = load_reward_model(EXACT_REWARD, env)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return models
    reward_params, reward_config = load_reward_model(reward_name)
    for name in envs:
        warn_if_other_family(str(reward_name), reward_config.standardization, name)
    return dict.fromkeys(envs, (reward_params, reward_config))


def evaluate_suite(
    env_names: Sequence[str],
    designs: Sequence[str],
    *,
    n_envs: int = 100,
    seed: int = 0,
    mode: str = "stochastic",
    reward_model: str | None = None,
    env_overrides: dict | None = None,
    n_workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    checkpoint_dir: str | Path | None = None,
) -> tuple[dict, dict]:
    """Evaluate designs on environments; every input is checked before any rollout.

    designs: baseline names (`random`, `random-single`, `observational`, and the
    likelihood-based `diffcbed`, `ss-finite`) and at most one trained policy (a run
    directory, a policy file or a shipped policy name), labelled "caasl". env_names
    may hold suites (see `expand_env_names`). Environment settings come from the
    policy's run config, then `env_overrides`. With `checkpoint_dir`, the slow
    likelihood baselines save their progress there after every design step
    (`<env>--<design>.msgpack`) and a rerun resumes from it.
    Returns ({env: {label: {metric: {"mean", "stderr"}}}}, meta).
    """
    from caasl_jax.envs.registry import make_env
    from caasl_jax.train import action_kind

    if mode not in POLICY_MODES:
        raise ValueError(f"unknown policy mode {mode!r}; choose one of {POLICY_MODES}")
    check_positive_int("evaluate_suite", "n_envs", n_envs)
    slow = likelihood_baselines()
    designs = list(dict.fromkeys(designs))
    trained = [name for name in designs if name not in BASELINES and name not in slow]
    for name in trained:
        if not is_policy_spec(name):
            known = ", ".join([*BASELINES, "diffcbed", "ss-finite"])
            raise ValueError(
                f"design {name!r} is neither a run directory, a policy file, a shipped "
                f"policy ({', '.join(available_policies()) or 'none'}) nor a baseline ({known})"
            )
    if len(trained) > 1:
        raise ValueError(f"evaluate one trained policy at a time, got {trained}")
    # the policy's config only: its parameters are loaded (slow) after every check
    config = policy_config(trained[0]) if trained else None
    overrides = dict(config.env_overrides) if config else {}
    overrides.update(env_overrides or {})
    names = expand_env_names(env_names)
    envs = {name: make_env(name, **overrides) for name in names}  # bad names fail here
    check_budgets(envs)
    if config is not None:
        kind = action_kind(make_env(config.env, **config.env_overrides))  # the agent's
        for name, env in envs.items():
            if action_kind(env) != kind:
                raise ValueError(f"the policy in {trained[0]} cannot act on {name} (action layout)")
    reward_name = reward_model or (config.reward_model_name if config else None)
    if reward_name is None:
        raise ValueError(
            "a reward model is required when no trained policy is evaluated (--reward-model: "
            "a shipped name, a weights file or 'exact')"
        )
    skipped = not_applicable(envs, [name for name in designs if name in slow])
    skip = {s[:2] for s in skipped}
    if checkpoint_dir is not None:
        check_progress_files(
            progress_path(checkpoint_dir, env_name, name)
            for env_name in envs
            for name in designs
            if name in slow and (env_name, name) not in skip
        )
    reward_models = reward_models_for(reward_name, envs)
    agent, policy_params, _ = load_policy(trained[0]) if trained else (None, (), None)
    for env_name, name, reason in skipped:
        if log:
            log(f"{env_name:28s} {name:14s} skipped: {reason}")
    results = {}
    for env_name, env in envs.items():
        params = heldout_params(env, n_envs, seed)
        for name in designs:
            label = "caasl" if name in trained else name
            if (env_name, name) in skip:
                continue
            if name in slow:
                checkpoint = None
                if checkpoint_dir is not None:
                    checkpoint = progress_path(checkpoint_dir, env_name, name)
                histories = slow[name](
                    env, params, rollout_key(seed), n_workers=n_workers, progress=progress,
                    checkpoint=checkpoint,
                )  # fmt: skip
                summary = score_histories(env, histories, params, *reward_models[env_name])
            else:
                summary = evaluate_design(
                    env, label, *reward_models[env_name], n_envs, seed,
                    agent=agent, policy_params=policy_params, mode=mode,
                )  # fmt: skip
            results.setdefault(env_name, {})[label] = summary
            if log:
                final = {m: summary[m]["mean"][-1] for m in ("return", "auprc", "shd")}
                log(
                    f"{env_name:28s} {label:14s} return {final['return']:7.3f} ± "
                    f"{summary['return']['stderr'][-1]:.3f}   AUPRC {final['auprc']:.3f}"
                    f"   SHD {final['shd']:.2f}"
                )
    meta = {
        "designs": designs,
        "envs": names,
        "env_overrides": overrides,
        "mode": mode,
        "n_envs": n_envs,
        "seed": seed,
        "reward_model": reward_name,
        "skipped": [f"{name} on {env_name}: {reason}" for env_name, name, reason in skipped],
    }
    return results, meta


def results_rows(results: dict) -> list[list]:
    """Long-format rows [env, policy, metric, step, mean, stderr] of `evaluate_suite` results."""
    rows = []
    for env_name, by_design in results.items():
        for label, summary in by_design.items():
            for metric, stats in summary.items():
                for step, (mean, se) in enumerate(zip(stats["mean"], stats["stderr"])):
                    rows.append([env_name, label, metric, step, mean, se])
    return rows


def write_results(out: str | Path, results: dict, meta: dict) -> tuple[Path, Path]:
    """results.json ({"meta", "results"}) and results.csv (long format) under `out`."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "policy", "metric", "step", "mean", "stderr"])
        writer.writerows(results_rows(results))
    return json_path, csv_path


def run_folder_of(path: str | Path) -> Path | None:
    """The training or reward-pretraining run (a folder holding run.json) that `path` is
    or lies inside, resolved; None if there is none."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if (p / "run.json").is_file()), None)


def check_output_dir(out: str | Path, overwrite: bool, checkpoint_dir=None) -> None:
    """Before any work: refuse an --out (or a --checkpoint-dir) that is a file or lies
    under one, an --out that is or lies inside a training or reward-pretraining run
    (run.json) even with overwrite, and a non-empty --out unless told to overwrite."""
    out = Path(out)
    for option, path in (("--out", out), ("--checkpoint-dir", checkpoint_dir)):
        problem = None if path is None else folder_problem(path)
        if problem is not None:
            raise FileExistsError(f"{option} {path} {problem}; give a folder")
    run = run_folder_of(out)
    if run is not None:
        inside = run != out.resolve()
        where = f"lies inside the run {run}" if inside else "holds a run (it has run.json)"
        raise FileExistsError(
            f"--out {out} {where}; evaluation results go in a folder of their own, e.g. "
            f"--out {run.with_name(run.name + '-eval')}"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or --overwrite")
