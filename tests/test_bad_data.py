"""Broken and unusual image files: every kind is converted, or named at start-up (data.on_bad_image=error), or left
out and named in one warning (skip); a Hub row that fails to decode, downloaded or streamed, is handled the same way."""

import io
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import ConfigError, DataConfig, load_config
from ldm.data import DataError, ImageTransform, build_dataloader, build_datasets

RESOLUTION = 16


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def good_images() -> dict[str, bytes]:
    """One file per kind of image a real folder holds, each of which must train as an RGB image."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 24, 3), np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba = Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)]))
    return {
        "rgb.jpg": _png(Image.fromarray(rgb), "JPEG"),
        "cmyk.jpg": _png(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "rgba.png": _png(rgba),
        "gray16.png": _png(Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16))),
        "palette.png": _png(palette),
        "palette.gif": _png(palette, "GIF"),
        "gray.png": _png(Image.fromarray(rgb[..., 0])),
        "tiny.png": _png(Image.fromarray(rgb[:3, :5])),  # smaller than the resolution: enlarged
        "large.png": _png(Image.fromarray(rng.integers(0, 255, (1500, 2600, 3), np.uint8))),  # 3.9 MP: shrunk
    }


def bad_images() -> dict[str, bytes]:
    whole = _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), np.uint8)))
    jpeg = _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), np.uint8)), "JPEG")
    return {"truncated.png": whole[: len(whole) // 2], "truncated.jpg": jpeg[: len(jpeg) // 2], "empty.png": b"",
            "text.png": b"not an image at all\n"}


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for name, data in {**good_images(), **bad_images()}.items():
        (root / "a" / name).write_bytes(data)
    (root / "a" / "notes.txt").write_text("a caption file that is not an image")  # not an image extension: ignored
    return root


def test_each_kind_of_image_is_converted():
    transform = ImageTransform(RESOLUTION, "rgb")
    for name, data in good_images().items():
        x = transform.apply(Image.open(io.BytesIO(data)))
        assert x.shape == (3, RESOLUTION, RESOLUTION) and x.dtype == torch.float32, name
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1, name
    # 16-bit values are scaled to 8 bits, not clipped at 255 (which would make the image almost all white).
    gray16 = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 128 * 257
    assert torch.allclose(ImageTransform(RESOLUTION, "grayscale").apply(gray16), torch.tensor(128 / 127.5 - 1), atol=1e-6)
    # Half-transparent pixels are composited onto white, CMYK becomes RGB.
    red = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert torch.equal(transform.apply(red), torch.ones(3, 16, 16))
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    assert torch.equal(transform.apply(cyan)[:, 0, 0], torch.tensor([-1.0, 1.0, 1.0]))


def test_default_names_every_broken_file_at_start_up(messy_folder):
    cfg = DataConfig(source="folder", path=str(messy_folder), resolution=RESOLUTION)
    with pytest.raises(DataError, match=r"4 image\(s\) under .* cannot be decoded") as error:
        build_datasets(cfg)
    for name in bad_images():
        assert name in str(error.value)
    assert "data.on_bad_image=skip" in str(error.value)
    assert not any(name in str(error.value) for name in good_images())


def test_skip_leaves_out_broken_files_with_one_warning_and_trains_on_the_rest(messy_folder):
    cfg = DataConfig(source="folder", path=str(messy_folder), resolution=RESOLUTION, on_bad_image="skip",
                     holdout_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _, info = build_datasets(cfg)
    messages = [str(w.message) for w in caught if "on_bad_image" in str(w.message)]
    assert len(messages) == 1 and "left out 4 image(s)" in messages[0]
    assert all(name in messages[0] for name in bad_images())
    assert info.num_train == len(good_images())
    batches = list(build_dataloader(train, batch_size=3, shuffle=True, seed=0, drop_last=False))
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert pixels.shape == (len(good_images()), 3, RESOLUTION, RESOLUTION) and torch.isfinite(pixels).all()


def test_on_bad_image_is_a_checked_config_key(tmp_path):
    assert load_config(None, {"data.on_bad_image": "skip"}).data.on_bad_image == "skip"
    with pytest.raises(ConfigError, match="data.on_bad_image"):
        load_config(None, {"data.on_bad_image": "ignore"})


def _parquet_with_a_broken_row(tmp_path: Path, broken_row: int = 5, n: int = 12) -> Path:
    rows = [{"bytes": _png(Image.new("RGB", (10, 10), (20 * i, 0, 0))), "path": f"img{i}.png"} for i in range(n)]
    rows[broken_row] = {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": f"img{broken_row}.png"}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": rows, "label": list(range(n))}, features=features)
    (tmp_path / "hub").mkdir()
    ds.to_parquet(str(tmp_path / "hub" / "train-00000-of-00001.parquet"))
    return tmp_path / "hub"


def test_downloaded_hub_row_that_fails_to_decode(tmp_path):
    path = _parquet_with_a_broken_row(tmp_path)
    cfg = DataConfig(source="hub", path=str(path), resolution=8, holdout_fraction=0.0, label_column="label")
    with pytest.raises(DataError, match=r"(?s)1 image\(s\) of data set .*img5.png"):
        build_datasets(cfg)
    with pytest.warns(UserWarning, match="left out 1 image"):
        train, _, info = build_datasets(DataConfig(**{**cfg.__dict__, "on_bad_image": "skip"}))
    assert info.num_train == 11 and sorted(train[i]["label"] for i in range(11)) == [i for i in range(12) if i != 5]


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_streamed_hub_row_that_fails_to_decode_mid_stream(tmp_path, on_bad_image):
    path = _parquet_with_a_broken_row(tmp_path)
    cfg = DataConfig(source="hub", path=str(path), resolution=8, streaming=True, label_column="label",
                     on_bad_image=on_bad_image)
    train, _, _ = build_datasets(cfg)  # a stream is not read ahead: the row is met when the loader reaches it
    loader = build_dataloader(train, batch_size=4, shuffle=False, drop_last=False)
    if on_bad_image == "error":
        with pytest.raises(ValueError, match=r"(?s)img5.png.*data.on_bad_image=skip"):
            list(loader)
        return
    with pytest.warns(UserWarning, match=r"left out an image of the stream .*img5.png"):
        labels = torch.cat([b["label"] for b in loader]).tolist()
    assert labels == [i for i in range(12) if i != 5]
