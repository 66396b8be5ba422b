"""Replay memory per transition: our episode buffer vs the public release's layout.

The release stores obs and next_obs (two f32[n0 + T, d, 2] histories) per transition;
we store each episode once (see caasl_jax/replay.py). Prints JSON.

    python -m benchmarks.replay_memory
"""

import argparse
import json

from caasl_jax.cli import DefaultsHelpFormatter
from caasl_jax.replay import bytes_per_transition, init_replay

SETTINGS = {
    # name: (n0, budget T, d, action_dim)
    "linear-d10": (50, 10, 10, 20),
    "sergio-d10": (50, 10, 10, 10),
    "linear-d20": (50, 10, 20, 40),
}


def release_bytes(n0: int, budget: int, d: int, action_dim: int) -> dict:
    history = (n0 + budget) * d * 2 * 4
    return {
        "histories_only": 2 * history,
        "with_action_reward_done": 2 * history + 4 * action_dim + 4 + 1,
    }


def main(argv=None) -> None:
    argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    ).parse_args(argv)  # --help
    report = {}
    for name, (n0, budget, d, action_dim) in SETTINGS.items():
        state = init_replay(64, n0=n0, budget=budget, d=d, action_dim=action_dim)
        ours = bytes_per_transition(state)
        release = release_bytes(n0, budget, d, action_dim)
        report[name] = {
            "ours_bytes_per_transition": ours,
            "release_bytes_per_transition": release,
            "reduction_vs_release_histories": release["histories_only"] / ours,
            "ours_GB_at_1e7_transitions": ours * 1e7 / 1e9,
            "release_GB_at_1e7_transitions": release["with_action_reward_done"] * 1e7 / 1e9,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
