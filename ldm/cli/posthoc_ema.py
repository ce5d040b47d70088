"""`ldm ema-reconstruct` and `ldm ema-sweep`: the EMA of a chosen width from the snapshots of a run trained with
denoiser.train.ema_posthoc (ldm.train.posthoc_ema), written as a pipeline folder; or several widths scored as
`ldm eval` scores a pipeline, and the best one written.

The folder written is a copy of the run's pipeline (--model) whose denoiser weights (and, for a text model trained
with its encoder, the text encoder's) are the reconstructed ones, with a note in its README.md and the
reconstruction's inputs in posthoc_ema.json. Same pattern as ldm/cli/__init__.py: heavy imports inside the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ldm.cli.common import SCHEDULER_NAMES, TIMESTEP_SPACINGS, CLIError, check_exists, set_sampler
from ldm.cli.evaluate import _add_eval_common, _eval_setup, _float_list

RECORD = "posthoc_ema.json"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    add_reconstruct_parser(subparsers)
    add_ema_sweep_parser(subparsers)


def _add_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshots", metavar="DIR", help="the run's snapshot folder (default: unet/posthoc_ema beside "
                   "--model, i.e. <output_dir>/unet/posthoc_ema for <output_dir>/pipeline)")
    p.add_argument("--step", type=int, default=None, help="reconstruct the EMA at this snapshot's step (default: the "
                   "latest, the end of training)")
    p.add_argument("--out", required=True, metavar="DIR", help="pipeline folder to write (may be --model itself: it "
                   "is replaced whole once the new one is complete)")


def add_reconstruct_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ema-reconstruct", help="write a pipeline whose EMA has the width you choose, from post-hoc EMA snapshots",
        description="Reconstruct the power-function EMA of relative width --sigma_rel (EDM2's post-hoc EMA: the std "
        "of the averaging profile over the run divided by its length; 0.05-0.10 are typical, larger averages more) "
        "from the snapshots of a run trained with denoiser.train.ema_posthoc=true, by least squares between the "
        "snapshots' averaging profiles, and write it as a pipeline folder: a copy of --model with those weights.")
    p.add_argument("--model", required=True, help="the run's pipeline folder (<output_dir>/pipeline)")
    p.add_argument("--sigma_rel", type=float, required=True, help="relative width of the EMA, in (0, 0.289)")
    _add_snapshot_arguments(p)
    p.set_defaults(func=ema_reconstruct)


def ema_reconstruct(args: argparse.Namespace) -> int:
    """`ldm ema-reconstruct`: solve, combine the snapshots, write the folder."""
    snapshots = _snapshot_dir(args)
    weights, step, used = _reconstruct(snapshots, [args.sigma_rel], args.step)
    write_pipeline(args.model, args.out, weights[args.sigma_rel], _record(args.sigma_rel, step, used))
    print(f"EMA of width σ_rel {args.sigma_rel:g} at step {step}, from {len(used)} snapshots of {snapshots}, "
          f"written to {args.out}")
    return 0


def add_ema_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ema-sweep", help="score the EMA of several widths (post-hoc EMA) with `ldm eval` and write the best",
        description="For each width of --sigma_rels, reconstruct the EMA from the post-hoc EMA snapshots (as `ldm "
        "ema-reconstruct`) and score its samples as `ldm eval` does (same seeds for all, and for --model's own "
        "weights, the EMA of train.ema_decay, as the baseline); print the table, write OUT_DIR/ema_sweep.csv and "
        "ema_sweep.png (the metric against the width), and write the best width as the pipeline --out.")
    _add_eval_common(p)
    p.add_argument("--sigma_rels", type=_float_list, default=[0.025, 0.05, 0.075, 0.1, 0.15, 0.2], metavar="LIST",
                   help="comma-separated relative widths (default: 0.025,0.05,0.075,0.1,0.15,0.2)")
    p.add_argument("--metric", choices=("fid", "kid", "is", "pr"), default="fid", help="what picks the best width "
                   "(pr: precision)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling algorithm (default: ddim, flow-euler for flow-matching models)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="which training timesteps the steps visit (default: the pipeline's own)")
    p.add_argument("--out_dir", default="ema_sweep", help="folder for ema_sweep.csv and ema_sweep.png")
    _add_snapshot_arguments(p)
    p.set_defaults(func=ema_sweep)


def ema_sweep(args: argparse.Namespace) -> int:
    """`ldm ema-sweep`: --model's own weights, then each width, through `evaluate_pipeline`; the table; the best
    width written."""
    from ldm.eval.evaluation import HIGHER_IS_BETTER, evaluate_pipeline, headline_key

    snapshots = _snapshot_dir(args)
    _reconstruct(snapshots, args.sigma_rels, args.step, check_only=True)  # bad widths or step: before any sampling
    state, network, pipe, real, (plan,) = _eval_setup(args)
    sampler = set_sampler(pipe, args.scheduler, args.timestep_spacing)
    key, sign = headline_key(network, args.metric), -1 if HIGHER_IS_BETTER[args.metric] else 1
    rows, best = [], None
    for sigma_rel in [None, *args.sigma_rels]:  # None: --model's own weights (the EMA of train.ema_decay)
        if sigma_rel is not None:
            weights, step, used = _reconstruct(snapshots, [sigma_rel], args.step)
            load_into(pipe, weights[sigma_rel])
        result = evaluate_pipeline(pipe, network, real, args.num_samples, args.steps, args.batch_size, args.seed,
                                   names=(args.metric,), plan=plan)
        value = result["metrics"][key]
        rows.append({"sigma_rel": "saved" if sigma_rel is None else sigma_rel, "metric": key, "value": value,
                     "sampler": sampler, "steps": args.steps, "num_samples": args.num_samples,
                     "feature_network": network.name})
        state.print(f"{'saved EMA' if sigma_rel is None else f'σ_rel {sigma_rel:g}':>12}: {key} = {value:.4g}")
        if sigma_rel is not None and (best is None or sign * value < sign * best[0]):
            best = (value, weights[sigma_rel], {**_record(sigma_rel, step, used), "metric": key, "value": value})
    if state.is_main_process:
        _write_table(rows, args.out_dir)
        value, weights, record = best
        write_pipeline(args.model, args.out, weights, record)
        print(f"best: σ_rel {record['sigma_rel']:g} ({key} {value:.4g}; --model's own weights {rows[0]['value']:.4g}), "
              f"written to {args.out}")
    state.wait_for_everyone()
    return 0


def _snapshot_dir(args: argparse.Namespace) -> Path:
    check_exists("--model", args.model, "model_index.json")
    if args.snapshots is not None:
        check_exists("--snapshots", args.snapshots)
        return Path(args.snapshots)
    from ldm.train.posthoc_ema import SNAPSHOT_DIR

    path = Path(args.model).resolve().parent / "unet" / SNAPSHOT_DIR
    if not path.is_dir():
        raise CLIError(f"no snapshot folder {path} beside --model: train with denoiser.train.ema_posthoc=true, or "
                       "give --snapshots")
    return path


def _reconstruct(snapshots: Path, sigma_rels: list[float], step: int | None, check_only: bool = False):
    """ldm.train.posthoc_ema.reconstruct (check_only: only check the widths and the step), errors as CLIErrors."""
    from ldm.train.posthoc_ema import check_request, reconstruct

    try:
        return check_request(snapshots, sigma_rels, step) if check_only else reconstruct(snapshots, sigma_rels, step)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e


def _record(sigma_rel: float, step: int, used) -> dict:
    return {"sigma_rel": sigma_rel, "step": step,
            "snapshots": [{"step": s.step, "sigma_rel": s.sigma_rel, "file": s.path.name} for s in used]}


def by_component(weights: dict, components: list[str], denoiser: str) -> dict[str, dict]:
    """The reconstructed weights per pipeline component: all the denoiser's, or, for a model trained as several
    components (a text UNet with its encoder: `unet.*`, `text_encoder.*`), split by their first name."""
    heads = {name.split(".", 1)[0] for name in weights}
    if not heads <= set(components):
        return {denoiser: weights}
    return {head: {name.split(".", 1)[1]: t for name, t in weights.items() if name.split(".", 1)[0] == head}
            for head in heads}


def load_into(pipe, weights: dict) -> None:
    """Copy reconstructed weights into a loaded pipeline's modules (every parameter, nothing else)."""
    import torch

    components = [name for name in pipe.components if isinstance(getattr(pipe, name), torch.nn.Module)]
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    for component, params in by_component(weights, components, denoiser).items():
        named = dict(getattr(pipe, component).named_parameters())
        if set(named) != set(params):
            raise CLIError(f"the snapshots do not fit the pipeline's {component} (parameters differ, e.g. "
                           f"{sorted(set(named) ^ set(params))[:3]}): they belong to another model")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(params[name])


