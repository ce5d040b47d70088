"""Caption sources for text conditioning (image-folder metadata, a data set column, a template over class names),
the latent cache's caption column, and the conditioning errors that stop a run before any work."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from helpers import run, tiny_config
from PIL import Image

from ldm.config import ConfigError, DataConfig
from ldm.data import DataError, build_datasets, collate
from ldm.train import latent_cache
from ldm.train.unet import train_unet


@pytest.fixture(autouse=True, scope="module")
def _datasets_cache(tmp_path_factory):
    """Keep the arrow files that load_dataset writes for temporary folders out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((12, 12), 20 * i, np.uint8)).save(root / f"{i}.png")
        names.append(f"{i}.png")
    return names


def _captions_by_brightness(train) -> dict[int, str]:
    """Each image's caption, keyed by its grey level (which says which file it was)."""
    batch = collate([train[i] for i in range(len(train))])
    levels = ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5 / 20).round().int().tolist()
    return dict(zip(levels, batch["caption"]))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_image_folder_metadata_gives_captions(tmp_path, fmt):
    names = _images(tmp_path / "imgs", 4)
    rows = [{"file_name": n, "text": f"grey level {i}", "prompt": f"p{i}"} for i, n in enumerate(names)]
    if fmt == "jsonl":
        (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        lines = ["file_name,text,prompt"] + [f"{r['file_name']},{r['text']},{r['prompt']}" for r in rows]
        (tmp_path / "imgs" / "metadata.csv").write_text("\n".join(lines))
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), resolution=8, color_mode="grayscale",
                     holdout_fraction=0)
    train, _, info = build_datasets(cfg, captions=True)
    assert _captions_by_brightness(train) == {i: f"grey level {i}" for i in range(4)}
    assert info.captions.column == "text"
    other, _, _ = build_datasets(DataConfig(**{**cfg.__dict__, "caption_column": "prompt"}), captions=True)
    assert _captions_by_brightness(other) == {i: f"p{i}" for i in range(4)}
    # Captions are only produced when asked for, and only then change the data's key (and its latent cache).
    plain, _, plain_info = build_datasets(cfg)
    assert "caption" not in plain[0] and plain_info.fingerprint != info.fingerprint


def test_folder_without_metadata_says_how_to_give_captions(tmp_path):
    _images(tmp_path / "imgs" / "a", 2)
    cfg = DataConfig(source="folder", path=str(tmp_path / "imgs"), resolution=8)
    with pytest.raises(DataError, match="metadata.jsonl or metadata.csv beside the images, with a file_name column"):
        build_datasets(cfg, captions=True)
    with pytest.raises(DataError, match="caption_template=.* fills in class names, but data .* has no labels"):
        build_datasets(DataConfig(source="hub", path=str(_parquet(tmp_path)), image_column="img",
                                  caption_template="a {name}"), captions=True)


def _parquet(tmp_path: Path) -> Path:
    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"img": images, "desc": [f"level {i}" for i in range(5)], "y": [0, 1, 0, 1, 2]})
    ds = ds.cast_column("img", datasets.Image())
    (tmp_path / "pq").mkdir(exist_ok=True)
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    return tmp_path / "pq"


def test_hub_caption_column_and_template(tmp_path):
    path = str(_parquet(tmp_path))
    cfg = DataConfig(source="hub", path=path, image_column="img", caption_column="desc", resolution=8,
                     holdout_fraction=0, color_mode="grayscale")
    train, _, _ = build_datasets(cfg, captions=True)
    assert _captions_by_brightness(train) == {i: f"level {i}" for i in range(5)}
    with pytest.raises(DataError, match=r"data.caption_column='text' is not a column .* available columns: img, desc"):
        build_datasets(DataConfig(**{**cfg.__dict__, "caption_column": "text"}), captions=True)
    templated = DataConfig(**{**cfg.__dict__, "caption_column": None, "label_column": "y",
                              "caption_template": "class {name} of three"})
    train, _, _ = build_datasets(templated, captions=True)
    batch = collate([train[i] for i in range(5)])
    assert batch["caption"] == [f"class {y} of three" for y in batch["label"].tolist()]


def test_digits_template_and_the_latent_cache_keeps_captions(tmp_path):
    cfg = DataConfig(source="digits", resolution=16, color_mode="grayscale", max_samples=24,
                     caption_template="a handwritten digit {name}")
    train, _, info = build_datasets(cfg, captions=True)
    labels = [train[i]["label"] for i in range(24)]
    assert [train[i]["caption"] for i in range(24)] == [f"a handwritten digit {y}" for y in labels]
    # A template in the config changes nothing for runs that do not ask for captions.
    no_template = DataConfig(**{**cfg.__dict__, "caption_template": None})
    assert build_datasets(cfg)[2].fingerprint == build_datasets(no_template)[2].fingerprint

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    cache = latent_cache.build_or_load(vae, cfg, info, tmp_path / "cache", batch_size=10, captions=True)
    rows = cache.with_format(None)
    assert list(rows["caption"]) == [f"a handwritten digit {y}" for y in rows["label"]]
    batch = latent_cache.collate([cache[i] for i in range(3)])
    assert batch["caption"] == list(rows["caption"])[:3] and batch[latent_cache.MEAN].shape == (3, 4, 8, 8)


@pytest.mark.parametrize("overrides, message", [
    ({"denoiser.conditioning": "text"}, "needs captions, and the digits have none: set data.caption_template"),
    ({"data.caption_template": "a digit"}, "has no {name} field"),
    ({"data.caption_template": "a {name}", "data.caption_column": "text"}, "captions come from one of them"),
    ({"denoiser.diffusion.cond_dropout": 1.0}, r"cond_dropout: must be in \[0, 1\)"),
    ({"denoiser.text_encoder": "openai/clip-vit-large-patch14"}, "set conditioning: text"),
    ({"denoiser.conditioning": "image"}, "expected one of 'none' | 'class' | 'text'"),
    ({"denoiser.text_model.num_heads": 3}, "num_heads=3 does not divide hidden_size=32"),
])
def test_conditioning_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides)


def test_class_conditioning_on_unlabelled_data_stops_before_training(tmp_path):
    _images(tmp_path / "imgs", 3)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    cfg = tiny_config(tmp_path / "run", **{"denoiser.conditioning": "class", "denoiser.vae_path": str(tmp_path / "vae"),
                                           "data.source": "folder", "data.path": str(tmp_path / "imgs"),
                                           "data.max_samples": None})
    with pytest.raises(ConfigError, match="denoiser.conditioning=class needs class labels, and data .* has none"):
        run(train_unet, cfg)
    assert not (tmp_path / "run" / "latent_cache").exists()
