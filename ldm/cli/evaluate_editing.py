"""`ldm eval --task superres|inpaint|img2img`: the editing tasks measured on the held-out images of --data
(see `ldm.eval.editing`). Prints the tables; --out writes JSON (img2img also writes .csv and .png beside it);
--figure writes a PNG of the first --figure_rows images (inputs, masks, results side by side)."""

from __future__ import annotations

import argparse
import os

from ldm.cli.common import CLIError, check_exists, set_sampler

TASKS = ("generate", "img2img", "inpaint", "superres")


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, default="generate",
                   help="generate: sample from noise (default); img2img, inpaint, superres: edit the held-out images "
                   "of --data (--num_samples of them at most)")
    p.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="img2img: comma-separated strengths in [0, 1]")
    p.add_argument("--masks", default="centre,random", help="inpaint: comma-separated mask kinds: centre, random")
    p.add_argument("--jump_length", type=int, default=10, help="inpaint: RePaint jump length")
    p.add_argument("--jump_n_sample", type=int, default=1, help="inpaint: RePaint resampling count (1: none)")
    p.add_argument("--figure", metavar="FILE.png", help="editing tasks: a figure of the first images")
    p.add_argument("--figure_rows", type=int, default=8, help="rows of --figure")


def _parse_task_lists(args: argparse.Namespace) -> tuple[list[float], list[str]]:
    try:
        strengths = [float(v) for v in args.strengths.split(",") if v]
    except ValueError as e:
        raise CLIError(f"--strengths: expected comma-separated numbers, got {args.strengths!r}") from e
    if not strengths or not all(0 <= s <= 1 for s in strengths):
        raise CLIError(f"--strengths: every strength must be in [0, 1], got {args.strengths!r}")
    masks = [v for v in args.masks.split(",") if v]
    if not masks or any(m not in ("centre", "random") for m in masks):
        raise CLIError(f"--masks: choose from centre,random, got {args.masks!r}")
    return strengths, masks


def evaluate_task(args: argparse.Namespace) -> int:
    from ldm.cli.edit import check_model

    check_model("--model", args.model, "superres" if args.task == "superres" else "generate")
    check_exists("--data", args.data)
    strengths, mask_kinds = _parse_task_lists(args)
    if args.num_samples < 2:
        raise CLIError(f"--num_samples must be >= 2, got {args.num_samples}")
    import dataclasses

    import torch

    from ldm.config import ConfigError
    from ldm.data import DataError, build_datasets
    from ldm.eval import editing as E
    from ldm.eval.evaluation import load_data, resolve_data
    from ldm.eval.features import (
        FeatureNetworkUnavailable,
        cached_real_features,
        default_cache_dir,
        load_feature_network,
    )
    from ldm.pipelines import (
        LatentDiffusionPipeline,
        LatentImg2ImgPipeline,
        LatentInpaintPipeline,
        LatentSuperResolutionPipeline,
    )

    try:
        network = load_feature_network(args.features)
    except (FeatureNetworkUnavailable, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    cls = {"img2img": LatentImg2ImgPipeline, "inpaint": LatentInpaintPipeline,
           "superres": LatentSuperResolutionPipeline}[args.task]
    pipe = cls.from_pretrained(args.model)
    if getattr(pipe, "num_classes", None) is not None and args.task != "superres":
        raise CLIError("--task img2img/inpaint measure unconditional models; this one is class-conditional")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = set_sampler(pipe, args.scheduler, args.timestep_spacing)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    channels, size = pipe.vae.config.in_channels, pipe.vae.config.sample_size
    try:
        train, _, info = load_data(args.data, channels, size)
        data_cfg = resolve_data(args.data, channels, size)
        if args.task == "superres" and size // data_cfg.degrade.factor != pipe.config.low_res_size:
            raise ValueError(f"--data makes {size // data_cfg.degrade.factor}px low-res images (data.degrade.factor="
                             f"{data_cfg.degrade.factor}), the model takes {pipe.config.low_res_size}px")
        _, holdout, _ = build_datasets(dataclasses.replace(data_cfg, verify_images=False),
                                       low_res=args.task == "superres")
    except (ConfigError, DataError, ValueError) as e:
        raise CLIError(str(e)) from e
    if holdout is None:
        raise CLIError("the data has no held-out images; set data.holdout_fraction > 0")
    real = cached_real_features(network, train, info.fingerprint, "train", args.cache_dir or default_cache_dir(),
                                args.batch_size, device)
    images, low_res = E.holdout_tensors(holdout, args.num_samples)
    common = {"batch_size": args.batch_size, "seed": args.seed, "device": device}
    if args.task == "superres":
        result = E.evaluate_superres(pipe, network, real, images, low_res, args.steps, **common)
    elif args.task == "inpaint":
        generator_pipe = LatentDiffusionPipeline.from_pipe(pipe)
        result = E.evaluate_inpaint(pipe, generator_pipe, network, real, images, mask_kinds, args.steps, args.jump_length,
                                    args.jump_n_sample, **common)
    else:
        result = E.evaluate_img2img(pipe, network, real, images, strengths, args.steps, **common)
    _write(args, result, network, sampler)
    return 0


def _write(args: argparse.Namespace, result: dict, network, sampler: str) -> None:
    import json

    from ldm.eval import editing as E
    from ldm.eval.evaluation import write_json

    shown = result.pop("_images")
    result = {"model": args.model, "task": args.task, "sampler": sampler,
              "timestep_spacing": args.timestep_spacing or "saved", "steps": args.steps,
              "feature_network": network.name, **result}
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
        if args.task == "img2img":
            stem = os.path.splitext(args.out)[0]
            rows = [{"num_images": result["num_images"], **r} for r in result["rows"]]
            E.write_rows_csv(rows, stem + ".csv")
            E.plot_strength(rows, f"{network.metric_prefix}FID", stem + ".png")
            print(f"wrote {stem}.csv and {stem}.png")
    if args.figure:
        E.figure(shown, args.figure_rows, args.figure)
        print(f"wrote {args.figure} (columns: {', '.join(shown)})")
