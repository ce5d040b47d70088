"""One training image: a PIL image -> `pixel_values` in [-1, 1] (`ImageTransform`), with random crops and flips that
are a pure function of (data.seed, epoch, example index) (`AugmentedImages`).

`ldm.data` builds the data sets these transforms are applied to, lazily, batch by batch.
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from PIL import Image

from ldm import image_files
from ldm.captions import CaptionSource

# Bump when ImageTransform's output for the same input changes: the fingerprint (and so any latent cache) follows it.
TRANSFORM_VERSION = 1


class ImageTransform:
    """Batch transform (the `Dataset.set_transform` protocol): PIL images -> pixel_values in [-1, 1], labels -> int.

    1. convert to RGB or L (transparent pixels onto white, not onto whatever colour hides under alpha = 0);
    2. resize the shorter side to `resolution` with PIL bicubic: PIL widens the filter by the scale factor when
       shrinking, so large images are antialiased, and bicubic is sharper than bilinear when enlarging small images
       such as the 8x8 digits (the LDM repository's own loaders use bicubic too);
    3. center or random crop to resolution x resolution;
    4. horizontal flip with p = 0.5 if `random_flip`;
    5. [0, 255] -> [-1, 1], HWC -> CHW.
    Random crops and flips draw from the numpy Generator given with each image (`AugmentedImages` passes one per
    example). A stream, which has no example index, draws from one Generator per (seed, process rank, loader
    worker), so processes and workers do not repeat each other's crops.
    """

    def __init__(self, resolution: int, color_mode: str = "rgb", crop: str = "center", random_flip: bool = False,
                 seed: int = 0, image_column: str = "image", label_column: str | None = None,
                 captions: CaptionSource | None = None, low_res_size: int | None = None):
        self.resolution = resolution
        self.low_res_size = low_res_size
        self.mode = {"rgb": "RGB", "grayscale": "L"}[color_mode]
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.image_column = image_column
        self.label_column = label_column
        self.captions = captions
        self._stream_rng: np.random.Generator | None = None
        self._stream_worker: int | None = None

    @property
    def is_random(self) -> bool:
        return self.crop == "random" or self.random_flip

    def __call__(self, batch: dict[str, list], rngs: list[np.random.Generator] | None = None) -> dict[str, list]:
        images = batch[self.image_column]
        labels = batch[self.label_column] if self.label_column else [None] * len(images)
        if rngs is None:
            rngs = [self._stream_generator()] * len(images) if self.is_random else [None] * len(images)
        if self.low_res_size is None:
            pairs = [(self.apply(image, rng), None) for image, rng in zip(images, rngs)]
        else:
            pairs = [self.apply_pair(image, rng) for image, rng in zip(images, rngs)]
        out = {
            "pixel_values": [full for full, _ in pairs],
            "label": [-1 if label is None else int(label) for label in labels],
        }
        if self.low_res_size is not None:
            out["low_res"] = [low for _, low in pairs]
        if self.captions is not None:
            out["caption"] = self.captions(batch)
        return out

    def _stream_generator(self) -> np.random.Generator:
        worker = torch.utils.data.get_worker_info()
        worker_id = -1 if worker is None else worker.id
        if self._stream_rng is None or worker_id != self._stream_worker:
            rank = int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch in every process
            self._stream_rng = np.random.default_rng([self.seed, rank, worker_id + 1])
            self._stream_worker = worker_id
        return self._stream_rng

    def apply(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.apply_pair(image, rng)[0]

    def apply_pair(self, image: Image.Image, rng: np.random.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training image and, with `low_res_size`, its low-resolution version: the same crop of the SOURCE
        image resized (bicubic, antialiased) straight to low_res_size, then the same flip. For the digits at 32px and
        factor 4 that is the native 8x8 scan itself; for large sources it is bicubic downsampling."""
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = image_files.to_8bit(image).convert(self.mode)  # CMYK, palette, 16-bit, ... -> RGB or L
        r = self.resolution
        w, h = image.size
        size = (max(r, round(w * r / min(w, h))), max(r, round(h * r / min(w, h))))
        source = image
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = size
        if self.is_random and rng is None:
            raise ValueError("random crops and flips need a generator: use AugmentedImages for the training set")
        if self.crop == "random":
            left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        else:
            left, top = (w - r) // 2, (h - r) // 2
        image = image.crop((left, top, left + r, top + r))
        low = None
        if self.low_res_size is not None:
            sx, sy = source.size[0] / size[0], source.size[1] / size[1]  # resized -> source coordinates
            box = (left * sx, top * sy, (left + r) * sx, (top + r) * sy)
            low = source.resize((self.low_res_size,) * 2, Image.Resampling.BICUBIC, box=box, reducing_gap=None)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            low = None if low is None else low.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image), None if low is None else _to_tensor(low)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """[0, 255] -> [-1, 1], HWC -> CHW."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class AugmentedImages(torch.utils.data.Dataset):
    """Training images with random crops/flips that are a pure function of (seed, epoch, example index).

    Example i of epoch e is transformed with `np.random.default_rng([seed, e, i])`, so no generator state has to be
    saved in checkpoints or advanced over the batches a resumed run skips, and each example gets the same crop on
    whichever process or loader worker reads it. The training loop calls `set_epoch` before each epoch; the epoch
    lives in shared memory, so DataLoader workers (persistent ones too) see it change.
    """

    def __init__(self, images: datasets.Dataset, transform: ImageTransform, columns: list[str]):
        self.images = images.select_columns(columns)
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch in one read (the DataLoader calls this with a batch's indices)."""
        indices = [int(i) for i in indices]
        epoch = self.epoch
        rngs = [np.random.default_rng([self.transform.seed, epoch, i]) for i in indices]
        batch = self.transform(self.images[indices], rngs)
        return [dict(zip(batch, values)) for values in zip(*batch.values())]  # pixel_values, label (, caption)
