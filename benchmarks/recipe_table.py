"""The recipe comparison of docs/recipes.md: sample FID against sampling steps for each {backbone} x {objective} cell
on each data set, as a markdown table and a figure (one panel per set, one curve per cell).

Each cell is a trained run whose `ldm sweep` wrote RUN_DIR/sweep*/sweep.csv (same seeds, same classifier, same step
counts in every cell of a set). The table has a row per cell and sampler, the best score of a set at each step count
in bold; where a cell was swept with several samplers, its curve in the figure is the one with the lowest mean log-FID
over the step counts (its best measured sampler), marked "(plotted)" in the table.

    python benchmarks/recipe_table.py --out docs/recipes.png \
        --cell digits:UNet+DDPM=runs/r19/digits/unet_ddpm --cell digits:DiT+flow=runs/r19/digits/dit_flow ...
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def by_sampler(rows: list[dict]) -> dict[str, list[dict]]:
    """A cell's sweep rows grouped by scheduler and timestep spacing (e.g. "ddim leading"), each sorted by steps."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["steps"]):
        groups.setdefault(f"{r['scheduler']} {r['timestep_spacing']}".strip(), []).append(r)
    return groups


def best_sampler(groups: dict[str, list[dict]]) -> str:
    """The sampler whose FIDs have the lowest mean logarithm over the step counts it was run at."""
    return min(groups, key=lambda name: sum(math.log(r["value"]) for r in groups[name]) / len(groups[name]))


def main() -> None:
    from ldm.eval.sweep import read_csv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", action="append", required=True, help="SET:LABEL=RUN_DIR, once per cell")
    p.add_argument("--out", required=True, help="the figure (.png)")
    args = p.parse_args()

    cells: dict[str, list[tuple[str, list[dict], str]]] = {}  # set -> (label, rows of its best sampler, sampler)
    every: dict[str, list[tuple[str, str, list[dict]]]] = {}  # set -> (label, sampler, rows), every sampler swept
    for spec in args.cell:
        name, run = spec.split("=", 1)
        data_set, label = name.split(":", 1)
        groups = by_sampler(read_csv(*sorted(Path(run).glob("sweep*/sweep.csv"))))  # parts: sweep/, sweep_heun/
        sampler = best_sampler(groups)
        cells.setdefault(data_set, []).append((label, groups[sampler], sampler))
        every.setdefault(data_set, []).extend((label, name_, rows) for name_, rows in groups.items())

    steps = sorted({r["steps"] for group in every.values() for _, _, rows in group for r in rows})
    print("| set | cell | sampler | " + " | ".join(f"FID @ {n}" for n in steps) + " | s/image @ "
          f"{steps[-1]} |")
    print("|---|---|---|" + "---|" * len(steps) + "---|")
    for data_set, group in every.items():
        best = {n: min((r["value"] for _, _, rows in group for r in rows if r["steps"] == n), default=None)
                for n in steps}
        chosen = {(label, sampler) for label, _, sampler in cells[data_set]}
        for label, sampler, rows in group:
            values = {r["steps"]: r["value"] for r in rows}
            text = [f"**{values[n]:.2f}**" if values.get(n) == best[n] else (f"{values[n]:.2f}" if n in values
                                                                                 else "") for n in steps]
            last = rows[-1]["seconds_per_image"] if rows else float("nan")
            mark = " (plotted)" if (label, sampler) in chosen and sum(lbl == label for lbl, _, _ in group) > 1 else ""
            print(f"| {data_set} | {label} | {sampler}{mark} | " + " | ".join(text) + f" | {last:.4f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(cells), figsize=(3.8 * len(cells), 4.6), constrained_layout=True, squeeze=False)
    styles = {"UNet": "-", "DiT": "--"}
    for ax, (data_set, group) in zip(axes[0], cells.items()):
        for label, rows, sampler in group:
            ax.plot([r["steps"] for r in rows], [r["value"] for r in rows], marker="o", markersize=3,
                    color="C0" if "DDPM" in label else "C3", linestyle=styles.get(label.split("+")[0], ":"),
                    label=f"{label} ({sampler})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(steps))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # FIDs span one to two decades
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(data_set)
        ax.set_xlabel("sampling steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: curves fill the panel
    metric = next(iter(cells.values()))[0][1][0]["metric"]  # one metric throughout: every cell was swept for FID
    axes[0][0].set_ylabel(f"{metric} (1,000 samples)")
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
