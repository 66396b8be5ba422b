"""The README's results table, made from the committed experiment results.

    python experiments/results_table.py            # print the table
    python experiments/results_table.py --readme   # also rewrite it in README.md

Rows: every environment of figures 3, 4 and 6 (and the dimension sweeps when run);
cells: the final return R(h_T) - R(h_0) after T = 10 acquisitions, mean ± s.e. over
the 100 held-out environments (figures run on fewer are labelled "(N envs)"). The
bold cell is the best design of the row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caasl_jax.cli import DefaultsHelpFormatter

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
FIGURES = (
    "fig3_linear",
    "fig3_linear_likelihood",
    "fig4_linear_ood",
    "fig4_linear_ood_likelihood",
    "fig5_linear_dims",
    "fig6_sergio",
    "fig8_sergio_dims",
)
DESIGNS = ("caasl", "random", "random-single", "observational", "diffcbed", "ss-finite")
HEADERS = {
    "caasl": "CAASL",
    "random": "random",
    "random-single": "random single",
    "observational": "observational",
    "diffcbed": "DiffCBED",
    "ss-finite": "SS Finite",
}
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def load_results(results_dir: Path = HERE / "results") -> tuple[dict[str, dict], dict[str, int]]:
    """({figure: results}, {figure: held-out environments}) of every figure whose
    results.json exists."""
    found, n_envs = {}, {}
    for figure in FIGURES:
        path = results_dir / figure / "results.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            found[figure] = stored["results"]
            n_envs[figure] = stored["meta"]["n_envs"]
    return found, n_envs


#: the paper's number of held-out environments; figures run on fewer are marked
PAPER_N_ENVS = 100


def figure_label(figure: str, n_envs: int = PAPER_N_ENVS) -> str:
    """'fig3_linear' -> 'fig3', 'fig3_linear_likelihood' -> 'fig3 + likelihood'; a run
    on fewer environments than the paper's is marked."""
    label = figure.split("_")[0] + (" + likelihood" if figure.endswith("_likelihood") else "")
    return label if n_envs == PAPER_N_ENVS else f"{label} ({n_envs} envs)"


def results_table(by_figure: dict[str, dict], n_envs: dict[str, int] | None = None) -> str:
    """Markdown: one row per (figure, env), one column per design present anywhere.
    n_envs: held-out environments per figure (default: the paper's 100)."""
    n_envs = n_envs or {}
    rows = [r for results in by_figure.values() for r in results.values()]
    present = [d for d in DESIGNS if any(d in r for r in rows)]
    lines = [
        "| figure | environment | " + " | ".join(HEADERS[d] for d in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for figure, results in by_figure.items():
        for env, by_design in results.items():
            finals = {
                d: (s["return"]["mean"][-1], s["return"]["stderr"][-1])
                for d, s in by_design.items()
            }
            best = max(finals, key=lambda d: finals[d][0])
            cells = []
            for design in present:
                if design not in finals:
                    cells.append("—")
                    continue
                mean, se = finals[design]
                cell = f"{mean:.2f} ± {se:.2f}"
                cells.append(f"**{cell}**" if design == best else cell)
            label = figure_label(figure, n_envs.get(figure, PAPER_N_ENVS))
            lines.append(f"| {label} | {env} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_in_readme(table: str, readme: Path = README) -> None:
    """Put `table` between the results-table markers of the README."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    table = results_table(*load_results())
    print(table)
    if args.readme:
        replace_in_readme(table)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