def write_pipeline(model: str, out: str, weights: dict, record: dict) -> None:
    """A copy of the pipeline folder `model` at `out` with `weights` in its safetensors files, written atomically."""
    from ldm.pipelines.loading import denoiser_folder
    from ldm.train.checkpoint import written_atomically

    components = [p.name for p in Path(model).iterdir() if (p / "config.json").is_file()]
    parts = by_component(weights, components, denoiser_folder(model))
    with written_atomically(Path(out)) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
        (tmp / RECORD).unlink(missing_ok=True)
        for component, params in parts.items():
            _replace_weights(tmp / component, params)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        readme = tmp / "README.md"
        if readme.is_file():
            readme.write_text(readme.read_text() + _card_note(record))


def _replace_weights(folder: Path, params: dict) -> None:
    """Put `params` into the safetensors files of `folder` where their keys are, keeping dtype, metadata and the
    tensors they do not name (buffers)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    left = set(params)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata, keys = f.metadata(), set(f.keys())
        if not keys & left:
            continue
        tensors = load_file(str(file))
        for name in keys & left:
            if tensors[name].shape != params[name].shape:
                raise CLIError(f"{file}: {name} has shape {tuple(tensors[name].shape)}, the snapshots "
                               f"{tuple(params[name].shape)}: they belong to another model")
            tensors[name] = params[name].to(tensors[name].dtype).contiguous()
        new = file.with_name(file.name + ".new")
        save_file(tensors, str(new), metadata=metadata)
        os.replace(new, file)
        left -= keys
    if left:
        raise CLIError(f"{folder} has no weights named {sorted(left)[:3]}: the snapshots belong to another model")


def _card_note(record: dict) -> str:
    return (f"\n## Post-hoc EMA\n\nThe weights in this folder are the power-function EMA of relative width "
            f"σ_rel = {record['sigma_rel']:g} at step {record['step']}, reconstructed from "
            f"{len(record['snapshots'])} snapshots with `ldm ema-reconstruct` / `ldm ema-sweep` (EDM2's post-hoc "
            f"EMA, `{RECORD}`), not the EMA of the training table above; samples.png shows that one.\n")


def _write_table(rows: list[dict], out_dir: str) -> None:
    """ema_sweep.csv and ema_sweep.png (the metric against the width; --model's own EMA as a dashed line)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, "ema_sweep.csv"), os.path.join(out_dir, "ema_sweep.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    widths = [r for r in rows if r["sigma_rel"] != "saved"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4), constrained_layout=True)
    ax.plot([r["sigma_rel"] for r in widths], [r["value"] for r in widths], "o-", label="post-hoc EMA")
    ax.axhline(rows[0]["value"], color="gray", linestyle="--", label="saved EMA (train.ema_decay)")
    ax.set_xlabel("EMA width σ_rel")
    ax.set_ylabel(rows[0]["metric"])
    ax.legend()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    print("\n".join(f"{r['sigma_rel']!s:>8}  {r['metric']} {r['value']:.4g}" for r in rows))
    print(f"wrote {csv_path} and {png_path}")
