"""Shared runner of the paper-figure experiments: config -> evaluation -> JSON/CSV/PNG.

Each `figN_*.py` script is `run_figure("<name>")`: it reads configs/<name>.yaml, runs
`caasl_jax.evaluate.evaluate_suite` (the same code as `caasl evaluate`), and writes
results/<name>/{results.json, results.csv, <name>.png, table.md}. Command-line flags
override the config (e.g. `--policy runs/my-run --n-envs 20`).

The likelihood baselines (DiffCBED, SS Finite) take hours on 100 environments: they
save their progress to results/<name>/baseline-progress/ after every design step, and
rerunning the same command, --overwrite included, resumes there (the folder goes once
results.json is written; `--restart` discards it and starts afresh).

Run as scripts (`figure_main`), bad input ends in a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from caasl_jax import compile_cache
from caasl_jax.checks import check_positive_int
from caasl_jax.cli import DefaultsHelpFormatter, positive_int
from caasl_jax.plots import METRIC_LABELS

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"


@dataclasses.dataclass(frozen=True)
class FigureConfig:
    """One paper figure: which policy, designs and environments, and how to plot them."""

    title: str
    envs: tuple[str, ...]
    policy: str | None = None
    baselines: tuple[str, ...] = ("random", "observational")
    n_envs: int = 100
    seed: int = 0
    mode: str = "stochastic"
    reward_model: str | None = None
    env_overrides: dict = dataclasses.field(default_factory=dict)
    metrics: tuple[str, ...] = ("return",)
    panel_titles: dict = dataclasses.field(default_factory=dict)


def load_figure_config(name: str) -> FigureConfig:
    """configs/<name>.yaml as a FigureConfig; unknown keys are an error naming them."""
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise ValueError(f"no experiment config {name!r}; known: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    fields = {f.name for f in dataclasses.fields(FigureConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(fields)}")
    for key in ("envs", "baselines", "metrics"):
        if key in data:
            if not isinstance(data[key], list) or not all(isinstance(v, str) for v in data[key]):
                raise ValueError(f"{path}: {key} must be a list of names, got {data[key]!r}")
            data[key] = tuple(data[key])
    check_positive_int(str(path), "n_envs", data.get("n_envs", 1))
    unknown_metrics = sorted(set(data.get("metrics", ())) - set(METRIC_LABELS))
    if unknown_metrics:
        raise ValueError(
            f"{path}: unknown metrics {unknown_metrics}; known: {sorted(METRIC_LABELS)}"
        )
    return FigureConfig(**data)


def final_step_table(results: dict, metrics=("return", "shd", "auprc", "edge_f1")) -> str:
    """Markdown table of the final-step mean ± s.e. of each metric, per env and design."""
    head = "| environment | design | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for env, by_design in results.items():
        for design, summary in by_design.items():
            cells = [
                f"{summary[m]['mean'][-1]:.2f} ± {summary[m]['stderr'][-1]:.2f}" for m in metrics
            ]
            lines.append(f"| {env} | {design} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(name: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        description=f"paper experiment {name} (configs/{name}.yaml)",
    )
    parser.add_argument("--policy", help="trained policy: run dir, policy file or shipped name")
    parser.add_argument("--baselines", nargs="*", help="replace the config's baselines")
    parser.add_argument(
        "--n-envs",
        type=positive_int,
        help="held-out environments per env (default: the config's n_envs)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help=f"output folder (default experiments/results/{name})")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace existing results (saved baseline progress is still resumed)",
    )  # fmt: skip
    parser.add_argument(
        "--restart", action="store_true",
        help="discard saved baseline progress and run the design loops afresh",
    )  # fmt: skip
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plot and table from results.json"
    )
    return parser.parse_args(argv)


def write_figure(name: str, out: Path, results: dict, config: FigureConfig) -> str:
    """The PNG and table.md of a figure's results; returns the table."""
    from caasl_jax.plots import plot_stepwise

    plot_stepwise(results, out / f"{name}.png", config.metrics, config.panel_titles, config.title)
    table = final_step_table(results)
    (out / "table.md").write_text(table + "\n")
    return table


