"""The evaluation sub-commands of `ldm`: train-classifier, eval, eval-vae, sweep.

Same pattern as ldm/cli/__init__.py: `add_<name>_parser(subparsers)` declares the arguments, `<name>(args) -> int` runs it,
heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ldm.cli.common import SCHEDULER_NAMES, TIMESTEP_SPACINGS, CLIError, check_exists, set_sampler


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    add_train_classifier_parser(subparsers)
    add_eval_parser(subparsers)
    add_eval_vae_parser(subparsers)
    add_sweep_parser(subparsers)


# ----- ldm train-classifier | eval | eval-vae | sweep -----

_FEATURES_HELP = ("classifier folder from `ldm train-classifier`: its features give classifier-FID/KID/PR, its logits "
                  "IS and the class distribution (default: Inception-v3, if torch-fidelity and its weights are here)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _name_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [v for v in text.split(",") if v]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {','.join(choices)}")
        return names

    return parse


def _report(result: dict, out: str | None) -> None:
    """Print the result as a table and, with --out, write it as JSON."""
    from ldm.eval.evaluation import format_table, write_json

    print(format_table(result))
    if out:
        write_json(result, out)
        print(f"wrote {out}")


def add_train_classifier_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-classifier", help="train the small CNN whose features give classifier-FID",
        description="Train a small CNN classifier on a labelled data set (a config's data, or an image folder with "
        "one sub-folder per class) and save it as PATH/classifier.safetensors + PATH/config.json (with its held-out "
        "accuracy). Pass PATH to `ldm eval --features` where Inception weights are unavailable or unsuitable.")
    p.add_argument("--data", required=True, help="YAML config (its data section) or a folder of class sub-folders")
    p.add_argument("--out", required=True, help="folder to write the classifier to")
    p.add_argument("--resolution", type=int, default=32, help="image size for a folder (a config sets its own)")
    p.add_argument("--color_mode", choices=("rgb", "grayscale"), default="rgb", help="for a folder")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-3, help="peak AdamW learning rate (one-cycle)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=train_classifier)


def train_classifier(args: argparse.Namespace) -> int:
    """`ldm train-classifier`: train on the training split, measure accuracy on the held-out split, save."""
    check_exists("--data", args.data)
    from ldm.config import ConfigError
    from ldm.data import DataError
    from ldm.eval.classifier import ClassifierConfig, save_classifier
    from ldm.eval.classifier import train_classifier as fit_classifier
    from ldm.eval.evaluation import load_data

    try:
        train, holdout, info = load_data(args.data, 1 if args.color_mode == "grayscale" else 3, args.resolution,
                                         match_model=False)
    except (ConfigError, DataError, ValueError) as e:
        raise CLIError(str(e)) from e
    if info.num_classes is None:
        raise CLIError(f"--data {args.data!r} has no class labels; a classifier needs them")
    if holdout is None:
        raise CLIError("the data has no held-out images to measure accuracy on; set data.holdout_fraction > 0")
    config = ClassifierConfig(channels=info.num_channels, resolution=info.resolution, num_classes=info.num_classes,
                              class_names=info.class_names, data_fingerprint=info.fingerprint)
    model = fit_classifier(train, holdout, config, epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, seed=args.seed)
    save_classifier(model, args.out)
    print(f"classifier saved to {args.out}: held-out accuracy {100 * model.config.test_accuracy:.2f}% on "
          f"{len(holdout)} images ({info.num_classes} classes)")
    return 0


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder written by save_pretrained")
    p.add_argument("--data", required=True, help="YAML config or image folder: the real images to compare with")
    p.add_argument("--features", metavar="PATH", help=_FEATURES_HELP)
    p.add_argument("--num_samples", type=int, default=1000, help="generated images per evaluation (>= 2)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass (memory only)")
    p.add_argument("--seed", type=int, default=0, help="sample i is drawn with seed + i")
    p.add_argument("--cache_dir", help="where real-data features are cached (default: $LDM_CACHE_DIR/features or "
                   "~/.cache/ldm/features)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="conditional models: classifier-free guidance scale (default: the model's own, saved with "
                   "it from training's denoiser.guidance_scale)")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="FID/KID/IS/precision-recall of a pipeline's samples",
        description="Sample a pipeline and score the samples against real images. Conditional models draw equal "
        "numbers of every class (or of every class's prompt, for text models whose data has a caption template) "
        "and are also scored by the classifier's accuracy on the requested class. Runs under `accelerate launch` "
        "with several processes (samples are split, features gathered). Prints a table; --out writes JSON.")
    _add_eval_common(p)
    p.add_argument("--metrics", type=_name_list(("fid", "kid", "is", "pr")), default=["fid", "kid", "is", "pr"],
                   help="comma-separated: fid, kid, is, pr (precision/recall)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling algorithm (default: ddim, flow-euler for flow-matching models, lcm for consistency "
                   "students)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's own: a consistency student's, else 50)")
    p.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="which training timesteps the steps visit (default: the pipeline's own)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    from ldm.cli.evaluate_editing import add_task_arguments

    add_task_arguments(p)
    p.set_defaults(func=evaluate)


def _eval_setup(args: argparse.Namespace):
    """Checks, feature network, pipeline and cached real features shared by `eval` and `sweep`."""
    check_exists("--model", args.model, "model_index.json")
    check_exists("--data", args.data)
    if args.num_samples < 2:
        raise CLIError(f"--num_samples must be >= 2, got {args.num_samples}")
    from ldm.config import ConfigError
    from ldm.data import DataError
    from ldm.eval.conditional import check_classifier_matches, plan_for
    from ldm.eval.evaluation import load_data, resolve_data
    from ldm.eval.features import (
        FeatureNetworkUnavailable,
        cached_real_features,
        default_cache_dir,
        load_feature_network,
    )
    from ldm.pipelines.loading import load_pipeline
    from ldm.train.devices import process_state

    try:  # first: the feature network is the likeliest thing to be missing
        network = load_feature_network(args.features)
    except (FeatureNetworkUnavailable, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    try:
        pipe = load_pipeline(args.model)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    state = process_state()
    pipe = pipe.to(state.device)
    channels, size = pipe.vae.config.in_channels, pipe.vae.config.sample_size
    try:
        train, _, info = load_data(args.data, channels, size)
        data_cfg = resolve_data(args.data, channels, size)
        plans = [plan_for(pipe, data_cfg, info, g) for g in _guidance_values(args)]
        check_classifier_matches(network, plans[0])
    except (ConfigError, DataError, ValueError) as e:
        raise CLIError(str(e)) from e
    k = plans[0].num_conditions
    if plans[0].labels is not None and args.num_samples % k:
        raise CLIError(f"--num_samples {args.num_samples} does not split equally over the model's {k} classes; use a "
                       f"multiple of {k}")
    real = cached_real_features(network, train, info.fingerprint, "train", args.cache_dir or default_cache_dir(),
                                args.batch_size, state.device)
    return state, network, pipe, real, plans


def _guidance_values(args: argparse.Namespace) -> list[float | None]:
    """The guidance scales to evaluate: --guidance_scales (sweep), else --guidance_scale (None: the default)."""
    return getattr(args, "guidance_scales", None) or [args.guidance_scale]


def evaluate(args: argparse.Namespace) -> int:
    """`ldm eval`: sample, extract features, score, print the table and write JSON (--task: the editing tasks)."""
    if args.task != "generate":
        from ldm.cli.evaluate_editing import evaluate_task

        return evaluate_task(args)
    from ldm.eval.evaluation import evaluate_pipeline
    from ldm.pipelines.loading import num_inference_steps_of
    from ldm.schedulers import timestep_spacing_of

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    state, network, pipe, real, (plan,) = _eval_setup(args)
    sampler = set_sampler(pipe, args.scheduler, args.timestep_spacing)
    steps = num_inference_steps_of(pipe) if args.steps is None else args.steps
    result = evaluate_pipeline(pipe, network, real, args.num_samples, steps, args.batch_size, args.seed,
                               names=tuple(args.metrics), eta=args.eta, plan=plan)
    if state.is_main_process:
        _report({"model": args.model, "sampler": sampler,
                 "timestep_spacing": timestep_spacing_of(pipe.scheduler.config), **result}, args.out)
    return 0


def add_eval_vae_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-vae", help="PSNR/SSIM/colour/rFID/LPIPS of an autoencoder's held-out reconstructions",
        description="Reconstruct the held-out images of --data with the autoencoder (posterior mean) and report "
        "PSNR, SSIM, colour fidelity (RGB: chroma kept and a*b* error on coloured pixels), rFID (with --features "
        "or Inception weights) and LPIPS (with --lpips).")
    p.add_argument("--vae", required=True, help="AutoencoderKL folder (runs/X/vae/model) or a pipeline folder")
    p.add_argument("--data", required=True, help="YAML config or image folder")
    p.add_argument("--features", metavar="PATH", help=_FEATURES_HELP + "; without it rFID is skipped if Inception "
                   "is unavailable")
    p.add_argument("--lpips", metavar="FILE", help="LPIPS weights (safetensors, see README 'Perceptual loss')")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    p.set_defaults(func=evaluate_vae)


def evaluate_vae(args: argparse.Namespace) -> int:
    """`ldm eval-vae`: reconstruction metrics on held-out images."""
    check_exists("--vae", args.vae)
    check_exists("--data", args.data)
    vae_dir = os.path.join(args.vae, "vae") if os.path.isfile(os.path.join(args.vae, "model_index.json")) else args.vae
    check_exists("--vae", vae_dir, "config.json")
    from diffusers import AutoencoderKL

    from ldm.config import ConfigError
    from ldm.data import DataError
    from ldm.eval.evaluation import evaluate_reconstructions, load_data
    from ldm.eval.features import FeatureNetworkUnavailable, load_feature_network

    network = None
    try:
        network = load_feature_network(args.features)
    except FeatureNetworkUnavailable as e:
        print(f"rFID skipped: {e}", file=sys.stderr)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
    lpips = None
    if args.lpips:
        from ldm.lpips import LPIPS, LPIPSWeightsError

        try:
            lpips = LPIPS.from_file(args.lpips)
        except LPIPSWeightsError as e:
            raise CLIError(str(e)) from e
    from ldm.pipelines.loading import WeightsFileError, check_weights_files

    try:
        check_weights_files(vae_dir)
    except WeightsFileError as e:
        raise CLIError(str(e)) from e
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    try:
        _, holdout, _ = load_data(args.data, vae.config.in_channels, vae.config.sample_size)
    except (ConfigError, DataError, ValueError) as e:
        raise CLIError(str(e)) from e
    if holdout is None:
        raise CLIError("the data has no held-out images; set data.holdout_fraction > 0")
    _report({"vae": vae_dir, **evaluate_reconstructions(vae, holdout, args.batch_size, network, lpips)}, args.out)
    return 0


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="a metric for every scheduler x timestep spacing x step count (or guidance scale), as CSV and "
        "plot",
        description="Evaluate one metric for each scheduler, timestep spacing and step count (same seeds throughout) "
        "and write OUT_DIR/sweep.csv and OUT_DIR/sweep.png (metric against steps and against seconds per image). "
        "With --guidance_scales (conditional models), evaluate every guidance scale instead and plot the metric and "
        "the accuracy on the requested class against it (default sampler: ddim, or flow-euler for flow models, 50 "
        "steps).")
    _add_eval_common(p)
    p.add_argument("--schedulers", type=_name_list(SCHEDULER_NAMES), default=None,
                   help="comma-separated sampler names (default: ddim,dpm++,unipc,euler,ddpm, for flow-matching "
                   "models flow-euler,flow-heun, for consistency students lcm; with --guidance_scales: ddim, "
                   "flow-euler or lcm)")
    p.add_argument("--steps", type=_int_list, default=None,
                   help="comma-separated step counts (default: 5,10,20,50,100, for a consistency student 1,2,4,8; "
                   "with --guidance_scales: 50, or the student's own)")
    p.add_argument("--timestep_spacing", type=_name_list(TIMESTEP_SPACINGS), default=None,
                   help="comma-separated timestep spacings to compare: leading, trailing, linspace (default: the "
                   "pipeline's own)")
    p.add_argument("--guidance_scales", type=_float_list, default=None, metavar="LIST",
                   help="conditional models: comma-separated classifier-free guidance scales to sweep, e.g. 1,2,3,5")
    p.add_argument("--metric", choices=("fid", "kid", "is", "pr"), default="fid", help="the metric to plot")
    p.add_argument("--out_dir", default="sweep", help="folder for sweep.csv and sweep.png")
    p.set_defaults(func=sweep)


def _sweep_schedulers(pipe, names: list[str] | None, spacings: list[str] | None, guided: bool) -> list[str]:
    """The samplers to sweep, checked against the model before any sampling: --schedulers, else those of its
    objective (ldm.schedulers.SWEEP_SCHEDULERS; with --guidance_scales its default sampler alone)."""
    from ldm.schedulers import SWEEP_SCHEDULERS, check_fits, default_scheduler, objective_of

    objective = objective_of(pipe.scheduler.config)
    if names is None:
        names = [default_scheduler(pipe.scheduler.config)] if guided else list(SWEEP_SCHEDULERS[objective])
    try:
        for name in names:
            check_fits(name, objective, "--schedulers:")
    except ValueError as e:
        raise CLIError(str(e)) from e
    if spacings and objective == "flow":
        raise CLIError("--timestep_spacing: this is a flow-matching model, whose samplers take no timestep spacing "
                       "(they step σ evenly from 1 through the model's shift); leave it out")
    return names


def _sweep_steps(pipe, guided: bool) -> list[int]:
    """The step counts to sweep when --steps is not given: a consistency student's few (its own alone for a guidance
    sweep), else 5 to 100 (50 for a guidance sweep)."""
    from ldm.pipelines.loading import num_inference_steps_of
    from ldm.schedulers import objective_of

    if objective_of(pipe.scheduler.config) == "consistency":
        return [num_inference_steps_of(pipe)] if guided else [1, 2, 4, 8]
    return [50] if guided else [5, 10, 20, 50, 100]


def sweep(args: argparse.Namespace) -> int:
    """`ldm sweep`: evaluate every scheduler x spacing x steps (x guidance scale), write the CSV and the plot."""
    from ldm.eval import sweep as S

    guided = args.guidance_scales is not None
    if guided and args.guidance_scale is not None:
        raise CLIError("give --guidance_scales (a sweep) or --guidance_scale, not both")
    state, network, pipe, real, plans = _eval_setup(args)
    steps = args.steps or _sweep_steps(pipe, guided)
    if guided and plans[0].kind == "none":
        raise CLIError(f"--guidance_scales: {args.model!r} is unconditional; guidance needs a class or text model")
    schedulers = _sweep_schedulers(pipe, args.schedulers, args.timestep_spacing, guided)
    rows = S.run_sweep(pipe, network, real, schedulers, steps, args.num_samples, args.batch_size, args.metric,
                       args.seed, log=state.print, plans=plans, timestep_spacings=args.timestep_spacing)
    if state.is_main_process:
        csv_path, png_path = os.path.join(args.out_dir, "sweep.csv"), os.path.join(args.out_dir, "sweep.png")
        S.write_csv(rows, csv_path)
        (S.plot_guidance if guided else S.plot)(rows, png_path)
        print(f"feature network: {network.name}\nwrote {csv_path} and {png_path}")
    return 0


