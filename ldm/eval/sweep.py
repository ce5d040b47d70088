"""Sampler sweep: one metric for every (scheduler, steps) pair, as a CSV and a plot against steps and seconds/image.

The real features are extracted (or read from the cache) once; every run draws the same seeds, so the curves differ
only by the sampling algorithm and its step count.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ldm.eval.evaluation import evaluate_pipeline, headline_key

CSV_FIELDS = ("scheduler", "steps", "num_samples", "seconds_per_image", "metric", "value", "feature_network")


def run_sweep(pipe, network, real: dict, schedulers: list[str], steps: list[int], num_samples: int,
              batch_size: int, metric: str = "fid", seed: int = 0, log=print) -> list[dict[str, Any]]:
    """Evaluate `metric` ("fid", "kid", "is" or "pr" -> precision) for each scheduler x steps; one row per pair."""
    from ldm.schedulers import make_scheduler

    original = pipe.scheduler
    base_config = original.config  # the training noise schedule; only the algorithm changes
    key = headline_key(network, metric)
    rows = []
    for name in schedulers:
        pipe.scheduler = make_scheduler(name, base_config)
        for n in steps:
            result = evaluate_pipeline(pipe, network, real, num_samples, n, batch_size, seed, names=(metric,))
            row = {"scheduler": name, "steps": n, "num_samples": num_samples,
                   "seconds_per_image": result["seconds_per_image"], "metric": key,
                   "value": result["metrics"][key], "feature_network": network.name}
            log(f"{name:>6} {n:>4} steps: {key} = {row['value']:.4g}  ({row['seconds_per_image']:.4f} s/image)")
            rows.append(row)
    pipe.scheduler = original
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Two panels: metric vs. steps and metric vs. seconds per image (log x), one line per scheduler."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name in dict.fromkeys(r["scheduler"] for r in rows):
        mine = sorted((r for r in rows if r["scheduler"] == name), key=lambda r: r["steps"])
        values = [r["value"] for r in mine]
        axes[0].plot([r["steps"] for r in mine], values, marker="o", label=name)
        axes[1].plot([r["seconds_per_image"] for r in mine], values, marker="o", label=name)
    metric = rows[0]["metric"]
    for ax, xlabel in zip(axes, ("sampling steps", "seconds per image")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{metric} of {rows[0]['num_samples']} samples per point", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
