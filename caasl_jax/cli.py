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
