"""Sampler and guidance sweeps: one metric for every (scheduler, timestep spacing, steps[, guidance scale]), as a
CSV and a plot.

The real features are extracted (or read from the cache) once; every run draws the same seeds (and, for conditional
models, the same classes or prompts), so the curves differ only by the sampling algorithm, its step count and the
guidance scale. A guidance sweep plots the metric and the accuracy on the requested class against the guidance
scale: the quality/fidelity trade-off of classifier-free guidance (Ho & Salimans 2022, Fig. 4).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ldm.eval.evaluation import evaluate_pipeline, headline_key

CSV_FIELDS = ("scheduler", "timestep_spacing", "steps", "num_samples", "seconds_per_image", "metric", "value",
              "feature_network")
GUIDANCE_FIELDS = ("guidance_scale", "accuracy")  # conditional models: inserted before "feature_network"


def run_sweep(pipe, network, real: dict, schedulers: list[str], steps: list[int], num_samples: int,
              batch_size: int, metric: str = "fid", seed: int = 0, log=print, plans=None,
              timestep_spacings: list[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate `metric` ("fid", "kid", "is" or "pr" -> precision) for each scheduler x timestep spacing x steps x
    plan (the sample plans of `ldm.eval.conditional`, one per guidance scale; None: unconditional); one row each.
    `timestep_spacings=None` keeps each scheduler's spacing as `from_config` gives it (flow samplers have none)."""
    from ldm.schedulers import make_scheduler, timestep_spacing_of

    original = pipe.scheduler
    base_config = original.config  # the training noise schedule; only the algorithm (and spacing) changes
    key = headline_key(network, metric)
    rows = []
    for name in schedulers:
        for spacing in timestep_spacings or [None]:
            pipe.scheduler = make_scheduler(name, base_config, spacing)
            for n in steps:
                for plan in plans or [None]:
                    result = evaluate_pipeline(pipe, network, real, num_samples, n, batch_size, seed,
                                               names=(metric,), plan=plan)
                    rows.append(_row(name, timestep_spacing_of(pipe.scheduler.config), n, num_samples, key, network,
                                     result, plan))
                    log(_describe(rows[-1]))
    pipe.scheduler = original
    return rows


def _row(name: str, spacing: str, n: int, num_samples: int, key: str, network, result: dict,
         plan) -> dict[str, Any]:
    row = {"scheduler": name, "timestep_spacing": spacing, "steps": n, "num_samples": num_samples,
           "seconds_per_image": result["seconds_per_image"], "metric": key, "value": result["metrics"][key],
           "feature_network": network.name}
    if plan is not None and plan.kind != "none":
        row.update(guidance_scale=plan.guidance_scale, accuracy=result["metrics"].get("accuracy"))
    return row


def _describe(row: dict[str, Any]) -> str:
    text = f"{row['scheduler']:>8} {row['timestep_spacing']:>8} {row['steps']:>4} steps"
    if "guidance_scale" in row:
        text += f", guidance {row['guidance_scale']:g}"
    text += f": {row['metric']} = {row['value']:.4g}"
    if row.get("accuracy") is not None:
        text += f", accuracy {100 * row['accuracy']:.1f}%"
    return text + f"  ({row['seconds_per_image']:.4f} s/image)"


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = CSV_FIELDS
    if any("guidance_scale" in r for r in rows):
        fields = CSV_FIELDS[:-1] + GUIDANCE_FIELDS + CSV_FIELDS[-1:]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(*paths: str | Path) -> list[dict[str, Any]]:
    """The rows of one or more sweep.csv files (e.g. sweeps run in parts), typed as `run_sweep` returns them."""
    rows = []
    for path in paths:
        with Path(path).open(newline="") as f:
            for row in csv.DictReader(f):
                row.update(steps=int(row["steps"]), num_samples=int(row["num_samples"]),
                           seconds_per_image=float(row["seconds_per_image"]), value=float(row["value"]))
                if "guidance_scale" in row:  # a guidance sweep; accuracy is empty where the class is unknown
                    row.update(guidance_scale=float(row["guidance_scale"]),
                               accuracy=float(row["accuracy"]) if row["accuracy"] else None)
                rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Metric against steps, one panel per timestep spacing, and against seconds per image (all spacings; line
    style = spacing), one colour per scheduler; log axes, as the metric spans orders of magnitude over steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["scheduler"] for r in rows))
    spacings = list(dict.fromkeys(r["timestep_spacing"] for r in rows))
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(spacings) + 1, figsize=(3.6 * (len(spacings) + 1), 3.6), sharey=True,
                             constrained_layout=True)
    styles = ["-", "--", ":"]
    for name, spacing in dict.fromkeys((r["scheduler"], r["timestep_spacing"]) for r in rows):
        mine = sorted((r for r in rows if (r["scheduler"], r["timestep_spacing"]) == (name, spacing)),
                      key=lambda r: r["steps"])
        values = [r["value"] for r in mine]
        style = {"color": f"C{names.index(name)}", "marker": "o", "markersize": 3}
        axes[spacings.index(spacing)].plot([r["steps"] for r in mine], values, **style)
        axes[-1].plot([r["seconds_per_image"] for r in mine], values, **style,
                      linestyle=styles[spacings.index(spacing) % len(styles)])
    metric = rows[0]["metric"]
    steps = sorted({r["steps"] for r in rows})
    for ax, title in zip(axes, [f"timestep spacing: {s}" for s in spacings] + ["all, against time"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds per image" if ax is axes[-1] else "sampling steps")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)) if ax is axes[-1] else FixedLocator(steps))
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(metric)
    # One legend entry per scheduler, also for schedulers missing from the first panel.
    axes[0].legend([plt.Line2D([], [], color=f"C{i}", marker="o", markersize=3) for i in range(len(names))], names,
                   fontsize=7)
    if len(spacings) > 1:
        handles = [plt.Line2D([], [], color="gray", linestyle=styles[i % len(styles)]) for i in range(len(spacings))]
        axes[-1].legend(handles, spacings, fontsize=7)
    fig.suptitle(f"{metric} of {rows[0]['num_samples']} samples per point", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_guidance(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Two panels against the guidance scale: the metric, and the accuracy on the requested class (when known);
    one line per (scheduler, steps)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with_accuracy = any(r.get("accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(10 if with_accuracy else 5, 4),
                             constrained_layout=True, squeeze=False)
    several_spacings = len({r["timestep_spacing"] for r in rows}) > 1
    for scheduler, spacing, steps in dict.fromkeys((r["scheduler"], r["timestep_spacing"], r["steps"]) for r in rows):
        mine = sorted((r for r in rows if (r["scheduler"], r["timestep_spacing"], r["steps"]) == (scheduler, spacing,
                                                                                                 steps)),
                      key=lambda r: r["guidance_scale"])
        scales = [r["guidance_scale"] for r in mine]
        label = f"{scheduler}, {spacing}, {steps} steps" if several_spacings else f"{scheduler}, {steps} steps"
        axes[0, 0].plot(scales, [r["value"] for r in mine], marker="o", label=label)
        if with_accuracy:
            axes[0, 1].plot(scales, [100 * r["accuracy"] for r in mine], marker="o", label=label)
    ylabels = [rows[0]["metric"]] + (["accuracy on the requested class (%)"] if with_accuracy else [])
    for ax, ylabel in zip(axes[0], ylabels):
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"classifier-free guidance: {rows[0]['num_samples']} samples per point", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
