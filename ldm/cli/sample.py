"""`ldm sample`: generate images from a saved pipeline and write them as a grid."""

from __future__ import annotations

import argparse
import os

from ldm.cli.common import SCHEDULER_NAMES, CLIError


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images from a saved LatentDiffusionPipeline",
        description="Generate images from a saved LatentDiffusionPipeline and write them as a grid "
        "(and optionally one PNG per image). Image i is drawn with seed + i, so it does not depend on --batch_size.",
    )
    p.add_argument("--model", required=True, help="folder written by LatentDiffusionPipeline.save_pretrained")
    p.add_argument("--num_images", type=int, default=16, help="how many images to generate")
    p.add_argument("--steps", type=int, default=50, help="number of denoising steps")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="ddim", help="sampling algorithm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic); ignored by other schedulers")
    p.add_argument("--seed", type=int, default=0, help="image i uses torch.Generator().manual_seed(seed + i)")
    p.add_argument("--out", required=True, help="PNG file for the grid of all images")
    p.add_argument("--save_images", metavar="DIR", help="also write each image as DIR/00000.png, ...")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (memory only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=sample)


def _check_sample_args(args: argparse.Namespace) -> None:
    # Checked before the heavy imports, so mistakes are reported at once.
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        reason = "does not exist" if not os.path.exists(args.model) else "has no model_index.json"
        raise CLIError(f"--model {args.model!r} {reason}; expected a folder written by save_pretrained")
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")


def sample(args: argparse.Namespace) -> int:
    """`ldm sample`: load the pipeline, swap its scheduler, sample seeded images and write the grid."""
    _check_sample_args(args)
    import torch

    from ldm.images import image_grid
    from ldm.pipelines import LatentDiffusionPipeline
    from ldm.schedulers import make_scheduler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")

    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    except (OSError, ValueError, KeyError) as e:  # missing/corrupt weights or configs
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    # Same training noise schedule, different sampling algorithm.
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to(device)

    images = []
    for start in range(0, args.num_images, args.batch_size):
        seeds = range(args.seed + start, args.seed + min(start + args.batch_size, args.num_images))
        # One CPU generator per image: the same seed gives the same image on CPU and GPU, at any batch size.
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        images += pipe(
            batch_size=len(generator), generator=generator, num_inference_steps=args.steps, eta=args.eta
        ).images

    grid = image_grid(images)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(args.save_images, f"{i:05d}.png"))
    print(f"wrote {len(images)} images ({grid.height // images[0].height}x{grid.width // images[0].width} grid) "
          f"to {args.out}")
    return 0
