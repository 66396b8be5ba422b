"""Regenerate benchmarks/RESULTS.md (tables and plots) with one command.

    python -m benchmarks.report                 # measure everything (~25 min on 2 cores)
    python -m benchmarks.report --from-json     # re-render from benchmarks/results/*.json

Runs each benchmark in its own process, keeps its raw JSON under benchmarks/results/,
draws benchmarks/plots/*.png and writes RESULTS.md. The SERGIO simulator, reward model
and likelihood baselines have their own result files (RESULTS_SERGIO.md, MODEL_CARD.md,
RESULTS_BASELINES.md); this report links them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from caasl_jax.checks import file_path_problem
from caasl_jax.cli import DefaultsHelpFormatter

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
STAMPS_FILE = RESULTS_DIR / "measured_at.json"
PLOTS_DIR = HERE / "plots"

# reduced counts of the paper configuration (linear-d10) that fit a CPU: the stages
# are timed at these sizes and scaled to the paper's (rollout linear in envs, update
# linear in batch)
PAPER_STAGE_OVERRIDES = [
    "num_envs=100",
    "batch_size=256",
    "updates_per_iteration=1",
    "iterations_per_call=1",
    "warmup_episodes=100",
    "replay_episodes=1000",
]

BENCHMARKS = {
    "grad_step": ["benchmarks.grad_step"],
    "train_small": [
        "benchmarks.train_throughput",
        "--config",
        "small",
        "--devices",
        "1",
        "2",
        "4",
        "--calls",
        "2",
        "--repeats",
        "2",
    ],
    "train_paper": [
        "benchmarks.train_throughput",
        "--config",
        "linear-d10",
        "--calls",
        "1",
        "--repeats",
        "2",
        *[arg for item in PAPER_STAGE_OVERRIDES for arg in ("--set", item)],
    ],
    "env": ["benchmarks.env_throughput", "--repeats", "3"],
    "env_sergio": [
        "benchmarks.env_throughput",
        "--env",
        "sergio-d10",
        "--batch",
        "1",
        "100",
        "1000",
        "--repeats",
        "3",
    ],
    "replay": ["benchmarks.replay_memory"],
}
# REFERENCE.md section 5: the release's env episodes, 1,000 envs, reward excluded
RELEASE_ENV_TRANSITIONS_PER_S = {"linear": 4600, "SERGIO": 930}


def run_benchmark(name: str) -> dict:
    """Run one benchmark module in a fresh process; save and return its JSON."""
    cmd = [sys.executable, "-m", *BENCHMARKS[name]]
    print(f"[report] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, cwd=HERE.parent)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"benchmark {name} failed")
    text = out.stdout[out.stdout.index("{") :]
    result = json.loads(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    stamps = load_stamps()
    stamps[name] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    STAMPS_FILE.write_text(json.dumps(dict(sorted(stamps.items())), indent=2) + "\n")
    return result


def load_stamps() -> dict[str, str]:
    """{benchmark: ISO time its JSON was measured}; file times would not do (a checkout
    rewrites them)."""
    return json.loads(STAMPS_FILE.read_text()) if STAMPS_FILE.exists() else {}


def load_results() -> dict:
    missing = [n for n in BENCHMARKS if not (RESULTS_DIR / f"{n}.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"no saved results for {missing} in {RESULTS_DIR}; run without --from-json"
        )
    results = {n: json.loads((RESULTS_DIR / f"{n}.json").read_text()) for n in BENCHMARKS}
    optional = RESULTS_DIR / "baseline_runtime.json"  # slow; run on its own (RESULTS_BASELINES.md)
    if optional.exists():
        results["baseline_runtime"] = json.loads(optional.read_text())
        results["baseline_runtime"]["measured_at"] = load_stamps().get("baseline_runtime")
    return results


# ----------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------


def draw_plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(exist_ok=True)
    grad = results["grad_step"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sweep = grad["batch_sweep"]
    axes[0].plot(
        [r["batch"] for r in sweep], [r["histories_per_s"] for r in sweep], "o-", label="caasl-jax"
    )
    axes[0].axhline(
        256 / grad["release"]["grad_step_s"], color="gray", ls="--", label="release (B=256)"
    )
    axes[0].set(
        xscale="log",
        xlabel="minibatch (histories)",
        ylabel="histories / s",
        title="REDQ gradient step vs batch size",
    )
    axes[0].legend()
    devices = grad["device_sweep"]
    axes[1].plot(
        [r["devices"] for r in devices],
        [r["histories_per_s"] for r in devices],
        "o-",
        label="gradient step, B=256",
    )
    small = results["train_small"]["results"]
    ax2 = axes[1].twinx()
    ax2.plot(
        [r["devices"] for r in small],
        [r["fused"]["transitions_per_s"] for r in small],
        "s--",
        color="C1",
        label="fused small-config call",
    )
    ax2.set_ylabel("env transitions / s (fused call)")
    axes[1].set(
        xlabel="devices (fake CPU devices on 2 cores)",
        ylabel="histories / s",
        title="scaling with devices",
    )
    axes[1].set_xticks([r["devices"] for r in devices])
    lines = axes[1].get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    axes[1].legend(lines, [line.get_label() for line in lines], fontsize=8)
    fig.tight_layout()
    path = folder / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


# ----------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def env_episode_row(kind: str, env: dict) -> str:
    """Headline row: whole env episodes at 1,000 envs (or the largest batch) vs the release."""
    row = next((r for r in env["results"] if r["batch"] == 1000), env["results"][-1])
    release = RELEASE_ENV_TRANSITIONS_PER_S[kind]
    rate = row["episode_transitions_per_s"]
    return (
        f"| {kind} env episode ({env['env']}), {row['batch']:,} envs, reward excluded | "
        f"{release:,} transitions/s | {rate:,.0f} transitions/s | **{_f(rate / release, 0)}x** |"
    )


def baseline_section(runtime: dict, env: str = "linear-d10") -> list[str]:
    """Lines comparing DiffCBED / SS Finite with CAASL per design step and environment,
    from `benchmarks.baseline_runtime`'s JSON (optional: empty when it has no `env`)."""
    if env not in runtime.get("envs", {}):
        return []
    r = runtime["envs"][env]
    first, last, e2e = r["after_step_0"], r["after_step_9"], r["end_to_end"]
    forward = r["caasl_forward"]["batch_100"]["per_env_s"]
    when = runtime.get("measured_at")
    when = f"measured {measured_between([when])}, " if when else ""

    def one_process(method: str) -> str:
        return " / ".join(
            f"{_f(at['posterior_refit']['median_s'] + at[method]['median_s'])} s"
            for at in (first, last)
        )

    lines = [
        f"## Likelihood-based design vs CAASL's forward pass ({env})",
        "",
        "Per design step and environment, from `benchmarks/results/baseline_runtime.json`",
        f"({when}`python -m benchmarks.baseline_runtime`; every run, the settings and the",
        "rates of the 100-environment figure runs: `RESULTS_BASELINES.md`). One process: the",
        f"posterior refit ({first['rows']} / {last['rows']} rows of history) plus the design;",
        "end to end: the whole design loop with its worker processes, start-up and compiles.",
        "",
        "| design | one process, after step 0 / step 9 | end to end | vs CAASL |",
        "|---|---|---|---|",
    ]
    for method, key in (("DiffCBED", "diffcbed"), ("SS Finite", "ss_finite")):
        loop = e2e[key.replace("_", "-")]
        lines.append(
            f"| {method} | {one_process(key)} | {_f(loop['per_step_per_env_s'])} s "
            f"({loop['n_envs']} envs, {loop['workers']} workers) | "
            f"{loop['per_step_per_env_s'] / forward:,.0f}x slower |"
        )
    lines += [
        f"| CAASL policy forward pass, batch 100 | {forward:.4f} s | | 1x |",
        "",
    ]
    return lines


