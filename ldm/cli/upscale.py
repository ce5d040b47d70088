"""`ldm upscale`: super-resolution of one low-resolution image or a folder of them with a `denoiser.task: superres`
model. Inputs are converted to the model's mode and must have its low-res size; image k uses seed + k."""

from __future__ import annotations

import argparse

from ldm.cli.common import image_files
from ldm.cli.edit import add_run_arguments, check_model, load_task_pipeline, output_paths, run_batches


def add_upscale_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upscale", help="super-resolve low-resolution images with a super-resolution model",
        description="Upscale low-resolution images (the model's low-res size, e.g. the 8x8 digits) with a model "
        "trained with denoiser.task=superres. A single --image writes the file --out; a folder writes "
        "--out/<name>.png.")
    p.add_argument("--model", required=True, help="a super-resolution folder written by training")
    p.add_argument("--image", required=True, help="a low-resolution image file or a folder of them")
    add_run_arguments(p, steps_help="number of denoising steps")
    p.set_defaults(func=upscale)


def upscale(args: argparse.Namespace) -> int:
    check_model("--model", args.model, "superres")
    from ldm.cli.common import CLIError

    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    files = image_files("--image", args.image)
    from ldm.pipelines import LatentSuperResolutionPipeline

    pipe = load_task_pipeline(LatentSuperResolutionPipeline, args)
    outs = output_paths(files, args.image, args.out)

    def call(pipe, batch, generators, start):
        return pipe(image=batch, generator=generators, num_inference_steps=args.steps).images

    run_batches(pipe, files, outs, args, call, "upscaling")
    print(f"wrote {len(outs)} image(s) to {args.out}")
    return 0
