"""`caasl` command line: train, pretrain-reward, evaluate, export-policy, envs.

caasl train --config small [--set key=value ...] [--run-dir runs/x] [--overwrite]
caasl train --resume runs/x
caasl pretrain-reward --env linear-d10 ...
caasl evaluate --policy runs/x --env linear-d10 linear-ood [--n-envs 100 --seed 0]
caasl export-policy runs/x policy.msgpack       (runs/x/best: the best-validated policy)
caasl envs [--d 10]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys

from caasl_jax import compile_cache
from caasl_jax.checks import CheckpointError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless it has none (None,
    an empty list, an off flag) or the text already names it; an option without help
    text shows its default alone."""

    @staticmethod
    def _shows_default(action) -> bool:
        default = action.default
        no_default = default is None or default is False or default in ([], argparse.SUPPRESS)
        return bool(action.option_strings) and not no_default

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)  # argparse prints no help line for help=None
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def int_at_least(minimum: int):
    """argparse type: an integer >= minimum (a bad count is a usage error, reported
    before anything compiles)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            shown = repr(text) if value is None else value
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {shown}")
        return value

    return parse


positive_int = int_at_least(1)


def _train(args) -> int:
    from caasl_jax import distributed
    from caasl_jax.config import load_config
    from caasl_jax.train import RunDir, train

    # the config is read (and a typo refused) before jax.distributed waits for the
    # other processes; reading it touches no device
    if args.resume:
        given = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--set", args.set),
                ("--run-dir", args.run_dir),
                ("--overwrite", args.overwrite),
            )
            if value
        ]
        if given:
            raise ValueError(
                f"--resume continues the run in its own folder with its own config; "
                f"drop {'/'.join(given)}"
            )
        run_dir = args.resume
        config = RunDir(run_dir).load_config()
    else:
        if not args.config:
            raise ValueError("give --config NAME_OR_FILE (e.g. small) or --resume RUN_DIR")
        config = load_config(args.config, args.set)
        run_dir = args.run_dir or f"runs/{config.env}-seed{config.seed}"
    # before anything touches a device; flags win over the CAASL_* variables
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        args.local_devices,
        auto=args.distributed_auto,
        connect_timeout=args.connect_timeout,
    )
    devices = None
    if args.devices:
        import jax

        if args.devices > jax.device_count():
            raise ValueError(
                f"--devices {args.devices}: only {jax.device_count()} devices are available"
                " (on a CPU, --local-devices N splits it into N devices)"
            )
        devices = jax.devices()[: args.devices]
    summary = train(
        config,
        run_dir,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        devices=devices,
        max_calls=args.max_calls,
    )
    print(
        f"run written to {summary['run_dir']} (checkpoints/, best/, metrics.jsonl, eval.jsonl, "
        "curves.png)"
    )
    if summary["last_eval"]:
        e = summary["last_eval"]
        print(
            "validation return (last evaluation): "
            f"CAASL {e['eval_return']:.3f} ± {e['eval_return_se']:.3f}, "
            f"random {e['eval_random_return']:.3f} ± {e['eval_random_return_se']:.3f}"
        )
    if summary["best_eval"]:
        b = summary["best_eval"]
        print(
            f"best validation return: CAASL {b['eval_return']:.3f} at iteration "
            f"{b['iteration']}, kept in {summary['run_dir']}/best/ (what caasl evaluate "
            "and export-policy load from best/)"
        )
    return 0


def _evaluate(args) -> int:
    from caasl_jax.evaluate import check_output_dir, evaluate_suite, write_results
    from caasl_jax.reward.pretrain import parse_env_overrides

    check_output_dir(args.out, args.overwrite, args.checkpoint_dir)
    results, meta = evaluate_suite(
        args.env,
        [args.policy, *args.baselines],
        n_envs=args.n_envs,
        seed=args.seed,
        mode=args.mode,
        reward_model=args.reward_model,
        env_overrides=parse_env_overrides(args.env_set),
        n_workers=args.workers,
        progress=not args.no_progress,
        checkpoint_dir=args.checkpoint_dir,
    )
    meta.update(policy=args.policy, baselines=args.baselines)
    json_path, csv_path = write_results(args.out, results, meta)
    from caasl_jax.plots import plot_stepwise

    plot = plot_stepwise(results, json_path.parent / "returns.png")
    print(f"wrote {json_path}, {csv_path} and {plot}")
    return 0


def _export_policy(args) -> int:
    from caasl_jax.evaluate import export_policy

    path = export_policy(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB): config + policy parameters")
    return 0


def _envs(args) -> int:
    from caasl_jax.envs.registry import env_names

    print("\n".join(env_names(args.d)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caasl", description="CAASL in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    add_command = functools.partial(sub.add_parser, formatter_class=DefaultsHelpFormatter)

    train = add_command("train", help="train a design policy with REDQ")
    train.add_argument(
        "--config",
        help="packaged config name (small, linear-d10, sergio-d10, linear-d10-cpu, "
        "sergio-d10-cpu) or YAML file",
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
    train.add_argument("--devices", type=positive_int, help="use only the first N devices")
    train.add_argument(
        "--max-calls",
        type=positive_int,
        help="stop after this many host calls (for a quick look)",
    )
    multi = train.add_argument_group(
        "multi-process (jax.distributed; see docs/distributed.md)",
        "or set CAASL_COORDINATOR / CAASL_NUM_PROCESSES / CAASL_PROCESS_ID / "
        "CAASL_LOCAL_DEVICES / CAASL_DISTRIBUTED=auto / CAASL_CONNECT_TIMEOUT",
    )
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's coordinator")
    multi.add_argument("--num-processes", type=positive_int, help="total number of processes")
    multi.add_argument("--process-id", type=int, help="this process, 0 .. N-1")
    multi.add_argument(
        "--local-devices", type=positive_int, help="CPU only: number of CPU devices of this process"
    )
    multi.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let jax.distributed.initialize() detect the cluster (SLURM, MPI, TPU pods)",
    )
    multi.add_argument(
        "--connect-timeout",
        type=positive_int,
        metavar="SECONDS",
        help="how long each process waits for all of them to join (default: 300, or "
        "CAASL_CONNECT_TIMEOUT)",
    )
    train.set_defaults(func=_train)

    pretrain = add_command(
        "pretrain-reward", help="pretrain the AVICI reward model", add_help=False
    )
    pretrain.set_defaults(func=None)

    ev = add_command("evaluate", help="evaluate a trained policy and baselines per step")
    ev.add_argument(
        "--policy",
        required=True,
        help="run directory (its latest checkpoint), a run's best/ folder (its policy with "
        "the best validation return), an exported policy file (.msgpack), a shipped policy "
        "(linear-d10, sergio-d10), or a baseline name (then --reward-model is needed)",
    )
    ev.add_argument(
        "--baselines",
        nargs="*",
        default=["random", "random-single", "observational"],
        help="random, random-single, observational; diffcbed, ss-finite (linear, slow)",
    )
    ev.add_argument(
        "--env",
        nargs="+",
        required=True,
        help="environment names or suites: linear-ood[-dN], sergio-ood[-dN], "
        "linear-dims[:10,12,15,20], sergio-dims",
    )
    ev.add_argument(
        "--env-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment setting for every --env (default: the policy run's)",
    )
    ev.add_argument(
        "--n-envs", type=positive_int, default=100, help="held-out environments per env name"
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the held-out test environments and of the rollouts",
    )
    ev.add_argument("--mode", choices=["stochastic", "deterministic"], default="stochastic")
    ev.add_argument(
        "--reward-model",
        help="reward model: shipped weights, a weights file, or 'exact' (the exact posterior "
        "of each linear env's prior; default: the policy run's)",
    )
    ev.add_argument(
        "--out",
        default="results/eval",
        help="output folder (results.json, results.csv, returns.png)",
    )
    ev.add_argument(
        "--overwrite", action="store_true", help="replace the results in an existing --out"
    )
    ev.add_argument(
        "--workers",
        type=positive_int,
        help="processes for the likelihood baselines (each refits and designs one env at "
        "a time; default: all cores)",
    )
    ev.add_argument(
        "--checkpoint-dir",
        help="save DiffCBED / SS Finite progress here after every design step; rerunning "
        "with the same folder resumes (into a fresh --out)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_evaluate)

    export = add_command(
        "export-policy", help="write a run's policy (config + parameters) to one small file"
    )
    export.add_argument(
        "run_dir", help="training run directory (latest checkpoint) or its best/ folder"
    )
    export.add_argument("out", help="output file, e.g. policies/linear-d10.msgpack")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_export_policy)

    envs = add_command("envs", help="list the registered environments")
    envs.add_argument("--d", type=int_at_least(2), default=10, help="number of variables")
    envs.set_defaults(func=_envs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `caasl` command; returns its exit status (2: bad input, printed as one
    line naming the problem)."""
    return _run_command(argv)[0]


def console_main(argv: list[str] | None = None) -> None:
    """Entry point of the `caasl` command: `main(argv)`, then exit with its status.

    After a damaged checkpoint the process ends at once (`os._exit`, streams flushed):
    tensorstore's reads that orbax left in flight complete afterwards and print
    "RuntimeError: Event loop is closed" tracebacks, one per array, from native threads
    that no Python hook sees; they buried the one-line error. Nothing is being written
    at that point (every command restores before it trains or writes results).
    """
    status, error = _run_command(argv)
    if isinstance(error, CheckpointError):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _run_command(argv: list[str] | None) -> tuple[int, Exception | None]:
    """(exit status, the bad-input error reported, if any) of one command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain-reward"]:
        from caasl_jax.reward.pretrain import main as pretrain_main

        command, run = "pretrain-reward", lambda: pretrain_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    compile_cache.enable()
    try:
        return run(), None
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"caasl {command}: error: {error}", file=sys.stderr)
        return 2, error


if __name__ == "__main__":
    console_main()
