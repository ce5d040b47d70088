"""`ldm train vae|unet` (the body of train_vae.py / train_unet.py too), and `ldm cache-latents`, which runs the UNet
stage's start-up alone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ldm.cli.common import CLIError

STAGES = {"vae": "stage 1: the autoencoder and its latents' scaling factor",
          "unet": "stage 2: the denoiser (config section `denoiser`) in the frozen autoencoder's latents"}


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a stage of a run: vae (stage 1), then unet (stage 2)",
        description="Train one stage of the run a config describes, as train_vae.py and train_unet.py do: "
        "`ldm train vae --config digits`, then `ldm train unet --config digits`. --config is a YAML file or the name "
        "of a config that ships with ldm. Under several processes: `accelerate launch -m ldm train unet ...`. "
        "`ldm train STAGE --help` lists the stage's own options.",
    )
    p.add_argument("stage", choices=list(STAGES), help="; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="--config NAME|FILE, --output_dir DIR, --dry_run, dotted config overrides (--train.max_steps=50)")
    p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    """`ldm train vae|unet`: the training script of that stage, with the arguments after the stage name."""
    return run_training(args.stage, args.args, prog=f"ldm train {args.stage}")


def add_cache_latents_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-latents",
        help="encode the training images once into the UNet stage's latent cache",
        description="Encode the training images of a config with its trained VAE (denoiser.vae_path, default "
        "<output_dir>/vae/model) and store each image's posterior mean and log-variance under "
        "denoiser.latent_cache_dir (default <output_dir>/latent_cache), as train_unet.py does at start-up; a cache "
        "with the same VAE weights and data is reused. Further arguments are dotted config overrides, as for the "
        "training scripts (--data.max_samples=1000).",
    )
    p.add_argument("--config", help="YAML config file, or the name of a config that ships with ldm (default: "
                   "built-in defaults = digits)")
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
    from ldm.data import DataError
    from ldm.train import latent_cache
    from ldm.train.unet import build_latent_cache, load_vae_and_data

    reason = latent_cache.skip_reason(cfg.data)
    if reason is not None:
        raise CLIError(f"nothing to cache: {reason}")
    try:
        vae, _, info = load_vae_and_data(cfg)
        build_latent_cache(cfg, vae, info)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    return 0


def run_training(stage: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Body of train_vae.py / train_unet.py: config from the command line, then train `stage` ("vae" or "unet").

    Mistakes in the config, the data or the paths end with a one-line message and status 2, before training.
    """
    import yaml

    from ldm.config import ConfigError, config_from_argv, to_dict

    try:
        cfg, dry_run = config_from_argv(list(sys.argv[1:] if argv is None else argv), stage=stage, prog=prog)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from ldm.data import DataError
    from ldm.image_files import BadImageError
    from ldm.lpips import LPIPSWeightsError
    from ldm.pipelines.loading import WeightsFileError
    from ldm.train.checkpoint import CheckpointError
    from ldm.train.faults import NumericalError, TrainingInterrupted

    try:
        if stage == "vae":
            from ldm.train.vae import train_vae

            train_vae(cfg)
        else:
            from ldm.train.unet import train_unet

            train_unet(cfg)
    except (ConfigError, DataError, LPIPSWeightsError, FileNotFoundError, WeightsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, BadImageError, NumericalError) as e:  # during training: what was saved is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGTERM / SIGINT: a checkpoint was written
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 0
