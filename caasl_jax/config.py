"""Training configuration: frozen dataclasses that load from YAML with strict keys.

A config file is YAML whose keys mirror `TrainConfig`; unknown keys (typos) raise a
ValueError naming the key and the known ones before anything runs. `--set a.b=v`
overrides any field, the value parsed as YAML (`--set redq.gamma=0.95`).
Packaged configs (caasl_jax/configs/*.yaml) are addressed by name: `small`,
`linear-d10`, `sergio-d10` and their CPU-sized variants `linear-d10-cpu`, `sergio-d10-cpu`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from caasl_jax.agents.networks import EncoderConfig
from caasl_jax.agents.redq import REDQConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
    """A policy or critic network: its encoder and the per-variable head's widths."""

    encoder: EncoderConfig = EncoderConfig()
    hidden: tuple[int, ...] = (128, 128)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs.

    Sizes are global (over all devices): num_envs environments per iteration and
    batch_size transitions per gradient step must divide by the device count.
    One host call runs `iterations_per_call` iterations; each iteration rolls out
    num_envs episodes, adds them to replay and, once replay holds warmup_episodes,
    runs `updates_per_iteration` REDQ updates (each utd critic steps + 1 policy step).
    Every `eval_every` calls the policy is rolled out on `eval_envs` validation
    environments (disjoint from the test environments of `caasl evaluate`); the policy
    with the best validation return is kept in the run's best/ folder. reward_model: a
    shipped name, a weights file, "auto" (the shipped weights named like `env`) or
    "exact" (the exact posterior of a linear ER env's prior: an oracle reward).
    """

    env: str = "linear-sparse-d5"
    env_overrides: dict = dataclasses.field(default_factory=dict)
    reward_model: str = "auto"
    seed: int = 0
    iterations: int = 100
    iterations_per_call: int = 5
    num_envs: int = 32
    updates_per_iteration: int = 8
    batch_size: int = 64
    replay_episodes: int = 20_000
    warmup_episodes: int = 64
    policy: NetworkSettings = NetworkSettings(
        encoder=EncoderConfig(dim=32, num_layers=4, ffn_multiplier=4, dropout=0.1)
    )
    critic: NetworkSettings = NetworkSettings(
        encoder=EncoderConfig(dim=32, num_layers=4, ffn_multiplier=2, dropout=0.0)
    )
    redq: REDQConfig = REDQConfig()
    eval_every: int = 5
    eval_envs: int = 100
    checkpoint_every: int = 5
    keep_checkpoints: int = 2

    def __post_init__(self):
        positive = [
            "iterations",
            "iterations_per_call",
            "num_envs",
            "updates_per_iteration",
            "batch_size",
            "replay_episodes",
            "eval_every",
            "eval_envs",
            "checkpoint_every",
            "keep_checkpoints",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_episodes <= self.replay_episodes:
            raise ValueError(
                f"config: warmup_episodes must be in 0 .. replay_episodes "
                f"({self.replay_episodes}): updates start once the replay holds that many "
                f"episodes, got {self.warmup_episodes}"
            )
        if self.iterations % self.iterations_per_call:
            raise ValueError(
                f"config: iterations ({self.iterations}) must be a multiple of "
                f"iterations_per_call ({self.iterations_per_call})"
            )
        if self.replay_episodes < self.num_envs:
            raise ValueError(
                f"config: replay_episodes ({self.replay_episodes}) must hold at least one "
                f"iteration of num_envs ({self.num_envs}) episodes"
            )

    @property
    def host_calls(self) -> int:
        return self.iterations // self.iterations_per_call

    @property
    def reward_model_name(self) -> str:
        """The reward model to load: `reward_model`, with "auto" resolved to the shipped
        weights named like `env` (ValueError when there are none)."""
        if self.reward_model != "auto":
            return self.reward_model
        from caasl_jax.reward.checkpoint import available_pretrained

        shipped = available_pretrained()
        if self.env not in shipped:
            raise ValueError(
                f"config: reward_model 'auto' needs shipped weights named like env "
                f"{self.env!r}, and there are none (shipped: {', '.join(shipped)}); set "
                "reward_model to one of those or to a weights file"
            )
        return self.env


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(fields)}"
        )
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is dict and not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    return value


def to_dict(config) -> dict:
    """Plain nested dict (YAML-safe) of a config dataclass."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict copy."""
    data = yaml.safe_load(yaml.safe_dump(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {dotted}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def resolve_config_path(name_or_path: str) -> Path:
    """A packaged config name (`small`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"config file {name_or_path!r} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown config {name_or_path!r}; packaged configs: {', '.join(known)}")
    return packaged


def read_yaml_mapping(path: Path) -> dict:
    """The mapping a YAML file holds ({} when empty); ValueError naming the file when it
    is not YAML or holds something else than a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Load a TrainConfig from a packaged name or YAML path, then apply --set overrides."""
    path = resolve_config_path(name_or_path)
    data = read_yaml_mapping(path)
    data = apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data, where=f"config {path.name}")
