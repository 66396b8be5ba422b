"""The AVICI reward model: network, standardisation, checkpoints, reward and pretraining;
and the exact posterior of the linear prior (exact.py), the oracle reward.

    from caasl_jax.envs import make_env
    from caasl_jax.reward import load_pretrained, make_score_fn
    params, config, meta = load_pretrained("linear-d10")
    env = make_env("linear-d10").with_score(make_score_fn(params, config))
    # or the oracle: make_score_fn({}, ExactPrior.of_env(env))
"""

from caasl_jax.reward.checkpoint import (
    EXACT_REWARD,
    Pretrained,
    available_pretrained,
    load_avici_checkpoint,
    load_pretrained,
    load_reward_model,
    load_weights,
    save_weights,
)
from caasl_jax.reward.exact import ExactPrior, exact_edge_posterior, exact_edge_probs
from caasl_jax.reward.model import (
    AviciConfig,
    AviciModel,
    AviciNet,
    edge_logits,
    edge_probs,
    init_params,
    param_count,
)
from caasl_jax.reward.reward import (
    expected_correct_entries,
    make_score_fn,
    posterior_edge_probs,
    reward_from_probs,
    step_reward,
)

__all__ = [
    "EXACT_REWARD",
    "AviciConfig",
    "AviciModel",
    "AviciNet",
    "ExactPrior",
    "Pretrained",
    "available_pretrained",
    "edge_logits",
    "edge_probs",
    "exact_edge_posterior",
    "exact_edge_probs",
    "expected_correct_entries",
    "init_params",
    "load_avici_checkpoint",
    "load_pretrained",
    "load_reward_model",
    "load_weights",
    "make_score_fn",
    "param_count",
    "posterior_edge_probs",
    "reward_from_probs",
    "save_weights",
    "step_reward",
]