def _machine_text(machine: dict) -> str:
    return (
        f"{machine['processor']}, {machine['cpu_count']} cores, "
        f"jax {machine['jax']} ({machine['backend']})"
    )


def _machines(result) -> list[dict]:
    """The machine records of one benchmark's JSON: its own and its rows'."""
    rows = result.get("results", []) if isinstance(result, dict) else []
    found = [result] + [row for row in rows if isinstance(row, dict)]
    return [r["machine"] for r in found if isinstance(r, dict) and "machine" in r]


def attention_text(results: dict) -> str:
    """Which attention path each network benchmark used (caasl_jax/kernels); results
    from before 2026-12-02 name none: they all used pure JAX."""
    paths = {
        name: sorted({m.get("attention", "pure JAX") for m in _machines(results.get(name))})
        for name in ("grad_step", "train_small", "train_paper")
    }
    paths = {name: " and ".join(p) for name, p in paths.items() if p}
    if len(set(paths.values())) == 1:
        return f"the networks' attention: {next(iter(paths.values()))}"
    return "the networks' attention: " + ", ".join(f"{n} {p}" for n, p in paths.items())


def other_machines(results: dict) -> list[str]:
    """'<benchmark> (<machine>)' for each result measured on another kind of machine than
    the gradient step (processor, cores, jax, backend; the kernel build may differ)."""
    reference = _machine_text(results["grad_step"]["machine"])
    others = []
    for name, result in results.items():
        texts = {_machine_text(m) for m in _machines(result)} - {reference}
        others += [f"{name} ({text})" for text in sorted(texts)]
    return others


