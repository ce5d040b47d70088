"""Build the texture-rich benchmark image folders from photographs that ship inside Python wheels (no download).

    photos     RGB patches of scikit-learn's two sample photographs (`sklearn.datasets.load_sample_images`:
               china.jpg, flower.jpg, 640x427 each), one class per quadrant of each photo: 8 classes.
    textures   grayscale patches of scikit-image's bundled images (`skimage.data`): the three texture photographs
               brick, grass and gravel, and camera, coins and moon; one class per image: 6 classes.
               Needs scikit-image (`pip install -e '.[benchmarks]'`).

Each class folder holds `--per_class` patches of `--size` x `--size` pixels cut at full resolution at positions drawn
from a seeded generator, so the same command writes byte-identical folders on any machine:

    python benchmarks/texture_sets.py --out runs/data            # runs/data/photos/<class>/*.png, runs/data/textures/...

Train on a folder by pointing `data.*` at it:

    accelerate launch train_vae.py --config configs/digits.yaml --output_dir runs/photos \
        --data.source=folder --data.path=runs/data/photos --data.color_mode=rgb
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon")


def photo_regions() -> Iterator[tuple[str, np.ndarray]]:
    """(class name, HxWx3 uint8 region): the four quadrants of each scikit-learn sample photo."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    for path, image in zip(photos.filenames, photos.images):
        name = Path(path).stem
        h, w = image.shape[0] // 2, image.shape[1] // 2
        for row, top in (("top", 0), ("bottom", h)):
            for col, left in (("left", 0), ("right", w)):
                yield f"{name}-{row}-{col}", image[top:top + h, left:left + w]


def skimage_images() -> Iterator[tuple[str, np.ndarray]]:
    """(class name, HxW uint8 image) for each of SKIMAGE_IMAGES."""
    try:
        from skimage import data
    except ImportError as e:
        raise SystemExit("the textures set needs scikit-image: pip install -e '.[benchmarks]'") from e
    for name in SKIMAGE_IMAGES:
        yield name, getattr(data, name)()


def write_patches(region: np.ndarray, out: Path, count: int, size: int, rng: np.random.Generator) -> None:
    """`count` random size x size crops of `region`, as PNG files 0000.png, 0001.png, ..."""
    out.mkdir(parents=True, exist_ok=True)
    h, w = region.shape[:2]
    tops = rng.integers(0, h - size + 1, count)
    lefts = rng.integers(0, w - size + 1, count)
    for i, (top, left) in enumerate(zip(tops, lefts)):
        Image.fromarray(region[top:top + size, left:left + size]).save(out / f"{i:04d}.png")


SETS = {"photos": photo_regions, "textures": skimage_images}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/data", help="parent folder; each set is written to OUT/<set>/<class>/")
    p.add_argument("--sets", default="photos,textures", help=f"comma-separated, from {','.join(SETS)}")
    p.add_argument("--per_class", type=int, default=500, help="patches per class")
    p.add_argument("--size", type=int, default=32, help="patch side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in args.sets.split(","):
        if name not in SETS:
            raise SystemExit(f"--sets: unknown set {name!r}; choose from {', '.join(SETS)}")
        rng = np.random.default_rng(args.seed)
        classes = list(SETS[name]())
        for class_name, region in classes:
            write_patches(region, Path(args.out) / name / class_name, args.per_class, args.size, rng)
        print(f"{Path(args.out) / name}: {len(classes)} classes x {args.per_class} patches of {args.size}px "
              f"({', '.join(c for c, _ in classes)})")


if __name__ == "__main__":
    main()
