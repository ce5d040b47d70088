"""The `ldm` console script: `ldm sample | train-classifier | eval | eval-vae | sweep`.

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


def check_exists(flag: str, path: str, marker: str | None = None) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    if marker and not os.path.isfile(os.path.join(path, marker)):
        raise CLIError(f"{flag} {path!r} has no {marker}")



# ----- ldm cache-latents -----


def add_cache_latents_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-latents",
        help="encode the training images once into the UNet stage's latent cache",
        description="Encode the training images of a config with its trained VAE (unet.vae_path, default "
        "<output_dir>/vae/model) and store each image's posterior mean and log-variance under "
        "unet.latent_cache_dir (default <output_dir>/latent_cache), as train_unet.py does at start-up; a cache "
        "with the same VAE weights and data is reused. Further arguments are dotted config overrides, as for the "
        "training scripts (--data.max_samples=1000).",
    )
    p.add_argument("--config", help="YAML config file (default: built-in defaults = digits)")
    p.add_argument("--output_dir", help="run directory (overrides output_dir in the config)")
    p.set_defaults(func=cache_latents, accepts_overrides=True)


def cache_latents(args: argparse.Namespace) -> int:
    """`ldm cache-latents`: build (or confirm) the latent cache that train_unet.py would use."""
    from ldm.config import ConfigError, load_config, parse_overrides

    try:
        overrides = parse_overrides(args.overrides, stage="unet")
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    from ldm import latent_cache
    from ldm.data import DataError
    from ldm.unet_trainer import build_latent_cache, load_vae_and_data

    reason = latent_cache.skip_reason(cfg.data)
    if reason is not None:
        raise CLIError(f"nothing to cache: {reason}")
    try:
        vae, _, info = load_vae_and_data(cfg)
        build_latent_cache(cfg, vae, info)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    return 0


# ----- ldm push -----


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a saved pipeline (weights, code, model card, samples) to the Hugging Face Hub",
        description="Create the Hub repository if needed and upload the pipeline folder as it is, keeping the model "
        "card written by training. Log in first (`huggingface-cli login` or HF_TOKEN).",
    )
    p.add_argument("--model", required=True, help="folder written by LatentDiffusionPipeline.save_pretrained")
    p.add_argument("--repo_id", required=True, help="user-or-org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit_message", default="Upload latent diffusion pipeline")
    p.set_defaults(func=push)


def push(args: argparse.Namespace) -> int:
    check_exists("--model", args.model, "model_index.json")
    from ldm.hub import push_pipeline

    url = push_pipeline(args.model, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
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
    from ldm import cli_eval  # its own module: the evaluation sub-commands

    cli_eval.add_parsers(subparsers)
    add_cache_latents_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Sub-commands that take dotted config overrides (--data.max_samples=10) receive the arguments argparse
    # does not know as args.overrides; for the others they are an error, as with parse_args.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args)
    except CLIError as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
