"""The README's results table, made from the committed experiment results.

    python experiments/results_table.py            # print the table
    python experiments/results_table.py --readme   # also rewrite it in README.md

Rows: every environment of figures 3, 4 and 6 (and the dimension sweeps when run);
cells: the final return R(h_T) - R(h_0) after T = 10 acquisitions, mean ± s.e. over
the 100 held-out environments. The bold cell is the best design of the row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def load_results(results_dir: Path = HERE / "results") -> dict[str, dict]:
    """{figure: results} of every figure whose results.json exists."""
    found = {}
    for figure in FIGURES:
        path = results_dir / figure / "results.json"
        if path.is_file():
            found[figure] = json.loads(path.read_text())["results"]
    return found


#: reruns with the slow likelihood baselines, on fewer held-out environments
FEW_ENVS = {"fig3_linear_likelihood": 5, "fig4_linear_ood_likelihood": 2}


def figure_label(figure: str) -> str:
    """'fig3_linear' -> 'fig3'; the few-environment likelihood reruns are marked as such."""
    label = figure.split("_")[0]
    return f"{label} ({FEW_ENVS[figure]} envs)" if figure in FEW_ENVS else label


def results_table(by_figure: dict[str, dict]) -> str:
    """Markdown: one row per (figure, env), one column per design present anywhere."""
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
            lines.append(f"| {figure_label(figure)} | {env} | " + " | ".join(cells) + " |")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    table = results_table(load_results())
    print(table)
    if args.readme:
        replace_in_readme(table)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
