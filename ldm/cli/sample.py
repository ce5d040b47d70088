"""`ldm sample`: generate images from a saved pipeline and write them as a grid.

Unconditional models draw --num_images images. Class models draw --num_images images of each --class_labels entry
(default: every class), text models --num_images of each --prompt, one grid row per label or prompt (wrapped onto
more rows beyond `images.MAX_ROW` images). Image k of the whole set (row-major) is drawn with seed + k, whatever the
batch size.
"""

from __future__ import annotations

import argparse
import os

from ldm.cli.common import SCHEDULER_NAMES, TIMESTEP_SPACINGS, CLIError, set_sampler


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images from a saved pipeline (unconditional, class or text)",
        description="Generate images from a saved pipeline and write them as a grid (and optionally one PNG per "
        "image). Image k is drawn with seed + k, so it does not depend on --batch_size. Class models: one row of "
        "--num_images per class label; text models: one row per --prompt (rows longer than 16 wrap).",
    )
    p.add_argument("--model", required=True, help="folder written by training (or by save_pretrained)")
    p.add_argument("--num_images", type=int, default=16,
                   help="how many images to generate (per class label or prompt for conditional models)")
    p.add_argument("--class_labels", metavar="LIST",
                   help="class models: comma-separated class ids or names (e.g. 3,7 or cat,dog), or 'all' (default)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text models: a prompt (repeat for several)")
    p.add_argument("--negative_prompt", action="append", metavar="TEXT",
                   help="text models: what to steer away from; one for all prompts, or one per --prompt")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="conditional models: classifier-free guidance scale (1 = none; default: the model's own, "
                   "saved with it from training's denoiser.guidance_scale)")
    p.add_argument("--steps", type=int, default=None,
                   help="number of denoising steps (default: the model's own: a consistency student's, else 50)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling algorithm (default: the one saved with the pipeline); flow-euler and flow-heun "
                   "sample flow-matching models, the others DDPM models")
    p.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="which training timesteps the steps visit (default: the pipeline's own; DDPM models only)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic); ignored by other schedulers")
    p.add_argument("--seed", type=int, default=0, help="image k uses torch.Generator().manual_seed(seed + k)")
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
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.guidance_scale is not None and not 0 <= args.guidance_scale < float("inf"):
        raise CLIError(f"--guidance_scale must be >= 0 and finite (1: no guidance), got {args.guidance_scale}")
    if not 0 <= args.eta <= 1:  # NaN fails this too
        raise CLIError(f"--eta must be in [0, 1] (0: deterministic DDIM), got {args.eta}")
    if not 0 <= args.seed <= 2**63 - 1 - args.num_images * 1000:  # torch.Generator takes 64-bit seeds
        raise CLIError(f"--seed must be a non-negative int below 2**63 (image k uses seed + k), got {args.seed}")


def _parse_labels(text: str | None) -> list[int | str] | None:
    if text is None or text == "all":
        return None
    labels = [v.strip() for v in text.split(",") if v.strip()]
    if not labels:
        raise CLIError(f"--class_labels {text!r} names no class")
    return [int(v) if v.lstrip("-").isdigit() else v for v in labels]


