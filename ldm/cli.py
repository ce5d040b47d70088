"""The `ldm` console script: `ldm sample | ...`.

Each sub-command is a pair of small functions: `add_<name>_parser(subparsers)` declares its arguments and
`<name>(args) -> int` runs it. torch and diffusers are imported inside the sub-command functions, so `ldm --help`
answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# The keys of `ldm.schedulers.SCHEDULERS`, spelled out here because importing that module pulls in diffusers and
# `--help` must stay fast; tests/test_cli_sample.py checks that the two agree.
SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++", "unipc", "euler")


class CLIError(Exception):
    """A user error: `main` prints the message (no traceback) and exits with status 2."""


# ----- ldm sample -----


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
    from ldm.pipeline import LatentDiffusionPipeline
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


# ----- the training scripts -----


def run_training(stage: str, argv: Sequence[str] | None = None) -> int:
    """Body of train_vae.py / train_unet.py: config from the command line, then train `stage` ("vae" or "unet").

    Mistakes in the config, the data or the paths end with a one-line message and status 2, before training.
    """
    import yaml

    from ldm.config import ConfigError, config_from_argv, to_dict

    try:
        cfg, dry_run = config_from_argv(list(sys.argv[1:] if argv is None else argv), stage=stage)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from ldm.data import DataError
    from ldm.lpips import LPIPSWeightsError

    try:
        if stage == "vae":
            from ldm.vae_trainer import train_vae

            train_vae(cfg)
        else:
            from ldm.unet_trainer import train_unet

            train_unet(cfg)
    except (ConfigError, DataError, LPIPSWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----- entry point -----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion with Hugging Face diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_sample_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
