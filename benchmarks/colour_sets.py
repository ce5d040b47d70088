"""Build colourful-object benchmark image folders offline: saturated objects on a plain white background.

The texture sets (`texture_sets.py`) are photographs whose colour is mostly a global cast; an autoencoder that loses
chroma still scores well on them. These sets are the opposite case, the one a user with sprites, icons, product shots
or cartoon characters brings: small, saturated, multi-coloured objects on white, where a gray reconstruction is
obvious to the eye and invisible to a PSNR dominated by the background.

    emoji    Noto Color Emoji glyphs (Debian's `fonts-noto-color-emoji`, rendered by PIL with embedded_color=True)
             as transparent PNGs, each glyph several times at a seeded random scale and position; one class per
             Unicode block (animals, food, objects, transport, ...).
    shapes   seeded random ellipses, polygons and stars in saturated colours, some two-tone, with dark outlines, on
             white; one class per shape kind. Needs nothing but PIL (the tests use it).

    python benchmarks/colour_sets.py --out runs/data                 # runs/data/emoji/<class>/*.png, runs/data/shapes/...
    accelerate launch train_vae.py --config configs/digits.yaml --output_dir runs/emoji \
        --data.source=folder --data.path=runs/data/emoji --data.color_mode=rgb --data.random_flip=true

The same command writes byte-identical folders on any machine with the same font file.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_BLOCKS = {  # class name -> code point range (inclusive); glyphs the font lacks are skipped
    "animals": (0x1F400, 0x1F43C),
    "food": (0x1F345, 0x1F37F),
    "objects": (0x1F380, 0x1F3C4),
    "faces": (0x1F600, 0x1F637),
    "transport": (0x1F680, 0x1F6C5),
    "plants": (0x1F330, 0x1F344),
}
SHAPES = ("ellipse", "polygon", "star")


def _emoji_glyphs(block: tuple[int, int]) -> list[Image.Image]:
    """Each code point of the block that the font draws, as a tight RGBA crop."""
    from PIL import ImageFont

    if not Path(EMOJI_FONT).is_file():
        raise SystemExit(f"the emoji set needs {EMOJI_FONT}: apt-get install fonts-noto-color-emoji")
    font = ImageFont.truetype(EMOJI_FONT, 109)  # the font's one bitmap size
    glyphs = []
    for code in range(block[0], block[1] + 1):
        canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((10, 10), chr(code), font=font, embedded_color=True)
        box = canvas.getbbox()
        rgb = np.asarray(canvas.convert("RGB"), dtype=np.int16)
        # A missing glyph draws an empty box or a monochrome tofu: keep only glyphs with real colour.
        if box is not None and np.abs(rgb[..., 0] - rgb[..., 2]).max() > 60:
            glyphs.append(canvas.crop(box))
    return glyphs


def write_emoji(out: Path, per_class: int, size: int, rng: np.random.Generator) -> dict[str, int]:
    """Per block, `per_class` transparent size x size PNGs: a glyph (cycling through the block) at 60-95% of the
    side, at a random position inside the square."""
    counts = {}
    for name, block in EMOJI_BLOCKS.items():
        glyphs = _emoji_glyphs(block)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            glyph = glyphs[i % len(glyphs)]
            side = int(size * rng.uniform(0.6, 0.95))
            scale = side / max(glyph.size)
            g = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                             Image.Resampling.LANCZOS)
            canvas = Image.new("RGBA", (size, size), (255, 255, 255, 0))
            canvas.alpha_composite(g, (int(rng.integers(0, size - g.width + 1)),
                                       int(rng.integers(0, size - g.height + 1))))
            canvas.save(folder / f"{i:04d}.png")
        counts[name] = len(glyphs)
    return counts


def _saturated(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _shape_points(kind: str, cx: float, cy: float, radius: float, rng: np.random.Generator) -> list[tuple]:
    if kind == "polygon":
        n = int(rng.integers(3, 7))
        phase = rng.uniform(0, 2 * math.pi)
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]
    n, phase = int(rng.integers(4, 7)), rng.uniform(0, 2 * math.pi)  # star: alternating outer and inner points
    return [(cx + r * math.cos(phase + math.pi * k / n), cy + r * math.sin(phase + math.pi * k / n))
            for k, r in zip(range(2 * n), [radius, radius * 0.45] * n)]


def shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One saturated shape (two-tone half of the time, a smaller shape of another colour inside) with a dark
    outline, on white, drawn at 4x and downsampled for smooth edges."""
    big = 4 * size
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    radius = big * rng.uniform(0.25, 0.45)
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    layers = [(radius, _saturated(rng))] + ([(radius * 0.5, _saturated(rng))] if rng.random() < 0.5 else [])
    for r, colour in layers:
        outline, width = (40, 40, 40), max(1, big // 32)
        if kind == "ellipse":
            ry = r * rng.uniform(0.6, 1.0)
            draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=colour, outline=outline, width=width)
        else:
            draw.polygon(_shape_points(kind, cx, cy, r, rng), fill=colour, outline=outline, width=width)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_shapes(out: Path, per_class: int, size: int, rng: np.random.Generator) -> None:
    for kind in SHAPES:
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(kind, size, rng).save(folder / f"{i:04d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/data", help="parent folder; each set is written to OUT/<set>/<class>/")
    p.add_argument("--sets", default="emoji,shapes", help="comma-separated, from emoji,shapes")
    p.add_argument("--per_class", type=int, default=150, help="images per class")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (training resizes to data.resolution)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in args.sets.split(","):
        rng = np.random.default_rng(args.seed)
        out = Path(args.out) / name
        if name == "emoji":
            counts = write_emoji(out, args.per_class, args.size, rng)
            detail = ", ".join(f"{c} ({n} glyphs)" for c, n in counts.items())
        elif name == "shapes":
            write_shapes(out, args.per_class, args.size, rng)
            detail = ", ".join(SHAPES)
        else:
            raise SystemExit(f"--sets: unknown set {name!r}; choose from emoji, shapes")
        print(f"{out}: {args.per_class} images per class of {args.size}px: {detail}")


if __name__ == "__main__":
    main()
