"""Pure, jittable design environments (see `caasl_jax.envs.core` for the protocol)."""

from caasl_jax.envs.core import Environment, EnvState, History, append_rows, empty_history
from caasl_jax.envs.graphs import erdos_renyi_dag, is_acyclic, sample_graph, scale_free_dag
from caasl_jax.envs.linear import LinearParams, LinearSCMEnv
from caasl_jax.envs.registry import env_names, make_env
from caasl_jax.envs.sergio import SergioEnv, SergioParams

__all__ = [
    "EnvState",
    "Environment",
    "History",
    "LinearParams",
    "LinearSCMEnv",
    "SergioEnv",
    "SergioParams",
    "append_rows",
    "empty_history",
    "env_names",
    "erdos_renyi_dag",
    "is_acyclic",
    "make_env",
    "sample_graph",
    "scale_free_dag",
]
