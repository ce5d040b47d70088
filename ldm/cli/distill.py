"""`ldm distill`: a few-step student of a trained model (latent consistency distillation, `ldm.distill`).

A sub-command of `ldm`, not a third training script beside train_vae.py and train_unet.py: it takes a trained model
(--model, the teacher's folder) besides the config, it is optional, and the teacher need not come from the config's
run (a Stable Diffusion-format folder). Under several processes: `accelerate launch -m ldm distill ...`.
"""

from __future__ import annotations

import argparse
import sys

from ldm.cli.common import CLIError


def add_distill_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a trained model into a 1-8 step student (latent consistency distillation)",
        description="Distil the trained DDPM-objective model in --model (the teacher: a pipeline folder that training "
        "wrote, or a Stable Diffusion-format text folder) into a student that samples in a few steps with "
        "LCMScheduler: latent consistency distillation (Luo et al. 2023) on the latents of the config's data (its "
        "latent cache; the autoencoder is not run where the teacher's training built it). Class and text teachers "
        "are distilled with their guidance. Writes <output_dir>/distill/ (checkpoints, logs, grids, best/) and the "
        "student's pipeline <output_dir>/student/. Further arguments are dotted config overrides; keys of the "
        "distill section may drop its prefix (--train.max_steps=500, --skip_interval=20, --num_inference_steps=4).",
    )
    p.add_argument("--model", required=True, help="the teacher's pipeline folder (e.g. runs/digits/pipeline)")
    p.add_argument("--config", help="YAML config (or the name of one that ships with ldm) the teacher was trained "
                   "with: its data, and its distill section")
    p.add_argument("--output_dir", help="run directory (default: the config's output_dir, where the teacher's latent "
                   "cache is)")
    p.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=distill, accepts_overrides=True)


def distill(args: argparse.Namespace) -> int:
    """`ldm distill`: the config and the teacher checked before any work, then the distillation.

    Mistakes in the config, the teacher or the data end with a one-line message and status 2, before training;
    errors while training (a checkpoint that cannot be written) with status 1; a stop signal with its own status,
    after writing a checkpoint."""
    from ldm.config import ConfigError, load_config, parse_overrides, to_dict

    try:
        overrides = parse_overrides(args.overrides, stage="distill")
        overrides["distill.teacher"] = args.model
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from ldm.data import DataError
    from ldm.distill.task import train_distill
    from ldm.distill.teacher import TeacherError
    from ldm.image_files import BadImageError
    from ldm.pipelines.loading import WeightsFileError
    from ldm.train.checkpoint import CheckpointError
    from ldm.train.faults import NumericalError, TrainingInterrupted

    try:
        train_distill(cfg)
    except (ConfigError, DataError, TeacherError, FileNotFoundError, WeightsFileError) as e:
        raise CLIError(str(e)) from e
    except (CheckpointError, BadImageError, NumericalError) as e:  # during training: what was saved is intact
        print(f"ldm distill: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGTERM / SIGINT: a checkpoint was written
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 0
