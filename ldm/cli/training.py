"""`ldm train [vae|unet]`: both stages, within one time budget if given (ldm.train.run_budget), or one of them (the
body of train_vae.py / train_unet.py too); and `ldm cache-latents`, which runs the UNet stage's start-up alone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ldm.cli.common import CLIError

STAGES = {"vae": "stage 1: the autoencoder and its latents' scaling factor",
          "unet": "stage 2: the denoiser (config section `denoiser`) in the frozen autoencoder's latents"}


RUN_HELP = (
    "Train the run a config describes. Without a stage, both: `ldm train --config digits --train.max_minutes=30` "
    "trains the autoencoder and then the denoiser within one time budget of 30 minutes, split by measurement (the "
    "autoencoder trains while its held-out score still rises fast; config section `budget`, docs/guide/budgets.md), "
    "and running it again continues an interrupted run; without --train.max_minutes, each stage trains by its own "
    "settings. Here --train.KEY sets both stages' train.KEY, other stage keys need their section (--vae.model.X). "
    "With a stage, that stage alone, as train_vae.py and train_unet.py do: `ldm train vae --config digits`, then "
    "`ldm train unet --config digits` (`ldm train vae --help` lists its options). --config is a YAML file or the "
    "name of a config that ships with ldm. Under several processes: `accelerate launch -m ldm train ...`."
)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    # The arguments reach `train` as they were given ("+" prefixes: argparse sets none of them aside as options), so
    # that the first one may be a stage or already an option of both stages' run.
    p = subparsers.add_parser("train", help="train both stages of a run (one time budget: --train.max_minutes), or "
                              "one: vae (stage 1), unet (stage 2)", description=RUN_HELP, prefix_chars="+",
                              add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="[vae|unet] ...",
                   help="; ".join(f"{k}: {v}" for k, v in STAGES.items()) + ". Then --config NAME|FILE, --output_dir "
                   "DIR, --dry_run, dotted config overrides (--train.max_minutes=30)")
    p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    """`ldm train vae|unet ...`: the training script of that stage; `ldm train ...`: both stages (`run_both`)."""
    if args.args and args.args[0] in STAGES:
        return run_training(args.args[0], args.args[1:], prog=f"ldm train {args.args[0]}")
    return run_both(args.args)


def run_overrides(args: list[str]) -> dict:
    """Dotted overrides of `ldm train` without a stage: --train.max_minutes is the run's total
    (budget.max_minutes), another --train.KEY sets both stages' train.KEY, any other stage key must name its
    section."""
    import dataclasses

    from ldm.config import ConfigError, DenoiserStageConfig, RunConfig, VAEStageConfig, parse_overrides

    stage_keys = ({f.name for cls in (VAEStageConfig, DenoiserStageConfig) for f in dataclasses.fields(cls)}
                  - {f.name for f in dataclasses.fields(RunConfig)})
    overrides = {}
    for key, value in parse_overrides(args).items():
        head = key.split(".")[0]
        if key == "train.max_minutes":
            overrides.update(parse_overrides([f"--budget.max_minutes={value}"]))
        elif head == "train":
            for section in ("vae", "denoiser"):
                overrides.update(parse_overrides([f"--{section}.{key}={value}"]))
        elif head in stage_keys:
            raise ConfigError(f"--{key}: `ldm train` without a stage trains both stages; name the one you mean: "
                              f"--vae.{key} or --denoiser.{key}")
        else:
            overrides[key] = value
    return overrides


def run_both(argv: Sequence[str]) -> int:
    """`ldm train` without a stage: both stages (ldm.train.run_budget.train_run), with the exits of run_training."""
    import yaml

    from ldm.config import ConfigError, load_config, to_dict

    parser = argparse.ArgumentParser(prog="ldm train", description=RUN_HELP)
    parser.add_argument("--config", help="YAML config file, or the name of a config that ships with ldm (default: "
                        "built-in defaults = digits)")
    parser.add_argument("--output_dir", help="run directory (overrides output_dir in the config)")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and the plan, and exit")
    if argv and not argv[0].startswith("-"):
        parser.error(f"argument stage: invalid choice: {argv[0]!r} (choose from {', '.join(map(repr, STAGES))}, or "
                     "none for both stages)")
    args, rest = parser.parse_known_args(list(argv))
    try:
        overrides = run_overrides(rest)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        cfg = load_config(args.config, overrides)
        from ldm.train.run_budget import check, describe, train_run

        check(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(describe(cfg))
        return 0
    return _guarded(lambda: train_run(cfg))


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

    def train_stage():
        if stage == "vae":
            from ldm.train.vae import train_vae

            train_vae(cfg)
        else:
            from ldm.train.unet import train_unet

            train_unet(cfg)

    return _guarded(train_stage)


def _guarded(work) -> int:
    """Run `work()`: mistakes in the config, the data or the paths end with a one-line message and status 2, faults
    during training with status 1 (what was saved is intact), a stop signal with its own status."""
    from ldm.config import ConfigError
    from ldm.data import DataError
    from ldm.image_files import BadImageError
    from ldm.lpips import LPIPSWeightsError
    from ldm.pipelines.loading import WeightsFileError
    from ldm.train.checkpoint import CheckpointError
    from ldm.train.faults import NumericalError, TrainingInterrupted

    try:
        work()
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
