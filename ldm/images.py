"""Image grids for sample previews, the logs and `ldm sample`."""

from __future__ import annotations

import math

from PIL import Image

MAX_ROW = 16  # images in one grid row of a class or prompt (`ldm sample`); more wrap onto further rows


def grid_shape(num_images: int, cols: int | None = None) -> tuple[int, int]:
    """(rows, cols) with rows * cols >= num_images; near-square (cols >= rows) unless cols is given."""
    cols = cols or math.ceil(math.sqrt(num_images))
    return math.ceil(num_images / cols), cols


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """diffusers' make_image_grid, with the last row padded by blank cells (it insists on rows * cols images)."""
    from diffusers.utils import make_image_grid

    rows, cols = grid_shape(len(images), cols)
    blank = Image.new(images[0].mode, images[0].size)
    grid = make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    # make_image_grid always pastes onto RGB; grayscale images keep one channel (a third of the PNG).
    return grid.convert("L") if images[0].mode == "L" else grid


def condition_grid(images: list[Image.Image], per_condition: int, max_cols: int = MAX_ROW) -> Image.Image:
    """A block of rows per condition (class or prompt): consecutive groups of `per_condition` images, each in rows of
    at most `max_cols`, starting a row of its own (the last row of a block padded by blank cells), so that 200 images
    of one class make a 16-wide block instead of a 1 x 200 strip."""
    cols = min(per_condition, max_cols)
    block = math.ceil(per_condition / cols) * cols
    blank = Image.new(images[0].mode, images[0].size)
    cells = []
    for start in range(0, len(images), per_condition):
        group = list(images[start:start + per_condition])
        cells += group + [blank] * (block - len(group))
    return image_grid(cells, cols=cols)