def render(results: dict, stamp: str) -> str:
    grad, small, paper = results["grad_step"], results["train_small"], results["train_paper"]
    envs = {"linear": results["env"], "SERGIO": results["env_sergio"]}
    replay = results["replay"]
    release = grad["release"]
    machine = grad["machine"]
    b256 = next(r for r in grad["batch_sweep"] if r["batch"] == 256)
    act = grad["act"]
    best = min(grad["device_sweep"], key=lambda r: r["seconds"])
    others = other_machines(results)
    lines = [
        "# Measured figures",
        "",
        "Regenerated by `python -m benchmarks.report` (re-render saved JSON with",
        "`--from-json`); raw JSON in `benchmarks/results/`. Do not edit by hand.",
        "",
        f"Measured {stamp} on: {_machine_text(machine)}, {machine['platform']}"
        + (f"; except {', '.join(others)}" if others else "")
        + f"; {attention_text(results)}"
        + ". The VM is shared: figures can vary by up to about 2x between runs. No GPU was "
        "lent to this task;",
        "`benchmarks/gpu.sh` is the prepared script that records these figures on one.",
        "",
        "## This project vs the authors' PyTorch release (same machine class)",
        "",
        "| hot path | release | caasl-jax | speed-up |",
        "|---|---|---|---|",
        f"| one REDQ gradient step, minibatch 256 histories [60, 10, 2], paper sizes | "
        f"{release['grad_step_s']} s, {release['grad_step_peak_gb']} GB peak | "
        f"{_f(b256['seconds'])} s, {_f(b256['peak_rss_gb'])} GB peak RSS "
        f"(XLA temporaries {_f(b256['xla_temp_gb'])} GB) | "
        f"**{_f(release['grad_step_s'] / b256['seconds'], 1)}x** time, "
        f"{_f(release['grad_step_peak_gb'] / b256['peak_rss_gb'], 1)}x less memory |",
        f"| the same step with the batch split over {best['devices']} CPU devices "
        f"(`caasl train --local-devices {best['devices']}`) | | {_f(best['seconds'])} s, "
        f"{_f(best['peak_rss_gb'])} GB peak RSS | "
        f"**{_f(release['grad_step_s'] / best['seconds'], 1)}x** time |",
        f"| sampling actions for {act['batch']:,} histories | {release['act_1000_s']} s "
        f"(train mode, dropout on) | {_f(act['seconds'])} s (dropout off) | "
        f"**{_f(release['act_1000_s'] * act['batch'] / 1000 / act['seconds'], 1)}x** |",
        *[env_episode_row(kind, env) for kind, env in envs.items()],
        "| SERGIO cells/s vs avici's simulator, AVICI reward model | see `RESULTS_SERGIO.md`, "
        "`caasl_jax/weights/MODEL_CARD.md` | | |",
        "",
        f"Targets of issue 7: gradient step at most 9.7 s (measured {_f(b256['seconds'])} s "
        f"on one device, {_f(best['seconds'])} s on {best['devices']}: "
        f"{'met' if best['seconds'] <= 9.7 else 'NOT met'}) with at most half the release's "
        f"peak memory ({_f(b256['peak_rss_gb'])} GB: "
        f"{'met' if b256['peak_rss_gb'] <= release['grad_step_peak_gb'] / 2 else 'NOT met'}); "
        f"action sampling at least 10x "
        f"({'met' if release['act_1000_s'] / act['seconds'] >= 10 else 'NOT met'}).",
        "",
        *baseline_section(results.get("baseline_runtime", {})),
        "## Gradient step vs minibatch size (`python -m benchmarks.grad_step`)",
        "",
        "Policy + 2 critics + target critics + temperature, utd 1, paper network sizes,",
        "linear layout, automatic micro-batching (`caasl_jax/microbatch.py`). Each row is a",
        "fresh process, so the peak RSS is that of the step alone.",
    ]
    # result files from before 2026-12-01 have no compile times
    with_compile = all("compile_s" in r for r in grad["batch_sweep"])
    if with_compile:
        lines[-1] += " Compile: tracing and compiling the step, once per run."
    lines += [
        "",
        "| minibatch | s / step | histories / s |"
        + (" compile s |" if with_compile else "")
        + " peak RSS GB | XLA temporaries GB |",
        "|---|---|---|" + ("---|" if with_compile else "") + "---|---|",
    ]
    for r in grad["batch_sweep"]:
        lines.append(
            f"| {r['batch']} | {_f(r['seconds'])} | {_f(r['histories_per_s'], 1)} | "
            + (f"{_f(r['compile_s'], 1)} | " if with_compile else "")
            + f"{_f(r['peak_rss_gb'])} | {_f(r['xla_temp_gb'], 3)} |"
        )
    lines += [
        "",
        "![throughput](plots/throughput.png)",
        "",
        "## Scaling over devices",
        "",
        "Fake CPU devices (`jax_num_cpu_devices`) share the same 2 cores, so these rows",
        "check that the sharded programs run and how much the second core helps; they",
        "are not a multi-chip speed-up.",
        "",
        "| devices | gradient step B=256: s | histories / s | fused small-config call: s | "
        "env transitions / s (fused) |",
        "|---|---|---|---|---|",
    ]
    steps = {g["devices"]: g for g in grad["device_sweep"]}
    fused = {r["devices"]: r["fused"] for r in small["results"]}
    for n in sorted(steps.keys() | fused.keys()):  # paired by device count; "—" if unmeasured
        g, f = steps.get(n), fused.get(n)
        lines.append(
            f"| {n} | {_f(g['seconds']) if g else '—'} | "
            f"{_f(g['histories_per_s'], 1) if g else '—'} | "
            f"{_f(f['call_s']) if f else '—'} | "
            f"{format(f['transitions_per_s'], ',.0f') if f else '—'} |"
        )
    lines += [
        "",
        "## Whole training iteration by stage (`python -m benchmarks.train_throughput`)",
        "",
        "rollout = policy + environment + AVICI reward for all envs of one iteration;",
        "update = one REDQ update at the config's minibatch; fused = a whole jitted call",
        "(K iterations of rollout + replay insert + U updates).",
        "",
        "| config | devices | envs x T | rollout s (transitions/s) | minibatch | update s | "
        "fused call s | paper-length run (1e8 transitions, 640k steps of batch 4,096) "
        "with these networks, 1 device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, block in (("small", small), ("linear-d10 (reduced counts)", paper)):
        for r in block["results"]:
            lines.append(
                f"| {label} | {r['devices']} | {r['num_envs']} | {_f(r['rollout']['seconds'])} "
                f"({r['rollout']['transitions_per_s']:,.0f}) | {r['batch_size']} | "
                f"{_f(r['update']['seconds'])} | {_f(r['fused']['call_s'])} | "
                f"{_f(r['projected_paper_run_hours_single_device'] / 24, 0)} days |"
            )
    p = paper["results"][0]
    grad_hours = 640_000 * p["update"]["seconds"] * 4096 / p["batch_size"] / 3600
    roll_hours = 1e8 / p["rollout"]["transitions_per_s"] / 3600
    lines += [
        "",
        f"Paper run projection on this CPU (linear-d10 networks and shipped reward model): "
        f"{_f(roll_hours, 0)} h of rollouts (1e8 transitions) + {_f(grad_hours, 0)} h of "
        f"gradient steps (640,000 steps of batch 4,096, scaled linearly from batch "
        f"{p['batch_size']}): the gradient steps are {_f(100 * grad_hours / (grad_hours + roll_hours), 0)}% "
        "of the cost. The release's figures give about 16 years on the same CPU.",
        "",
        "## Environments (`python -m benchmarks.env_throughput [--env sergio-d10]`)",
        "",
        "Reward excluded, random actions; steps: T design steps of reset environments; "
        "whole episode: sampling the hidden parameters + reset + the T steps.",
    ]
    for env in envs.values():
        lines += [
            "",
            f"{env['env']}, n0 = {env['n0']}, T = {env['budget']}:",
            "",
            "| batch | steps: transitions/s | whole episode: transitions/s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['batch']:,} | {r['transitions_per_s']:,.0f} | "
            f"{r['episode_transitions_per_s']:,.0f} |"
            for r in env["results"]
        ]
    lines += [
        "",
        "## Replay memory (`python -m benchmarks.replay_memory`)",
        "",
        "| setting | ours, bytes/transition | release layout (two f32 histories) | reduction | "
        "ours at 1e7 transitions |",
        "|---|---|---|---|---|",
    ]
    for name, r in replay.items():
        lines.append(
            f"| {name} | {r['ours_bytes_per_transition']:,} | "
            f"{r['release_bytes_per_transition']['histories_only']:,} | "
            f"{_f(r['reduction_vs_release_histories'], 1)}x | {_f(r['ours_GB_at_1e7_transitions'], 1)} GB |"
        )
    lines += ["", WHAT_LIMITS, ""]
    return "\n".join(lines)


WHAT_LIMITS = """## What limits the gradient step on this CPU

Figures from `python -m benchmarks.encoder_profile` (forward vs gradient of the
paper-size encoders on one micro-batch of 4 histories) and from
`python -m benchmarks.grad_step --microbatch 0 --batch-sizes 64 --devices 1` (the
step without micro-batching), measured on this VM during development:

- **Fused CPU attention kernel** (2026-12-02, a 2-core Intel Xeon VM with AVX-512 and
  AMX). The items below are what limited the pure-JAX attention, which the networks
  still run on accelerators and where the kernel is off (`CAASL_CPU_KERNELS=off`) or
  cannot be built. On a CPU the agents' attention now runs in one C++ custom call per
  layer and direction (`caasl_jax/kernels/attention_cpu.cc`, built with the machine's
  C++ compiler on first use): per head it computes the logits, softmax, dropout and
  value product in registers, 16 queries per vector lane, and keeps only the row
  maxima and sums for the backward pass, which recomputes the weights; heads are
  split over XLA's intra-op threads. None of the [..., 60, 60] intermediates reaches
  memory. Same session, `python -m benchmarks.grad_step --batch-sizes 32 256
  --devices 2 --device-batch 256 --act-histories 1000 --repeats 3`, pure JAX ->
  kernel: B = 32 on one device 1.80 -> 1.07 s, B = 256 on two devices 11.03 -> 7.25 s
  (7.62 s on one), action sampling for 1,000 histories 3.13 -> 1.93 s, peak RSS
  1.5-1.8 GB. On one core (640 heads of 60 x 60, width 4): forward 3.53 -> 1.76 ms,
  forward and gradient 8.7 -> 5.0 ms; variable axis (3,840 heads of 10 x 10): 2.0 ->
  0.87 ms and 5.2 -> 2.65 ms. A one-core kernel profile of the step (B = 32) went from
  2.47 to 1.72 s; the custom calls are now 37% of the kernel time, the rest is the
  networks' dense layers, layer norms and the optimiser. With no intermediates to
  keep in cache, larger micro-batches might have paid; they did not (B = 64, one
  device, `--microbatch N`, one run each, 2026-12-03): 2 histories 2.09 s, 4 1.91 /
  1.92 / 1.97 s, 8 2.07 s, 16 2.17 s, so the CPU default stays 4.
- **Memory traffic of the sample-axis attention, not arithmetic.** Its logits are
  B x d x 8 heads x 60 x 60 floats (295 MB at B = 256). Over a whole batch every
  elementwise pass (mask, max, exp, sum, divide, dropout and their gradients) streams
  that through DRAM. Unchunked, the step took 14.5 s with 6.3 GB of XLA temporaries
  at B = 64, and XLA's memory analysis asked for 25 GB at B = 256, more than the VM
  has. Micro-batching (4 histories at a time on CPU, gradients accumulated in a
  `lax.scan`) keeps the working set in cache.
- **Tiny heads.** Width 32 over 8 heads leaves 4-wide heads: each attention product is
  a 60x4 by 4x60 matmul, far too small for the matmul units. A heads-first layout
  ([..., H, S, C]) made both products plain batched matmuls (one measurement: 18.3 s
  -> 16.0 s per step; not kept as a benchmark).
- **Policy dropout** (0.1 on attention weights and residuals, as in the paper). With
  `nn.Dropout` the policy encoder's forward pass on 4 histories took 58-66 ms against
  13-15 ms without dropout: threefry bits for ~1.5M attention weights per history, which
  XLA's CPU backend does not fuse (16-bit draws and the RBG generator were no faster).
  `caasl_jax/dropout.py` now hashes each entry's index with murmur3's finaliser instead:
  15 ms forward and 89 ms gradient (was 126 ms), close to no dropout at all
  (`encoder_profile` at 8bcd26b vs 71e438a). In the whole step at B = 64 that was worth
  about 10% (3.81-4.04 s -> 3.44-3.53 s, two runs each of
  `python -m benchmarks.grad_step --batch-sizes 64 --devices 1` at the same commits): the encoder-level figures do not add
  up linearly, XLA overlaps more of the larger program on the two cores.
- **Softmax normalisation.** Dividing the [..., 60, 60] weights by their row sums
  materialised a broadcast of the sums as big as the logits, forward and backward
  (~2 ms per sample-axis block per 4 histories in one `jax.profiler` trace of the
  encoder gradient; ad-hoc script, not kept). The division
  now comes after the value product, on [..., 60, 4] (flash-attention style; dropout of
  the weights commutes with it, tests/test_networks.py checks both against plain
  attention): the critic encoder's gradient ("encoder_critic" of `encoder_profile`,
  42357f9 vs b95123d) 77-80 -> 71-72 ms in three runs each; the whole step at B = 64
  (`grad_step` as above) moved within the VM's noise (3.46-3.85 s vs 3.91 s).
- **Constant buffers.** XLA's CPU backend hands scalar constants to its XNNPACK
  fusions as materialised broadcasts. Policy dropout written as
  `where(keep, x / (1 - rate), 0)` made an all-zeros [4, 10, 8, 60, 60] buffer per
  sample-axis block that took 2.1-2.3 ms to write (two runs of
  `python -m benchmarks.encoder_profile --kernels 12`, the gradient of one policy
  sample-axis block); as a multiply by (keep ? 1 / (1 - rate) : 0) it is gone and the
  policy encoder's gradient went from 105-115 ms to 93 ms per 4 histories, what it costs
  without dropout (2026-11-29). In that block's gradient the largest kernels are now the
  two backward attention products (1.4 and 0.9 ms: 320 batched 60x60 by 60x4 products,
  ~8 GFLOP/s; see the next item) and the fused logits / softmax passes (0.6-0.9 ms
  each). Two full reruns of `grad_step` right after it (2026-11-29 07:53-08:12 UTC, a
  slow spell of this VM) gave 14.2 and 15.7 s at B = 256 on one device and 11.7 and
  15.2 s on two, inside the VM's run-to-run spread. Writing the variable-axis
  attention products (10 x 10 x 4) as broadcast-multiply-sums instead of batched dots
  made that block's gradient slower (7.1 -> 10.6 ms; not kept).
- **Backward attention products.** Autodiff writes the gradient of `q @ k^T` and
  `w @ v` with products that contract the leading axis of the left operand
  (dk = dlogits^T q, dv = w^T g). XLA's CPU backend cannot give those to its YNNPACK
  batched matmul and runs them in its generic dot emitter: 2.8-3.4 ms against 0.3 ms
  for the same 640 products of 60x60 by 60x4 written as [4, 60] @ [60, 60] (one core,
  ad-hoc script, 2026-11-29). A kernel profile of the whole step on one core
  (`python -m benchmarks.step_profile`, B = 32) put those products at ~11% of it.
  `networks.softmax_attention` now carries a hand-written gradient (`jax.custom_vjp`)
  whose products all have the [..., M, K] @ [..., K, N] form, with the transposes
  materialised behind optimisation barriers (without them XLA folds the transposes
  back into the products and the slow form returns). One core, B = 32: 2.40 -> 2.29 s.
  Paper step, B = 256, one run each in the same session: 12.02 -> 9.75 s on 2 fake
  devices, 14.13 -> 14.01 s on one (there XLA was already overlapping the slow
  products with other work on the second core). The AVICI reward model could use the same
  function (its training gradient, shipped size, 32 histories, one core: 504-523 ->
  448-491 ms in three runs each) but does not yet: the small default's training run
  is sensitive to any change of rounding in its reward (see the README), and that
  change sent it to a final evaluation level with random designs. Tried and not kept: writing the
  products with K <= 16 as sums of outer products (one core, B = 32: 2.29 -> 2.91 s).
- **Page faults in stand-alone profiles.** XLA allocates a program's temporaries for
  every call, so a jitted function called once per measurement touches fresh pages each
  time: the 4-history encoder gradient of `encoder_profile` takes ~29,600 minor page
  faults (121 MB) per call, which inflates its gradient figures above (89-93 ms
  against a 15 ms forward pass). Inside the REDQ step the micro-batch loop reuses one
  allocation: ~67,000-71,000 faults per step whatever the batch size, 0.15-0.3 s of
  system time (about 2% at B = 256); glibc's transparent huge pages
  (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) remove the faults but did not change the
  step's time (B = 64, two runs each). The remaining cost of the step is mostly the
  forward attention passes (logits, exp, value product: ~1.1-1.4 ms per 640 sample-axis
  heads on one core, bound by the exponentials; at B = 32 the critics alone run 128 of each per step: target
  critics, the critic loss and the policy loss, each over 8 micro-batches and 4 layers,
  and XLA recomputes some of them inside its fusions). Tried and not kept: getting the
  row sums of the critics' (dropout-free) attention from the value product, as a
  column of ones appended to the values, to save the separate reduction over the
  exponentials (one core, B = 32, two alternating runs each: 2.294 / 2.381 s before,
  2.290 / 2.401 s after, i.e. no change).
- **XLA's CPU compiler options** (2026-12-01, a 2-core Intel Xeon VM with AVX-512 and
  AMX; the step at B = 32 on one device, median of 5 calls, a fresh process per
  option, baseline 1.91-2.46 s over 9 runs; `XLA_FLAGS=... python -m benchmarks.grad_step
  --batch-sizes 32 --devices 1 --repeats 5` measures one): one run each of
  `--xla_cpu_prefer_vector_width=512` 2.45 s, `--xla_cpu_enable_fast_math=true` 2.69 s,
  `--xla_cpu_use_onednn=true` 2.62 s (with `--xla_cpu_experimental_onednn_fusion_type`
  added it failed to compile: "partition compile failed");
  `--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY`
  2.03-2.33 s in three runs; YNNPACK element-wise and reduction fusions
  (`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce`) 2.45 s in one run and
  1.79-1.93 s against 1.91-2.02 s in three alternating pairs with the baseline;
  `--xla_cpu_experimental_xnn_fusion_type` left the step bit-identical (no effect in
  jax 0.10.2). None is faster beyond the VM's noise, so none is set. Also tried: both
  attention products of one block as broadcast-multiply-sums in a feature-major
  layout ([..., C, S], reductions over non-minor axes so that XLA vectorises over the
  sequence): the forward pass no faster
  than the batched dots (per micro-batch of 4 histories, one core: samples 4.3 ms with
  dots vs 5.1 ms, variables 2.9 vs 2.9 ms) and its gradient 3-10x slower (samples
  14.5 -> 157 ms, variables 9.3 -> 29.4 ms; ad-hoc script, not kept).
- **Two cores.** XLA's CPU runtime used about 1.5 of the 2 cores on these small ops
  (process CPU time / wall time); splitting the batch over 2 fake devices lets each
  core run its own stream (table above). Tried and not kept (2026-12-02, a 2-core AMD
  EPYC VM): the same inside one device, as two independent micro-batch scans for XLA to
  run side by side (B = 64, `grad_step`, two alternating runs: 4.85 / 3.78 s against
  4.31 / 3.56 s without; compile 33-35 s against 22-25 s).
- **Keys-major attention** (tried and not kept, 2026-12-02, the AMD VM). Written as
  v^T @ w^T ([4, T] @ [T, S]) rather than w @ v ([S, T] @ [T, 4]), the value product
  ran 2.3x faster in isolation (640 products of 60 x 60 by 60 x 4 on one core: 0.42
  against 0.95 ms), so attention was rewritten with its weights stored [T, S] (softmax
  over axis -2, hand-written gradient as above). In the step the value-product kernel
  took as long as before (~1.8 ms per critic block of 4 histories in
  `benchmarks.step_profile`): XLA fuses the exponentials into that YNNPACK kernel, and
  they, not the product's shape, set its time; the policy's dropout mask also needed a
  transposed copy. One core, B = 32, two alternating profiles: 2.53 / 2.94 s against
  3.37 / 2.52 s; B = 64 on both cores (`grad_step`, three alternating pairs): 3.45 /
  3.80 / 3.75 s against 3.97 / 3.88 / 3.84 s (2-13%, mean 6%). Not kept: a gain of that
  size is within this VM's run-to-run spread, and the change moves the rounding of
  every network, so the committed training figures would have to be measured again."""


def measured_between(stamps: list[str]) -> str:
    """'between <first> and <last> UTC' of ISO times (one time if they agree to the minute)."""
    times = [datetime.datetime.fromisoformat(t) for t in stamps]
    first, last = (
        t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M")
        for t in (min(times), max(times))
    )
    return f"{first} UTC" if first == last else f"between {first} and {last} UTC"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--from-json", action="store_true", help="re-render saved results only")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="re-measure only these")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    problem = file_path_problem(args.out)
    if problem:  # before the measurements, which take up to half an hour
        parser.error(f"--out {args.out} {problem}")
    if not args.from_json:
        for name in args.only or BENCHMARKS:
            run_benchmark(name)
    results = load_results()
    draw_plots(results, PLOTS_DIR)
    stamps = load_stamps()
    missing = [n for n in BENCHMARKS if n not in stamps]
    if missing:
        raise FileNotFoundError(f"{STAMPS_FILE} has no measurement time for {missing}")
    stamp = measured_between([stamps[n] for n in BENCHMARKS])
    Path(args.out).write_text(render(results, stamp) + "\n")
    print(f"[report] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
