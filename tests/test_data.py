"""Data pipeline: digits / image folder / local "hub" parquet -> tensors in [-1, 1], held-out split, errors."""

import io
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import DataConfig
from ldm.data import AugmentedImages, DataError, build_dataloader, build_datasets, collate, split_holdout


@pytest.fixture(autouse=True, scope="module")
def _datasets_cache(tmp_path_factory):
    """Keep the arrow files that load_dataset writes for temporary folders out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def _draws(ds, index: int, n: int) -> list[torch.Tensor]:
    return [ds[index]["pixel_values"] for _ in range(n)]


def _epochs(ds, index: int, n: int) -> list[torch.Tensor]:
    """Example `index` as epochs 0..n-1 see it."""
    draws = []
    for epoch in range(n):
        ds.set_epoch(epoch)
        draws.append(ds[index]["pixel_values"])
    return draws


# --------------------------------------------------------------------------------------------------------------------
# digits


@pytest.mark.parametrize("color_mode, channels", [("rgb", 3), ("grayscale", 1)])
def test_digits_shapes_range_labels(color_mode, channels):
    cfg = DataConfig(source="digits", resolution=32, color_mode=color_mode, holdout_fraction=0.1)
    train, holdout, info = build_datasets(cfg)
    assert (info.num_channels, info.resolution, info.num_classes) == (channels, 32, 10)
    assert info.class_names == [str(i) for i in range(10)]
    assert len(train) + len(holdout) == 1797 and (info.num_train, info.num_holdout) == (len(train), len(holdout))
    assert len(holdout) == 180
    batch = collate([train[i] for i in range(64)])
    x = batch["pixel_values"]
    assert x.shape == (64, channels, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0  # background 0 -> -1 exactly
    assert x.max() > 0.99  # ink 16 -> 255 -> 1
    assert set(batch["label"].tolist()) <= set(range(10)) and len(set(batch["label"].tolist())) > 5
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_digits_holdout_is_deterministic_per_seed():
    cfg = DataConfig(source="digits", resolution=8, holdout_fraction=0.05)
    a = build_datasets(cfg)
    b = build_datasets(cfg)
    c = build_datasets(replace(cfg, seed=1))
    stack = lambda ds: torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    assert torch.equal(stack(a[1]), stack(b[1]))
    assert not torch.equal(stack(a[1]), stack(c[1]))
    assert a[2].fingerprint == b[2].fingerprint != c[2].fingerprint
    assert a[2].fingerprint != build_datasets(DataConfig(source="digits", resolution=16))[2].fingerprint


def test_split_holdout_sizes_disjoint_and_independent_of_max_samples():
    ds = datasets.Dataset.from_dict({"i": list(range(200))})
    train, holdout = split_holdout(ds, 0.1, None, seed=3)
    tr, ho = set(train["i"]), set(holdout["i"])
    assert len(ho) == 20 and len(tr) == 180 and not tr & ho and tr | ho == set(range(200))
    assert ho != set(range(20))  # shuffled, not the first rows
    train2, holdout2 = split_holdout(ds, 0.1, 50, seed=3)
    assert set(holdout2["i"]) == ho and len(train2) == 50 and set(train2["i"]) <= tr
    assert split_holdout(ds, 0.0, None, seed=3)[1] is None
    with pytest.raises(DataError, match="no training images"):
        split_holdout(ds, 0.1, 0, seed=3)


# --------------------------------------------------------------------------------------------------------------------
# image folder


def _gradient(w: int, h: int, channel: int) -> np.ndarray:
    """Horizontal ramp in one colour channel, so crops and flips at different offsets give different pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., channel] = np.linspace(40, 255, w, dtype=np.uint8)[None, :]
    return a


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    # cats are red, dogs blue: a label can then be checked against the pixels it came with
    Image.fromarray(_gradient(40, 24, 0)).save(root / "cat" / "wide.png")
    rgba = np.dstack([_gradient(30, 26, 0), np.full((26, 30), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "cat" / "alpha.png")
    Image.fromarray(_gradient(24, 48, 2)).save(root / "dog" / "tall.jpg", quality=95)
    Image.fromarray(_gradient(20, 28, 2)).convert("P").save(root / "dog" / "palette.png")  # none is square
    return root


def test_folder_labels_shapes_and_colours(image_folder):
    cfg = DataConfig(source="folder", path=str(image_folder), resolution=16, holdout_fraction=0.0)
    train, holdout, info = build_datasets(cfg)
    assert holdout is None and info.num_train == 4 and info.class_names == ["cat", "dog"]
    for i in range(4):
        x, label = train[i]["pixel_values"], train[i]["label"]
        assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
        red, blue = x[0].mean(), x[2].mean()
        assert (red > blue) == (info.class_names[label] == "cat")
    assert info.fingerprint.startswith("folder-")


def test_folder_center_crop_keeps_the_middle(tmp_path):
    (tmp_path / "a").mkdir()
    wide = np.zeros((32, 64), np.uint8)
    wide[:, 16:48] = 255  # white middle half; a center crop of the resized 32x16 image is exactly that half
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    cfg = DataConfig(source="folder", path=str(tmp_path), resolution=16, color_mode="grayscale", holdout_fraction=0)
    x = build_datasets(cfg)[0][0]["pixel_values"]
    assert x.shape == (1, 16, 16)
    assert x[:, :, 2:-2].min() > 0.95  # bicubic may soften only the outermost columns
    random = build_datasets(DataConfig(**{**cfg.__dict__, "crop": "random"}))[0]
    assert min(d.min() for d in _epochs(random, 0, 12)) < 0  # some random crop reaches the black sides


def test_folder_transparent_pixels_become_white(tmp_path):
    (tmp_path / "a").mkdir()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, but the top half is fully transparent
    rgba[8:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "alpha.png")
    cfg = DataConfig(source="folder", path=str(tmp_path), resolution=16, holdout_fraction=0)
    x = build_datasets(cfg)[0][0]["pixel_values"]
    assert torch.allclose(x[:, :8], torch.ones(3, 8, 16))
    assert torch.allclose(x[:, 8:, :], torch.tensor([200 / 127.5 - 1, -1, -1]).view(3, 1, 1).expand(3, 8, 16))


def test_folder_random_augmentation_is_a_function_of_seed_epoch_and_index(image_folder):
    base = {"source": "folder", "path": str(image_folder), "resolution": 16, "holdout_fraction": 0.5, "seed": 5}
    fixed_train, fixed_holdout, _ = build_datasets(DataConfig(**base))
    for ds in (fixed_train, fixed_holdout):
        first, *rest = _draws(ds, 0, 4)
        assert all(torch.equal(first, d) for d in rest)
    cfg = DataConfig(**base, crop="random", random_flip=True)
    train, holdout, _ = build_datasets(cfg)
    assert isinstance(train, AugmentedImages)
    # Within an epoch an example is the same every time it is read; across epochs its crop and flip change.
    first, *rest = _draws(train, 1, 4)
    assert all(torch.equal(first, d) for d in rest)
    draws = _epochs(train, 1, 12)
    assert len({d.numpy().tobytes() for d in draws}) > 1
    # Example i of epoch e is transformed with default_rng([data.seed, e, i]), whoever reads it and in any order.
    raw = train.images[1]
    for epoch in (0, 7):
        expected = train.transform.apply(raw["image"], np.random.default_rng([5, epoch, 1]))
        assert torch.equal(draws[epoch], expected)
    again = build_datasets(cfg)[0]
    assert all(torch.equal(a, b) for a, b in zip(draws, _epochs(again, 1, 12)))
    other = _epochs(build_datasets(replace(cfg, seed=6))[0], 1, 12)
    assert not all(torch.equal(a, b) for a, b in zip(draws, other))
    # the held-out set ignores crop/flip settings: it is the same as with center crop, every time
    for i in range(len(holdout)):
        assert all(torch.equal(fixed_holdout[i]["pixel_values"], d) for d in _draws(holdout, i, 6))


@pytest.mark.parametrize("name, fmt", [("broken.jpg", "JPEG"), ("broken.png", "PNG")])
def test_folder_truncated_image_is_named(image_folder, name, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, fmt)
    (image_folder / "cat" / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cfg = DataConfig(source="folder", path=str(image_folder), resolution=16)
    with pytest.raises(DataError, match=rf"(?s)1 image\(s\) under .*{name}.*verify_images=false"):
        build_datasets(cfg)
    cfg.verify_images = False
    assert build_datasets(cfg)[2].num_train + build_datasets(cfg)[2].num_holdout == 5


def test_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no image files"):
        build_datasets(DataConfig(source="folder", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="is not a directory"):
        build_datasets(DataConfig(source="folder", path=str(tmp_path / "missing")))


# --------------------------------------------------------------------------------------------------------------------
# hub (a local directory of parquet files goes through the same load_dataset call as a Hub name)


@pytest.fixture
def parquet_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12 + i, 20, 3), np.uint8)) for i in range(10)]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"img": images, "y": [i % 3 for i in range(10)]}, features=features)
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    return tmp_path


