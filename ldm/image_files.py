"""Image files that real data sets hold: decode checks, the policy for broken ones, and deep images made 8-bit.

A data set of a million files holds a few broken ones: truncated or zero-byte files, text saved as .png, a
download that stopped half-way. `data.on_bad_image` says what happens to them:
  error  (default) stop at start-up and name every broken file (or Hub row), before any training;
  skip   leave them out and say so in one warning that names them.
Folders and downloaded Hub data sets are checked at start-up (`check_images`); a streamed data set cannot be read
ahead, so its rows are decoded as they arrive (`StreamDecoder`): a broken row is skipped with a warning, or stops
the run with a DataError naming it. Either way no broken image reaches a batch in the middle of an epoch.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CHECK_BATCH = 1000  # rows read at a time when checking a data set (the encoded bytes of one batch are in memory)
LISTED = 10  # broken files named in a message; the rest are counted


class BadImageError(ValueError):
    """An image that cannot be decoded; `ldm.data.DataError` is raised from it with the file or row named."""


def decode(value) -> Image.Image:
    """A `datasets.Image(decode=False)` value ({"bytes", "path"}), a path or a PIL image -> a fully loaded image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise BadImageError("no image (the row holds neither bytes nor a path)")
    image = Image.open(value)
    image.load()
    return image


def image_problem(value) -> str | None:
    """None if `value` decodes to an image, else the reason it does not."""
    try:
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            value = value["path"]
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as image:
                # JPEG: decode at 1/8 scale (cheaper), which still reads all the entropy-coded data.
                image.draft(image.mode, (1, 1))
                image.load()
        else:
            decode(value)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBomb... by codec
        return f"{type(e).__name__}: {e}"
    return None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images (PNG, TIFF) -> 8-bit grayscale by scaling 0..65535 to 0..255; PIL's own
    convert() clips them at 255 instead, which turns a 16-bit image white."""
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I (PIL's 32-bit integer mode, holding 16-bit data)
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":  # 32-bit float: taken to be in [0, 1]
        array = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255)
        return Image.fromarray(array.astype(np.uint8), mode="L")
    return image


def _describe(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value
    return str(path) if path else f"row {index}"


def find_bad_images(ds: datasets.Dataset, column: str, desc: str = "checking images") -> list[tuple[int, str]]:
    """(row index, "<file or row>: <reason>") of every row of `ds` whose image does not decode. Threads: PIL releases
    the GIL while decoding."""
    raw = ds.cast_column(column, datasets.Image(decode=False)).select_columns([column])
    bad: list[tuple[int, str]] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(raw), desc=desc, disable=len(raw) < 5000) as bar:
        for start in range(0, len(raw), CHECK_BATCH):
            values = raw[start:start + CHECK_BATCH][column]
            for offset, problem in enumerate(pool.map(image_problem, values)):
                if problem is not None:
                    bad.append((start + offset, f"{_describe(values[offset], start + offset)}: {problem}"))
            bar.update(len(values))
    return bad


def listing(problems: list[str]) -> str:
    more = f"\n  ... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
    return "\n  ".join(problems[:LISTED]) + more


def check_images(ds: datasets.Dataset, column: str, on_bad_image: str, where: str) -> datasets.Dataset:
    """`ds` if every image decodes; else (on_bad_image "skip") `ds` without the broken rows and one warning naming
    them, or (on_bad_image "error") BadImageError naming them."""
    bad = find_bad_images(ds, column)
    if not bad:
        return ds
    problems = [problem for _, problem in bad]
    if on_bad_image == "error":
        raise BadImageError(
            f"{len(bad)} image(s) {where} cannot be decoded:\n  {listing(problems)}\n"
            "Remove or replace them, or set data.on_bad_image=skip to train without them.")
    message = f"data.on_bad_image=skip: left out {len(bad)} image(s) {where} that cannot be decoded:\n  " \
              f"{listing(problems)}"
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    broken = {index for index, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in broken])


class StreamDecoder:
    """Batched `IterableDataset.map` function that decodes a stream's image column itself (cast to
    `Image(decode=False)`), so that a row which fails to decode is dropped with a warning ("skip") or stops the run
    with an error naming it ("error") instead of raising from inside `datasets` in the middle of an epoch."""

    def __init__(self, column: str, on_bad_image: str, where: str):
        self.column, self.on_bad_image, self.where = column, on_bad_image, where
        self.rows_seen = 0
        self.skipped: list[str] = []

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        keep, images = [], []
        for i, value in enumerate(batch[self.column]):
            index = self.rows_seen + i
            try:
                images.append(to_8bit(decode(value)))
                keep.append(i)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... by codec
                problem = f"{_describe(value, index)}: {type(e).__name__}: {e}"
                if self.on_bad_image == "error":
                    raise BadImageError(f"an image of the stream {self.where} cannot be decoded: {problem}. Remove "
                                        "or replace it, or set data.on_bad_image=skip to train without it.") from e
                self.skipped.append(problem)
                message = f"data.on_bad_image=skip: left out an image of the stream {self.where} " \
                          f"({len(self.skipped)} so far): {problem}"
                warnings.warn(message, stacklevel=2)
                logger.warning(message)
        self.rows_seen += len(batch[self.column])
        out = {key: [values[i] for i in keep] for key, values in batch.items()}
        out[self.column] = images
        return out
