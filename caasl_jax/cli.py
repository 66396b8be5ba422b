"""`caasl` command line: train, pretrain-reward, envs.

caasl train --config small [--set key=value ...] [--run-dir runs/x] [--overwrite]
caasl train --resume runs/x
caasl pretrain-reward --env linear-d10 ...
caasl envs [--d 10]
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from caasl_jax.config import load_config
    from caasl_jax.train import RunDir, train

    if args.resume:
        if args.config or args.set:
            raise SystemExit(
                "caasl train: --resume takes the run's own config; drop --config/--set"
            )
        run_dir = args.resume
        config = RunDir(run_dir).load_config()
    else:
        if not args.config:
            raise SystemExit(
                "caasl train: give --config NAME_OR_FILE (e.g. small) or --resume RUN_DIR"
            )
        config = load_config(args.config, args.set)
        run_dir = args.run_dir or f"runs/{config.env}-seed{config.seed}"
    if args.devices:
        import jax

        devices = jax.devices()[: args.devices]
    else:
        devices = None
    summary = train(
        config,
        run_dir,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        devices=devices,
        max_calls=args.max_calls,
    )
    print(
        f"run written to {summary['run_dir']} (checkpoints/, metrics.jsonl, eval.jsonl, curves.png)"
    )
    if summary["last_eval"]:
        e = summary["last_eval"]
        print(
            f"held-out return: CAASL {e['eval_return']:.3f} ± {e['eval_return_se']:.3f}, "
            f"random {e['eval_random_return']:.3f} ± {e['eval_random_return_se']:.3f}"
        )
    return 0


def _evaluate(args) -> int:
    import csv
    import json
    from pathlib import Path

    from caasl_jax.envs.registry import make_env
    from caasl_jax.evaluate import BASELINES, agent_policy, evaluate_policy
    from caasl_jax.reward.pretrain import parse_env_overrides
    from caasl_jax.train import RunDir, action_kind, load_reward_model, load_trained_policy

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or --overwrite")
    names = list(dict.fromkeys([args.policy, *args.baselines]))
    run_dirs = [name for name in names if name not in BASELINES]
    for name in run_dirs:
        if not Path(name).is_dir():
            raise ValueError(
                f"--policy/--baselines: {name!r} is neither a run directory nor a baseline "
                f"({', '.join(BASELINES)})"
            )
    # environments take the policy run's settings (n0, budget, ...), then --env-set
    overrides = dict(RunDir(run_dirs[0]).load_config().env_overrides) if run_dirs else {}
    overrides.update(parse_env_overrides(args.env_set))
    envs = [make_env(name, **overrides) for name in args.env]  # bad names fail before work
    agent = policy_params = None
    reward_name = args.reward_model
    for name in names:
        if name not in BASELINES:
            agent, policy_params, config = load_trained_policy(name)
            reward_name = reward_name or config.reward_model
    if reward_name is None:
        raise ValueError("--reward-model is required when no trained policy is evaluated")
    reward_params, reward_config = load_reward_model(reward_name)
    results, rows = {}, []
    for env_name, env in zip(args.env, envs):
        for name in names:
            if name in BASELINES:
                policy = BASELINES[name](env)
            else:
                if action_kind(env) != agent.policy_config.action_kind:
                    raise ValueError(
                        f"the policy in {name} cannot act on {env_name} (action layout)"
                    )
                policy = agent_policy(agent, policy_params, args.mode)
            label = name if name in BASELINES else "caasl"
            summary = evaluate_policy(
                env, policy, reward_params, reward_config, args.n_envs, args.seed
            )
            results.setdefault(env_name, {})[label] = summary
            for metric, stats in summary.items():
                for step, (mean, se) in enumerate(zip(stats["mean"], stats["stderr"])):
                    rows.append([env_name, label, metric, step, mean, se])
            final = {m: summary[m]["mean"][-1] for m in ("return", "auprc", "shd")}
            se = summary["return"]["stderr"][-1]
            print(
                f"{env_name:28s} {label:14s} return {final['return']:7.3f} ± {se:.3f}"
                f"   AUPRC {final['auprc']:.3f}   SHD {final['shd']:.2f}"
            )
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "policy": args.policy,
        "baselines": args.baselines,
        "mode": args.mode,
        "n_envs": args.n_envs,
        "seed": args.seed,
        "reward_model": reward_name,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "policy", "metric", "step", "mean", "stderr"])
        writer.writerows(rows)
    print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    return 0


def _envs(args) -> int:
    from caasl_jax.envs.registry import env_names

    print("\n".join(env_names(args.d)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caasl", description="CAASL in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a design policy with REDQ")
    train.add_argument(
        "--config", help="packaged config name (small, linear-d10, sergio-d10) or YAML file"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set redq.gamma=0.95 (repeatable)",
    )
    train.add_argument("--run-dir", help="output directory (default runs/<env>-seed<seed>)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--devices", type=int, help="use only the first N devices")
    train.add_argument(
        "--max-calls", type=int, help="stop after this many host calls (for a quick look)"
    )
    train.set_defaults(func=_train)

    pretrain = sub.add_parser(
        "pretrain-reward", help="pretrain the AVICI reward model", add_help=False
    )
    pretrain.set_defaults(func=None)

    ev = sub.add_parser("evaluate", help="evaluate a trained policy and baselines per step")
    ev.add_argument("--policy", required=True, help="run directory, or a baseline name")
    ev.add_argument("--baselines", nargs="*", default=["random", "random-single", "observational"])
    ev.add_argument("--env", nargs="+", required=True, help="one or more environment names")
    ev.add_argument(
        "--env-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment setting for every --env (default: the policy run's)",
    )
    ev.add_argument("--n-envs", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--mode", choices=["stochastic", "deterministic"], default="stochastic")
    ev.add_argument("--reward-model", help="reward model (default: the policy run's)")
    ev.add_argument("--out", default="results/eval", help="output folder (JSON + CSV)")
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=_evaluate)

    envs = sub.add_parser("envs", help="list the registered environments")
    envs.add_argument("--d", type=int, default=10)
    envs.set_defaults(func=_envs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain-reward"]:
        from caasl_jax.reward.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"caasl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