def test_hub_local_parquet(parquet_dir):
    cfg = DataConfig(source="hub", path=str(parquet_dir), image_column="img", label_column="y",
                     resolution=8, holdout_fraction=0.2)
    train, _, info = build_datasets(cfg)
    assert (info.num_train, info.num_holdout, info.class_names) == (8, 2, ["a", "b", "c"])
    batch = collate([train[i] for i in range(8)])
    assert batch["pixel_values"].shape == (8, 3, 8, 8)
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    unlabelled = build_datasets(DataConfig(**{**cfg.__dict__, "label_column": None}))
    assert unlabelled[0][0]["label"] == -1 and unlabelled[2].num_classes is None


@pytest.mark.parametrize("labels, names, num_classes", [
    (["dog", "cat", "cat", "emu"], ["cat", "dog", "emu"], 3),  # strings -> class ids in name order
    ([0, 4, 1, 1], None, 5),  # bare integers: classes 0..max
])
def test_hub_plain_label_columns(tmp_path, labels, names, num_classes):
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"img": images, "y": labels}).cast_column("img", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    cfg = DataConfig(source="hub", path=str(tmp_path), image_column="img", label_column="y", resolution=8,
                     holdout_fraction=0)
    train, _, info = build_datasets(cfg)
    assert (info.class_names, info.num_classes) == (names, num_classes)
    got = [train[i]["label"] for i in range(4)]
    assert got == ([names.index(x) for x in labels] if names else labels)


def test_hub_wrong_column_lists_available(parquet_dir):
    cfg = DataConfig(source="hub", path=str(parquet_dir), image_column="image")
    with pytest.raises(DataError, match=r"data.image_column='image'.*available columns: img, y"):
        build_datasets(cfg)
    cfg = DataConfig(source="hub", path=str(parquet_dir), image_column="img", label_column="labels")
    with pytest.raises(DataError, match=r"data.label_column='labels'.*img, y"):
        build_datasets(cfg)


def test_hub_unknown_name_offline():
    cfg = DataConfig(source="hub", path="nobody-here/no-such-dataset")
    with pytest.raises(DataError, match=r"(?s)'nobody-here/no-such-dataset'.*Offline mode is on"):
        build_datasets(cfg)


def test_hub_streaming(parquet_dir):
    cfg = DataConfig(source="hub", path=str(parquet_dir), image_column="img", label_column="y", streaming=True,
                     resolution=8, max_samples=7, crop="random")
    train, holdout, info = build_datasets(cfg)
    assert isinstance(train, datasets.IterableDataset) and holdout is None
    assert (info.num_train, info.num_holdout, info.num_classes) == (7, 0, 3)
    batches = list(build_dataloader(train, batch_size=3, shuffle=True, seed=0, drop_last=False))
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 3, 1]
    assert batches[0]["pixel_values"].shape == (3, 3, 8, 8) and batches[0]["label"].dtype == torch.long