#: where a figure's likelihood baselines keep their per-step progress, under its --out
PROGRESS_DIR = "baseline-progress"


def progress_files(folder: Path) -> list[Path]:
    """The design-loop progress files (`<env>--<design>.msgpack`, see
    `caasl_jax.baselines.runner`) in `folder`; ValueError if it holds anything else, so
    that a wrong --out is never mistaken for saved progress."""
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir())
    strangers = [p.name for p in entries if not (p.is_file() and "--" in p.name
                                                 and p.name.endswith((".msgpack", ".partial")))]
    if strangers:
        raise ValueError(f"{folder} holds files that are not baseline progress: {strangers}")
    return [p for p in entries if p.suffix == ".msgpack"]


def discard_progress(folder: Path) -> None:
    """Delete the progress folder, once `progress_files` has checked it holds nothing
    else (saved progress and `.partial` leftovers of an interrupted write)."""
    progress_files(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _check_progress_is_this_runs(saved: list[Path], config) -> None:
    """ValueError if saved progress belongs to an (env, design) this run does not
    evaluate: the run would end by discarding it, hours of GIES refits."""
    from caasl_jax.evaluate import expand_env_names

    ours = {f"{env}--{design}" for env in expand_env_names(config.envs) for design in
            config.baselines}  # fmt: skip
    foreign = [path.name for path in saved if path.stem not in ours]
    if foreign:
        raise ValueError(
            f"{saved[0].parent} holds baseline progress of another run ({', '.join(foreign)});"
            " rerun with that run's --baselines and environments to resume it, choose another"
            " --out, or pass --restart to discard it"
        )


def run_figure(name: str, argv=None) -> dict:
    """Run one figure's experiment; returns the results dict it wrote."""
    from caasl_jax.evaluate import check_output_dir, evaluate_suite, write_results

    args = parse_args(name, argv)
    compile_cache.enable()
    config = load_figure_config(name)
    overrides = {
        "policy": args.policy,
        "baselines": tuple(args.baselines) if args.baselines is not None else None,
        "n_envs": args.n_envs,
        "seed": args.seed,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out) if args.out else RESULTS / name
    if args.replot:
        results = json.loads((out / "results.json").read_text())["results"]
        print(write_figure(name, out, results, config))
        return results
    progress = out / PROGRESS_DIR
    if args.restart:
        results = [p.name for p in out.iterdir() if p != progress] if out.is_dir() else []
        if results and not args.overwrite:  # before the progress goes, not after
            raise FileExistsError(
                f"{out} holds results ({', '.join(sorted(results))}); choose another --out "
                "or add --overwrite"
            )
        discard_progress(progress)
    saved = progress_files(progress)
    _check_progress_is_this_runs(saved, config)
    resumed = bool(saved)
    if resumed:
        print(f"resuming the likelihood baselines from {progress}/ (results written at "
              "the end replace any earlier ones in that folder)")  # fmt: skip
    else:
        check_output_dir(out, args.overwrite)
    designs = ([config.policy] if config.policy else []) + list(config.baselines)
    start = time.perf_counter()
    results, meta = evaluate_suite(
        config.envs,
        designs,
        n_envs=config.n_envs,
        seed=config.seed,
        mode=config.mode,
        reward_model=config.reward_model,
        env_overrides=config.env_overrides,
        progress=True,
        checkpoint_dir=progress,
    )
    meta.update(figure=name, title=config.title, wall_time_s=round(time.perf_counter() - start, 1),
                resumed=resumed)  # wall time of the last (resumed) part only
    write_results(out, results, meta)
    discard_progress(progress)  # the results now hold everything
    print(write_figure(name, out, results, config))
    print(f"wrote {out}/ (results.json, results.csv, {name}.png, table.md) in "
          f"{meta['wall_time_s']:.0f} s")  # fmt: skip
    return results


def figure_main(name: str, argv=None) -> int:
    """`run_figure` for a script: bad input (and an unwritable --out) is one line on
    stderr and exit status 2 instead of a traceback."""
    try:
        run_figure(name, argv)
    except (ValueError, OSError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    return 0
