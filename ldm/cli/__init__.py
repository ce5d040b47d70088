"""The `ldm` console script: one module per family of sub-commands.

    sample.py    ldm sample
    edit.py      ldm edit (img2img, inpainting);  upscale.py  ldm upscale (super-resolution)
    training.py  ldm train [vae|unet]: both stages within one budget, or one (the body of train_vae.py /
                 train_unet.py too), ldm cache-latents
    evaluate.py  ldm train-classifier | eval | eval-vae | sweep
    posthoc_ema.py  ldm ema-reconstruct | ema-sweep (the EMA's width chosen after training)
    distill.py   ldm distill (a few-step student of a trained model)
    push.py      ldm push
    demo.py      ldm demo

Each sub-command is a pair of small functions: `add_<name>_parser(subparsers)` declares its arguments and
`<name>(args) -> int` runs it. torch and diffusers are imported inside the sub-command functions, so `ldm --help`
answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ldm.cli.common import CLIError
from ldm.cli.training import run_training  # noqa: F401  (train_vae.py / train_unet.py call it)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion with Hugging Face diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from ldm.cli import demo, distill, edit, evaluate, posthoc_ema, push, sample, training, upscale

    sample.add_sample_parser(subparsers)
    edit.add_edit_parser(subparsers)
    upscale.add_upscale_parser(subparsers)
    evaluate.add_parsers(subparsers)
    posthoc_ema.add_parsers(subparsers)
    training.add_train_parser(subparsers)
    training.add_cache_latents_parser(subparsers)
    distill.add_distill_parser(subparsers)
    push.add_push_parser(subparsers)
    demo.add_demo_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:  # argparse turns "--flag=--" into an empty list instead of rejecting it
        if arg.endswith("=--"):
            parser.error(f"argument {arg.split('=', 1)[0]}: '--' is not a value")
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
