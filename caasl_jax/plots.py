"""Plots of training runs and evaluations (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_training_curves(metrics_path, evals_path, out_path) -> Path:
    """Training return, losses and held-out evaluation (policy vs random) per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = _read_jsonl(metrics_path), _read_jsonl(evals_path)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    it = [r["iteration"] for r in rows]
    axes[0].plot(it, [r["return_mean"] for r in rows], lw=1, label="training episodes")
    if evals:
        eit = [e["iteration"] for e in evals]
        for key, label, color in [
            ("eval_return", "CAASL (held-out)", "C3"),
            ("eval_random_return", "random designs", "C7"),
        ]:
            mean = [e[key] for e in evals]
            se = [e[key + "_se"] for e in evals]
            axes[0].errorbar(
                eit, mean, yerr=se, color=color, marker="o", ms=3, capsize=2, label=label
            )
    axes[0].set(xlabel="iteration", ylabel="return  R(h_T) - R(h_0)", title="returns")
    axes[0].legend(fontsize=8)
    for ax, keys, title in [
        (axes[1], ["critic_loss"], "critic loss"),
        (axes[2], ["alpha", "entropy"], "temperature / entropy"),
    ]:
        for key in keys:
            pts = [(r["iteration"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if pts:
                ax.plot(*zip(*pts), lw=1, label=key)
        ax.set(xlabel="iteration", title=title)
        ax.legend(fontsize=8)
    axes[1].set_yscale("symlog")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