# --------------------------------------------------------------------------------------------------------------------
# dataloader


def test_dataloader_batches_and_seeded_order():
    train, _, _ = build_datasets(DataConfig(source="digits", resolution=8, max_samples=40))
    loader = build_dataloader(train, batch_size=16, shuffle=True, seed=0, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["pixel_values"].shape == (16, 3, 8, 8) and batches[0]["pixel_values"].dtype == torch.float32
    assert batches[0]["label"].shape == (16,) and batches[0]["label"].dtype == torch.int64
    again = next(iter(build_dataloader(train, batch_size=16, shuffle=True, seed=0)))
    other = next(iter(build_dataloader(train, batch_size=16, shuffle=True, seed=1)))
    assert torch.equal(batches[0]["label"], again["label"]) and torch.equal(batches[0]["pixel_values"],
                                                                            again["pixel_values"])
    assert not torch.equal(batches[0]["pixel_values"], other["pixel_values"])


def test_dataloader_workers_follow_the_epoch(image_folder):
    """Persistent loader workers see set_epoch (shared memory) and draw exactly what the main process would."""
    cfg = DataConfig(source="folder", path=str(image_folder), resolution=16, crop="random", random_flip=True,
                     holdout_fraction=0.0)
    train = build_datasets(cfg)[0]

    def epochs(num_workers: int) -> list[torch.Tensor]:
        loader = build_dataloader(train, batch_size=1, shuffle=False, num_workers=num_workers, seed=0,
                                  drop_last=False)
        out = []
        for epoch in range(4):
            train.set_epoch(epoch)
            out.append(torch.cat([b["pixel_values"] for b in loader]))
        return out

    in_process, in_workers = epochs(0), epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers))
    assert len({e.numpy().tobytes() for e in in_process}) > 1
