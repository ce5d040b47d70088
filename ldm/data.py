"""Training images from three sources -> `{"pixel_values": FloatTensor[C, H, W] in [-1, 1], "label": int}`
(plus `"caption": str` when captions are asked for, see `ldm.captions`).

Every source is first turned into a `datasets` data set with an image column and an optional label column:
  digits  scikit-learn's bundled 8x8 digits (no download), stored as uint8 images
  folder  `load_dataset("imagefolder", data_dir=path)`: one sub-folder per class
  hub     `load_dataset(path, hub_config, split=split, streaming=streaming)`: a Hub name or a local data directory
so that all of them go through the same `ImageTransform` (`ldm.transforms`), applied lazily (`with_transform`, or
`.map` when streaming): images are decoded only when a batch asks for them.

`data.seed` alone decides the held-out split, so both stages, evaluation and the latent cache see the same one.
Random crops and flips of the training images are a pure function of (data.seed, epoch, example index)
(`AugmentedImages`): a resumed run draws what an uninterrupted one would, whatever the process count, the loader
workers or the batches it skips.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ldm import image_files
from ldm.captions import CaptionError, CaptionSource, resolve_caption_source
from ldm.config import DataConfig
from ldm.transforms import TRANSFORM_VERSION, AugmentedImages, ImageTransform

TrainDataset = typing.Union[datasets.Dataset, datasets.IterableDataset, "AugmentedImages"]


class DataError(ValueError):
    """Training data that cannot be built: a missing folder, a broken image, an unknown column or data set."""


@dataclass
class DataInfo:
    num_channels: int  # 3 for color_mode rgb, 1 for grayscale
    resolution: int  # every image is resolution x resolution
    num_classes: int | None  # None: unlabelled (labels are then -1)
    class_names: list[str] | None  # None when labels are bare integers or absent
    num_train: int | None  # None: a streamed data set of unknown length
    num_holdout: int  # images kept out of training for reconstruction metrics
    fingerprint: str  # identifies source, path, split, selection and transforms (key for latent caches)
    captions: CaptionSource | None = None  # where captions come from, when they were asked for


# --------------------------------------------------------------------------------------------------------------------
# Sources: each returns a data set with an image column, plus the names of its image and label columns.


def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's 1797 8x8 digits as uint8 grayscale images (values 0..16 -> 0..255) with labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": list(pixels), "label": digits.target.tolist()}, features=features)


def _load_folder(cfg: DataConfig) -> tuple[datasets.Dataset, str, str | None]:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path!r} is not a directory; data.source='folder' needs a directory of "
                        "images, one sub-folder per class")
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=cfg.split)
    except FileNotFoundError as e:  # datasets' EmptyDatasetError
        raise DataError(f"data.path={cfg.path!r} contains no image files (png, jpg, webp, ...): {e}") from e
    ds = _checked(ds, "image", cfg, f"under {root}")
    return ds, "image", "label" if "label" in ds.column_names else None


def _load_hub(cfg: DataConfig) -> tuple[TrainDataset, str, str | None]:
    try:
        ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split, streaming=cfg.streaming)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, unknown split or config
        offline = " Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): only cached names and local " \
                  "directories can be loaded." if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(
            f"could not load data set {cfg.path!r} (data.hub_config={cfg.hub_config!r}, data.split={cfg.split!r}): "
            f"{e}.{offline} Check the name at https://huggingface.co/datasets (gated sets need `hf auth login`), "
            "or set data.path to a local directory of data files."
        ) from e
    columns = ds.column_names  # None for a streamed set whose features are unknown until read
    for key, column in (("image_column", cfg.image_column), ("label_column", cfg.label_column)):
        if column is not None and columns is not None and column not in columns:
            raise DataError(f"data.{key}={column!r} is not a column of {cfg.path!r}; available columns: "
                            f"{', '.join(columns)}")
    if isinstance(ds, datasets.IterableDataset):
        # Decoded by StreamDecoder (see _streaming_train), which can tell a broken row from the end of the stream.
        if ds.features is not None:
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        return ds, cfg.image_column, cfg.label_column
    if not isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image())  # paths or encoded bytes -> decoded PIL images
    return _checked(ds, cfg.image_column, cfg, f"of data set {cfg.path!r}"), cfg.image_column, cfg.label_column


def _checked(ds: datasets.Dataset, column: str, cfg: DataConfig, where: str) -> datasets.Dataset:
    """Every image decode-checked now (data.verify_images), so a broken one stops the run in seconds with its name
    (data.on_bad_image=error) or is left out with a warning (skip), never in the middle of an epoch."""
    if not cfg.verify_images:
        return ds
    try:
        return image_files.check_images(ds, column, cfg.on_bad_image, where)
    except image_files.BadImageError as e:
        raise DataError(f"{e} (data.verify_images=false skips this check; training then fails when it reaches a "
                        "broken file)") from e


# --------------------------------------------------------------------------------------------------------------------
# Labels, held-out split, fingerprint.


def _label_info(ds: TrainDataset, column: str | None, streaming: bool):
    """Return (data set, num_classes, class_names); string labels become class ids, sorted by name."""
    if column is None:
        return ds, None, None
    feature = ds.features[column] if ds.features is not None else None
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string") and not streaming:
        ds = ds.class_encode_column(column)
        feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return ds, feature.num_classes, list(feature.names)
    if streaming or feature is None:
        return ds, None, None  # counting classes would mean reading the whole stream
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise DataError(f"label column {column!r} holds {feature}; it must hold integer class ids or class names")
    return ds, int(max(ds.unique(column))) + 1, None


def split_holdout(ds: datasets.Dataset, holdout_fraction: float, max_samples: int | None, seed: int):
    """Seeded split: the held-out set depends only on (len, fraction, seed), not on max_samples, so metrics stay
    comparable across runs that train on different amounts; max_samples takes a random subset of the rest."""
    n = len(ds)
    num_holdout = max(1, round(n * holdout_fraction)) if holdout_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n)
    train_idx = order[num_holdout:] if max_samples is None else order[num_holdout:num_holdout + max_samples]
    if len(train_idx) == 0:
        raise DataError(f"no training images left: {n} images, {num_holdout} held out, max_samples={max_samples}")
    # Sorted indices read files (and arrow rows) in order; the DataLoader shuffles anyway.
    train = ds.select(np.sort(train_idx), keep_in_memory=True)
    holdout = ds.select(np.sort(order[:num_holdout]), keep_in_memory=True) if num_holdout else None
    return train, holdout


def _fingerprint(cfg: DataConfig, data_id: str | None, captions: CaptionSource | None = None,
                 low_res_size: int | None = None) -> str:
    fields = ("source", "path", "hub_config", "split", "image_column", "label_column", "streaming", "resolution",
              "crop", "random_flip", "color_mode", "holdout_fraction", "max_samples")
    key = {name: getattr(cfg, name) for name in fields}
    if cfg.source == "folder" or (cfg.source == "hub" and Path(cfg.path).is_dir()):
        key["path"] = str(Path(cfg.path).expanduser().resolve())
    # data_id: datasets' own fingerprint of the loaded files (changes when files do); None when not deterministic.
    key.update(seed=cfg.seed, transform_version=TRANSFORM_VERSION, data_id=data_id)
    if captions is not None:  # only then: data without captions keeps the key (and latent cache) it always had
        key["captions"] = {"column": captions.column, "template": captions.template}
    if low_res_size is not None:  # likewise: only super-resolution data has low-res images
        key["low_res_size"] = low_res_size
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.source}-{digest}"


# --------------------------------------------------------------------------------------------------------------------
# Public entry points.


def build_datasets(cfg: DataConfig, captions: bool = False, low_res: bool = False
                   ) -> tuple[TrainDataset, datasets.Dataset | None, DataInfo]:
    """Build (train, holdout or None, info), split by `cfg.seed`. Training examples get cfg's crop/flip (an
    `AugmentedImages` when they are random); held-out ones center crop only.

    captions: also yield each image's caption (`ldm.captions`); a DataError says so when the data has none.
    low_res: also yield each image's low-resolution version `low_res` (super-resolution, data.degrade.factor).
    """
    low_res_size = cfg.resolution // cfg.degrade.factor if low_res else None
    if cfg.source in ("folder", "hub") and not cfg.path:
        raise DataError(f"data.path: required when data.source is {cfg.source!r}")
    if cfg.source == "digits":
        ds, image_column, label_column = load_digits_dataset(), "image", "label"
    elif cfg.source == "folder":
        ds, image_column, label_column = _load_folder(cfg)
    elif cfg.source == "hub":
        ds, image_column, label_column = _load_hub(cfg)
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}; expected digits, folder or hub")
    streaming = isinstance(ds, datasets.IterableDataset)
    ds, num_classes, class_names = _label_info(ds, label_column, streaming)
    caption_source = None
    if captions:
        try:
            caption_source = resolve_caption_source(cfg, ds.column_names, label_column, class_names)
        except CaptionError as e:
            raise DataError(str(e)) from e

    def transform(train: bool) -> ImageTransform:
        return ImageTransform(cfg.resolution, cfg.color_mode, cfg.crop if train else "center",
                              cfg.random_flip and train, cfg.seed, image_column, label_column, caption_source,
                              low_res_size)

    columns = list(dict.fromkeys(c for c in (image_column, label_column,
                                             *(caption_source.columns if caption_source else [])) if c))
    if streaming:
        train, num_train = _streaming_train(ds, cfg, transform(True))
        holdout, num_holdout, data_id = None, 0, None
    else:
        train, holdout = split_holdout(ds, cfg.holdout_fraction, cfg.max_samples, cfg.seed)
        augment = transform(True)
        train = AugmentedImages(train, augment, columns) if augment.is_random else \
            train.with_transform(augment, columns=columns)
        holdout = holdout.with_transform(transform(False), columns=columns) if holdout is not None else None
        num_train, num_holdout = len(train), 0 if holdout is None else len(holdout)
        data_id = None if cfg.source == "digits" else ds._fingerprint  # from_dict fingerprints are random
    info = DataInfo(num_channels=3 if cfg.color_mode == "rgb" else 1, resolution=cfg.resolution,
                    num_classes=num_classes, class_names=class_names, num_train=num_train,
                    num_holdout=num_holdout, fingerprint=_fingerprint(cfg, data_id, caption_source, low_res_size),
                    captions=caption_source)
    return train, holdout, info


def _streaming_train(ds: datasets.IterableDataset, cfg: DataConfig, transform: ImageTransform):
    """A streamed set has no length to split by, so it has no held-out part; max_samples takes its first images."""
    splits = ds.info.splits or {}
    known = getattr(splits.get(cfg.split), "num_examples", 0) or None  # 0 in SplitInfo means "not recorded"
    lengths = [n for n in (known, cfg.max_samples) if n is not None]
    if cfg.max_samples is not None:
        ds = ds.take(cfg.max_samples)
    decoder = image_files.StreamDecoder(transform.image_column, cfg.on_bad_image, repr(cfg.path))
    train = ds.map(decoder, batched=True, batch_size=64).map(transform, batched=True, batch_size=64,
                                                             remove_columns=ds.column_names)
    return train, min(lengths) if lengths else None


def collate(examples: list[dict]) -> dict[str, torch.Tensor | list[str]]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "label": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }
    if "caption" in examples[0]:
        batch["caption"] = [e["caption"] for e in examples]
    if "low_res" in examples[0]:
        batch["low_res"] = torch.stack([e["low_res"] for e in examples])
    return batch


def build_dataloader(dataset: TrainDataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                     seed: int = 0, drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader whose order follows `seed` (crops and flips follow data.seed and the epoch)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if shuffle and isinstance(dataset, datasets.IterableDataset):
            # Streams shuffle shard order plus a buffer; call dataset.set_epoch(epoch) to reshuffle each epoch.
            dataset = dataset.shuffle(seed=seed, buffer_size=1000)
        shuffle = False  # DataLoader cannot shuffle an iterable
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
        drop_last=drop_last, generator=generator, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