def conditions(args: argparse.Namespace) -> tuple[str, list, dict]:
    """(conditioning, one condition per grid row, fixed pipeline kwargs) for the model and the arguments, checked
    from the folder's JSON files before any weights are loaded."""
    from ldm.pipelines.guidance import class_label_ids
    from ldm.pipelines.loading import folder_conditioning, folder_task

    try:
        kind, class_names, num_classes = folder_conditioning(args.model)
        task = folder_task(args.model)
    except (OSError, ValueError, KeyError) as e:  # unreadable or corrupt JSON
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    if task == "superres":
        raise CLIError(f"--model {args.model!r} is a super-resolution model: it upscales images, use `ldm upscale`")
    given = {"--class_labels": args.class_labels, "--prompt": args.prompt, "--negative_prompt": args.negative_prompt,
             "--guidance_scale": args.guidance_scale}
    allowed = {"none": (), "class": ("--class_labels", "--guidance_scale"),
               "text": ("--prompt", "--negative_prompt", "--guidance_scale")}[kind]
    for flag, value in given.items():
        if value is not None and flag not in allowed:
            what = {"none": "an unconditional model: it takes no conditions",
                    "class": "a class-conditional model: it takes --class_labels (and --guidance_scale)",
                    "text": "a text-to-image model: it takes --prompt (and --negative_prompt, --guidance_scale)"}[kind]
            raise CLIError(f"{flag} does not apply: {args.model!r} is {what}")
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    if kind == "none":
        return kind, [None], extra
    if kind == "class":
        labels = _parse_labels(args.class_labels)
        try:
            ids = list(range(num_classes)) if labels is None else class_label_ids(labels, num_classes, class_names)
        except ValueError as e:
            raise CLIError(str(e).replace("class_labels:", "--class_labels:", 1)) from e
        return kind, ids, extra
    if not args.prompt:
        raise CLIError(f"--prompt is required: {args.model!r} is a text-to-image model")
    negatives = args.negative_prompt or []
    if len(negatives) not in (0, 1, len(args.prompt)):
        raise CLIError(f"--negative_prompt given {len(negatives)} times for {len(args.prompt)} prompts; give one "
                       "for all prompts or one per --prompt")
    rows = [(p, negatives[0] if len(negatives) == 1 else negatives[i] if negatives else None)
            for i, p in enumerate(args.prompt)]
    return kind, rows, extra


def _row_kwargs(kind: str, row, count: int) -> dict:
    if kind == "class":
        return {"class_labels": [row] * count}
    if kind == "text":
        prompt, negative = row
        return {"prompt": [prompt] * count, **({"negative_prompt": [negative] * count} if negative else {})}
    return {"batch_size": count}


def sample(args: argparse.Namespace) -> int:
    """`ldm sample`: check the arguments, load the pipeline, swap its scheduler, sample seeded images, write the grid."""
    _check_sample_args(args)
    kind, rows, extra = conditions(args)
    import torch

    from ldm.images import condition_grid, image_grid
    from ldm.pipelines.loading import fit_steps, guidance_scale_of, load_pipeline, num_inference_steps_of

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")

    try:
        pipe = load_pipeline(args.model)
    except (OSError, ValueError, KeyError) as e:  # missing/corrupt weights or configs
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    steps = num_inference_steps_of(pipe) if args.steps is None else args.steps
    if steps > pipe.scheduler.config.num_train_timesteps:
        raise CLIError(f"--steps {steps} exceeds the model's {pipe.scheduler.config.num_train_timesteps} "
                       "training timesteps")
    # Same training noise schedule, the sampling algorithm (and spacing) asked for; without either, the saved one.
    set_sampler(pipe, args.scheduler, args.timestep_spacing, keep_saved=True)
    fit_steps(pipe, steps)  # a consistency student asked for more steps than it learned: a warning, a finer grid
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if kind != "none" and "guidance_scale" not in extra:  # the model's own scale (Stable Diffusion's would be 7.5)
        extra["guidance_scale"] = guidance_scale_of(pipe)

    images = []
    for row_index, row in enumerate(rows):
        first = args.seed + row_index * args.num_images
        for start in range(0, args.num_images, args.batch_size):
            seeds = range(first + start, first + min(start + args.batch_size, args.num_images))
            # One CPU generator per image: the same seed gives the same image on CPU and GPU, at any batch size.
            generator = [torch.Generator().manual_seed(s) for s in seeds]
            images += pipe(**_row_kwargs(kind, row, len(generator)), **extra, generator=generator,
                           num_inference_steps=steps, eta=args.eta).images

    grid = image_grid(images) if kind == "none" else condition_grid(images, args.num_images)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(args.save_images, f"{i:05d}.png"))
    print(f"wrote {len(images)} images ({grid.height // images[0].height}x{grid.width // images[0].width} grid, "
          f"{steps} steps) to {args.out}")
    return 0
