"""A figure comparing recipes on one image folder: a row of real images, then a row of samples from each pipeline.

    python benchmarks/recipe_figure.py --data runs/data/photos --out docs/textures32_photos.png \
        --row "before: configs/digits.yaml=runs/before_photos/pipeline" --row "textures32=runs/t32_photos/pipeline"

Every pipeline draws the same seeds with the same sampler, so rows differ only by the model. With `--scheduler saved`
each keeps its own sampler, and a row's `@STEPS` sets its step count: a teacher and its consistency student
(`ldm distill`, whose LCMScheduler samples students only) side by side:

    python benchmarks/recipe_figure.py --data configs/digits.yaml --scheduler saved --out docs/distill_digits.png \
        --row "teacher, 50 steps=runs/digits/pipeline@50" --row "student, 1 step=runs/digits/student@1" ...
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from ldm.images import image_grid


def labelled_row(label: str, images: list[Image.Image], scale: int, label_width: int) -> Image.Image:
    row = image_grid(images, cols=len(images)).convert("RGB")
    row = row.resize((row.width * scale, row.height * scale), Image.NEAREST)  # keep the pixels the model drew
    out = Image.new("RGB", (label_width + row.width, row.height), "white")
    out.paste(row, (label_width, 0))
    ImageDraw.Draw(out).text((4, row.height // 2 - 6), label, fill="black")
    return out


def main() -> None:
    from ldm.data import build_datasets
    from ldm.eval.evaluation import resolve_data
    from ldm.pipelines import LatentDiffusionPipeline
    from ldm.schedulers import make_scheduler

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the image folder the pipelines were trained on")
    p.add_argument("--row", action="append", required=True,
                   help="LABEL=PIPELINE_FOLDER[@STEPS], once per row (STEPS: that row's step count, default --steps)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=12, help="images per row")
    p.add_argument("--scheduler", default="ddim", help="every row's sampler, or 'saved': each pipeline's own")
    p.add_argument("--timestep_spacing", default="leading")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=int, default=3)
    args = p.parse_args()

    sample_rows = []
    for row in args.row:
        label, path = row.split("=", 1)
        path, _, steps = path.partition("@")
        pipe = LatentDiffusionPipeline.from_pretrained(path)
        if args.scheduler != "saved":
            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, args.timestep_spacing)
        generator = torch.Generator().manual_seed(0)
        images = pipe(batch_size=args.num, num_inference_steps=int(steps or args.steps), generator=generator).images
        sample_rows.append((label, images))
    first = sample_rows[0][1][0]
    train, _, _ = build_datasets(resolve_data(args.data, len(first.getbands()), first.width))
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.num].tolist()
    real = pipe.to_output(torch.stack([train[i]["pixel_values"] for i in picks]) / 2 + 0.5, "pil")
    figure_rows = [("real images", real), *sample_rows]
    label_width = 8 + 6 * max(len(label) for label, _ in figure_rows)
    strips = [labelled_row(label, images, args.scale, label_width) for label, images in figure_rows]
    figure = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    for i, strip in enumerate(strips):
        figure.paste(strip, (0, sum(s.height for s in strips[:i])))
    figure.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
