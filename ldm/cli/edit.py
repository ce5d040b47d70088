"""`ldm edit`: img2img (SDEdit) with --strength, or inpainting when --mask is given, on one image or a folder.

Input images are converted to the model's mode (grayscale or RGB) and must have its resolution. Image k (sorted file
order) is drawn with seed + k. A single --image writes the file --out; a folder writes --out/<name>.png per image.
Masks: white = fill, black = keep; one mask file for all images, or a folder with a mask of the same name per image.
"""

from __future__ import annotations

import argparse
import os

from ldm.cli.common import SCHEDULER_NAMES, CLIError, image_files, set_sampler

DEFAULT_STRENGTH = 0.6


def add_edit_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "edit", help="edit images: img2img (--strength) or inpainting (--mask) with a trained model",
        description="Img2img (SDEdit): encode each image, noise it to --strength, denoise (class models: towards "
        "--class_labels). With --mask: inpaint the white pixels (RePaint on latents) and keep the black ones exactly.")
    p.add_argument("--model", required=True, help="a sampling folder written by training (unconditional or class)")
    p.add_argument("--image", required=True, help="an image file or a folder of them")
    p.add_argument("--mask", help="inpainting: a mask file for all images, or a folder with one mask per image name")
    p.add_argument("--strength", type=float, default=None,
                   help=f"img2img: 0 keeps the image, 1 ignores it (default {DEFAULT_STRENGTH})")
    p.add_argument("--class_labels", metavar="LABEL", help="class models: the class (id or name) to edit towards")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="class models: classifier-free guidance scale (default: the model's own)")
    p.add_argument("--jump_length", type=int, default=10, help="inpainting: RePaint jump length (inference steps)")
    p.add_argument("--jump_n_sample", type=int, default=1,
                   help="inpainting: RePaint resampling count (1: none; >1 needs --scheduler ddim or ddpm, or "
                   "flow-euler for flow-matching models)")
    p.add_argument("--no_paste_back", action="store_true",
                   help="inpainting: keep the decoded unmasked pixels instead of the input's")
    add_run_arguments(p, steps_help="number of denoising steps (of a full run)")
    p.set_defaults(func=edit)


def add_run_arguments(p: argparse.ArgumentParser, steps_help: str) -> None:
    """The sampling and output options `ldm edit` and `ldm upscale` share (one image per seed, files or folders)."""
    p.add_argument("--steps", type=int, default=50, help=steps_help)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling algorithm (default: ddim, flow-euler for flow-matching models)")
    p.add_argument("--seed", type=int, default=0, help="image k uses torch.Generator().manual_seed(seed + k)")
    p.add_argument("--out", required=True, help="output PNG (single --image) or folder (folder --image)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (memory only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")


def check_model(flag: str, path: str, task: str) -> str:
    """The folder's conditioning, after checking that it exists and is a `task` model ("generate" or "superres")."""
    from ldm.pipelines.loading import folder_conditioning, folder_task

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        reason = "does not exist" if not os.path.exists(path) else "has no model_index.json"
        raise CLIError(f"{flag} {path!r} {reason}; expected a folder written by training or save_pretrained")
    try:
        found, (kind, _, _) = folder_task(path), folder_conditioning(path)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot read the model in {path!r}: {e}") from e
    if found != task:
        raise CLIError({"generate": f"{flag} {path!r} is a super-resolution model: use `ldm upscale` with it",
                        "superres": f"{flag} {path!r} was not trained for super-resolution (denoiser.task=superres); "
                                    "`ldm edit` edits with it"}[task])
    return kind


