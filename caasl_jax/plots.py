"""Plots of training runs and evaluations (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

from caasl_jax.jsonl import read_rows


def plot_training_curves(metrics_path, evals_path, out_path) -> Path:
    """Training return, losses and validation returns (policy vs random) per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = read_rows(metrics_path), read_rows(evals_path)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    it = [r["iteration"] for r in rows]
    axes[0].plot(it, [r["return_mean"] for r in rows], lw=1, label="training episodes")
    if evals:
        eit = [e["iteration"] for e in evals]
        for key, label, color in [
            ("eval_return", "CAASL (validation envs)", "C3"),
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


#: colours and order of designs in evaluation plots (CAASL first, as in the paper)
DESIGN_STYLE = {
    "caasl": ("CAASL", "C3"),
    "random": ("Random", "C0"),
    "random-single": ("Random (single target)", "C9"),
    "observational": ("Observational", "C7"),
    "diffcbed": ("DiffCBED", "C2"),
    "ss-finite": ("SS Finite", "C4"),
}
METRIC_LABELS = {
    "return": "return  R(h_t) - R(h_0)",
    "expected_correct": "expected correct entries",
    "expected_shd": "expected SHD",
    "shd": "SHD",
    "auprc": "AUPRC",
    "average_precision": "average precision",
    "auroc": "AUROC",
    "edge_f1": "edge F1",
}


def plot_stepwise(
    results: dict,
    out_path,
    metrics: tuple[str, ...] = ("return",),
    panel_titles: dict[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """Metric vs number of acquisitions, one panel per (env, metric), designs with ±1 s.e.

    results: {env: {design: {metric: {"mean": [T+1], "stderr": [T+1]}}}} as written by
    `caasl evaluate` / `evaluate_suite`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(env, metric) for env in results for metric in metrics]
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    # at least 7 inches wide so that the title and a one-row legend fit
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.4 * cols, 7.0), 3.0 * rows + 0.4), squeeze=False
    )
    for ax, (env, metric) in zip(axes.ravel(), panels):
        for design, summary in results[env].items():
            label, color = DESIGN_STYLE.get(design, (design, None))
            mean, se = summary[metric]["mean"], summary[metric]["stderr"]
            ax.errorbar(
                range(len(mean)), mean, yerr=se, label=label, color=color,
                marker="o", ms=2.5, lw=1.2, capsize=2,
            )  # fmt: skip
        name = (panel_titles or {}).get(env, env)
        ax.set_title(name if len(metrics) == 1 else f"{name}: {METRIC_LABELS.get(metric, metric)}",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("number of acquisitions")
        if len(metrics) == 1 or ax in axes[:, 0]:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