def _check_edit_args(args: argparse.Namespace) -> str:
    kind = check_model("--model", args.model, "generate")
    from ldm.pipelines.loading import is_student_folder

    if is_student_folder(args.model):
        raise CLIError(f"--model {args.model!r} is a consistency-distilled student (ldm distill): it samples in a few "
                       "steps but does not edit (img2img and RePaint follow a DDPM sampler's steps); edit with its "
                       "teacher")
    if kind == "text":
        raise CLIError(f"--model {args.model!r} is a text-to-image (Stable Diffusion) folder: edit it with diffusers' "
                       "StableDiffusionImg2ImgPipeline (see README); ldm's inpainting takes UNet2DModel models")
    if args.mask is not None and args.strength is not None:
        raise CLIError("--strength does not apply with --mask: inpainting regenerates the masked pixels from noise")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise CLIError(f"--strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {args.strength}")
    if kind == "none" and (args.class_labels is not None or args.guidance_scale is not None):
        raise CLIError("--class_labels/--guidance_scale do not apply: the model is unconditional")
    if kind == "class" and args.class_labels is None:
        raise CLIError("--class_labels is required: the model is class-conditional")
    for name in ("steps", "batch_size", "jump_length", "jump_n_sample"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return kind


def _mask_files(mask: str, images: list[str]) -> list[str]:
    if os.path.isdir(mask):
        files = [os.path.join(mask, os.path.basename(f)) for f in images]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CLIError(f"--mask {mask!r} has no mask named like the image: {missing[0]!r}")
        return files
    return image_files("--mask", mask) * len(images)


def output_paths(inputs: list[str], image_arg: str, out: str) -> list[str]:
    if os.path.isdir(image_arg):
        os.makedirs(out, exist_ok=True)
        return [os.path.join(out, os.path.splitext(os.path.basename(f))[0] + ".png") for f in inputs]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return [out]


def load_task_pipeline(pipeline_class, args: argparse.Namespace):
    """`pipeline_class` from the folder, with --scheduler, on --device, without its own progress bar."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        pipe = pipeline_class.from_pretrained(args.model)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    set_sampler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_batches(pipe, files: list[str], outs: list[str], args: argparse.Namespace, call, desc: str) -> None:
    """Open the images (the model's mode), run `call(pipe, images, generators, start)` per batch, save the results."""
    import torch
    from tqdm.auto import tqdm

    from ldm.cli.common import open_image

    mode = "L" if pipe.vae.config.in_channels == 1 else "RGB"
    images = [open_image("--image", f, mode) for f in files]  # every file is decoded before any work
    with tqdm(total=len(files), desc=desc, unit="image") as bar:
        for start in range(0, len(files), args.batch_size):
            batch = images[start:start + args.batch_size]
            generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
            try:
                results = call(pipe, batch, generators, start)
            except ValueError as e:  # the pipeline's checks: size, mask, strength, scheduler
                raise CLIError(str(e)) from e
            for image, path in zip(results, outs[start:start + len(batch)], strict=True):
                image.save(path)
            bar.update(len(batch))


def edit(args: argparse.Namespace) -> int:
    kind = _check_edit_args(args)
    files = image_files("--image", args.image)
    masks = _mask_files(args.mask, files) if args.mask is not None else None
    from ldm.pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline

    pipe = load_task_pipeline(LatentInpaintPipeline if masks else LatentImg2ImgPipeline, args)
    conditions = {}
    if kind == "class":
        label = int(args.class_labels) if args.class_labels.isdigit() else args.class_labels
        conditions = {"class_labels": [label], "guidance_scale": args.guidance_scale}
    outs = output_paths(files, args.image, args.out)
    if masks:
        from ldm.cli.common import open_image

        mask_images = [open_image("--mask", f, "L") for f in masks]

        def call(pipe, batch, generators, start):
            return pipe(image=batch, mask_image=mask_images[start:start + len(batch)], generator=generators,
                        num_inference_steps=args.steps, jump_length=args.jump_length,
                        jump_n_sample=args.jump_n_sample, paste_back=not args.no_paste_back,
                        **_batch_conditions(conditions, len(batch))).images
    else:
        strength = DEFAULT_STRENGTH if args.strength is None else args.strength

        def call(pipe, batch, generators, start):
            return pipe(image=batch, strength=strength, generator=generators, num_inference_steps=args.steps,
                        **_batch_conditions(conditions, len(batch))).images

    run_batches(pipe, files, outs, args, call, "inpainting" if masks else "img2img")
    print(f"wrote {len(outs)} image(s) to {args.out}")
    return 0


def _batch_conditions(conditions: dict, n: int) -> dict:
    return {**conditions, "class_labels": conditions["class_labels"] * n} if conditions else {}
